"""What memaudit knows about a model (:class:`ModelInfo`) and the :class:`Classifier` wrapper."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from memaudit.errors import MemauditError
from memaudit.schema import Recipe
from memaudit.units import UnitSpace


class Preprocess(BaseModel):
    """How images become model inputs: resize to ``image_size``, scale to [0, 1], normalize."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int | None = None
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)


class DataRef(BaseModel):
    """Where a model's training data lives, so a checkpoint can name it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    split: str = "train"
    image_column: str | None = None
    label_column: str | None = None
    class_map: list[int] | None = Field(
        None, description="model output of each data label (data label i -> class_map[i])"
    )


class ModelInfo(BaseModel):
    """What memaudit knows about a model; memaudit checkpoints store it beside the weights."""

    model_config = ConfigDict(extra="forbid")

    source: str
    arch: str
    num_classes: int
    in_chans: int | None = None
    preprocess: Preprocess | None = None
    class_names: list[str] | None = None
    head: str | None = None
    train_data: DataRef | None = None
    arch_config: dict[str, Any] = {}
    recipe: Recipe | None = Field(
        None, description="the recipe memaudit trained it with (retraining follows it)"
    )


Expected = tuple[Preprocess, str]  # the inputs a model expects, and where that comes from


class Classifier(nn.Module):
    """A model whose forward returns logits ``[B, K]``, with its :class:`ModelInfo`.

    Hugging Face models return dataclasses and some nets return tuples; memaudit always sees
    the logits tensor. The wrapped model is ``net``: unit names and state-dict keys are its own.
    ``preprocess_origin`` says in words where ``info.preprocess`` comes from.
    """

    def __init__(self, net: nn.Module, info: ModelInfo, preprocess_origin: str = "") -> None:
        super().__init__()
        self.net = net
        self.info = info
        self.preprocess_origin = preprocess_origin or "the model's info"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        raise MemauditError(
            f"the model returned {type(out).__name__}, not logits; wrap it so forward returns "
            "a [batch, classes] tensor"
        )

    def units(self, *, include_head: bool = False) -> UnitSpace:
        """The units of ``net`` (every conv channel and linear feature), head excluded."""
        exclude = [] if include_head or self.info.head is None else [self.info.head]
        return UnitSpace(self.net, exclude=exclude)
