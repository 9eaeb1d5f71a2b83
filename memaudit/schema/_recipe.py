"""Training recipes: how a model family trains in the one engine (``memaudit.engine``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Recipe(BaseModel):
    """The optimizer, schedule and budget a family of models trains with.

    ``finetune_lr_scale``: fine-tuning (the unlearning methods) runs at ``lr`` times this; a
    model trained from scratch (the testbed, retraining, reference models) at ``lr``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str = Field(description="batchnorm-cnn, layernorm-cnn or transformer")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD (Nesterov) momentum")
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["one-cycle", "cosine", "constant"] = "one-cycle"
    warmup: float = Field(
        0.0, ge=0, lt=1, description="share of the steps with a linear warm-up (cosine)"
    )
    clip_grad_norm: float | None = Field(None, gt=0, description="gradient-norm clipping")
    epochs: int = Field(30, ge=1, description="epochs of training from scratch")
    finetune_lr_scale: float = Field(1.0, gt=0, le=1)
