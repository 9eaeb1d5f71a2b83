"""Reports of the layer probes: gradient accounting, layer rewinding and layer retraining.

Every report holds names and numbers only, laid out for plots: per layer one row, per epoch one
column (a layer x epoch heat-map), and per layer one bar (flagged accuracy after rewinding).
"""

from __future__ import annotations

from enum import Enum
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from memaudit.schema._base import Report
from memaudit.schema._inputs import Preflight


class Grouping(str, Enum):
    """How parameters form the "layers" a probe reports on."""

    MODULE = "module"  # each conv/linear module with the norm that follows it
    BLOCK = "block"  # each top-level child, timm stage or Hugging Face encoder layer


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Accuracies(_Row):
    """Accuracy on the flagged examples (given labels), the other training examples and test."""

    flagged: float | None
    clean: float | None
    test: float | None = None


class ProbeReport(Report):
    """What every probe report holds: the model and data, the layer grouping, the flagged and
    other rows measured, and the preflight check of the model."""

    SCHEMA_VERSION: ClassVar[int] = 2  # 2: preflight
    schema_version: int = 2
    preflight: Preflight | None = None  # the model's accuracy before the probe, its inputs
    model: str
    data: str
    grouping: Grouping
    n_flagged: int
    n_clean: int


class LayerGradients(_Row):
    """Gradient accounting of one layer group; lists run over the report's ``epochs``."""

    name: str
    params: int
    flagged_norm: list[float | None]
    clean_norm: list[float | None]
    cosine: list[float | None]


class GradientsReport(ProbeReport):
    """Per layer and epoch: norms of the summed flagged and clean gradients, their cosine.

    Norms are divided by sqrt(#parameters) of the layer. ``mode`` says how they were measured:
    ``training`` (summed over the batches of each epoch while training) or ``checkpoint`` (post
    hoc on saved weights, every example once). ``norm_stats`` says whether batch-norm used batch
    statistics (as in training) or its running statistics (eval mode). An epoch is ``None`` for
    a checkpoint whose epoch is unknown. ``cosine`` is ``None`` where a gradient is zero.

    Example:
        >>> row = LayerGradients(name="fc", params=10, flagged_norm=[0.5], clean_norm=[0.4],
        ...                      cosine=[-0.8])
        >>> report = GradientsReport(model="m", data="d", grouping="module", mode="checkpoint",
        ...                          n_flagged=1, n_clean=9, epochs=[30], layers=[row])
        >>> report.kind, report.layers[0].cosine
        ('gradients', [-0.8])
    """

    KIND: ClassVar[str] = "gradients"
    kind: Literal["gradients"] = "gradients"
    mode: Literal["training", "checkpoint"]
    norm_stats: Literal["batch", "running"] = "batch"
    epochs: list[int | None]
    layers: list[LayerGradients]


class LayerRewind(_Row):
    """Accuracies with one layer group rewound; lists run over the report's ``epochs``."""

    name: str
    params: int
    flagged: list[float | None]
    clean: list[float | None]
    test: list[float | None] | None = None


class RewindReport(ProbeReport):
    """Flagged and clean accuracy of the final model with one layer at a time rewound.

    ``layers[i].flagged[j]`` is the flagged (given-label) accuracy with layer ``i`` set to its
    weights of epoch ``epochs[j]``; ``baseline`` is the final model untouched.

    Example:
        >>> report = RewindReport(model="m", data="d", grouping="module", n_flagged=1,
        ...     n_clean=9, baseline=Accuracies(flagged=1.0, clean=1.0), epochs=[0],
        ...     layers=[LayerRewind(name="fc", params=10, flagged=[0.2], clean=[0.9])])
        >>> report.flagged_at(0)
        {'fc': 0.2}
    """

    KIND: ClassVar[str] = "rewind"
    kind: Literal["rewind"] = "rewind"
    n_test: int | None = None
    baseline: Accuracies
    epochs: list[int]
    layers: list[LayerRewind]

    def flagged_at(self, epoch: int) -> dict[str, float | None]:
        """Layer -> flagged accuracy when rewound to ``epoch`` (one bar chart)."""
        column = self.epochs.index(epoch)
        return {layer.name: layer.flagged[column] for layer in self.layers}


class LayerRetrain(_Row):
    """One layer group rewound, then retrained alone on the clean examples."""

    name: str
    params: int
    rewound: Accuracies
    retrained: Accuracies

    @property
    def flagged_recovered(self) -> float | None:
        """Flagged accuracy won back by retraining (retrained minus rewound)."""
        if self.rewound.flagged is None or self.retrained.flagged is None:
            return None
        return self.retrained.flagged - self.rewound.flagged


class RetrainReport(ProbeReport):
    """Per layer: accuracy after rewinding it to ``rewind_epoch`` and after retraining it alone.

    Retraining uses only the non-flagged examples, so flagged (given-label) accuracy can come
    back only from memorization the other, frozen layers still hold.

    Example:
        >>> acc = Accuracies(flagged=0.1, clean=0.5)
        >>> row = LayerRetrain(name="fc", params=10, rewound=acc,
        ...                    retrained=Accuracies(flagged=0.9, clean=1.0))
        >>> report = RetrainReport(model="m", data="d", grouping="module", rewind_epoch=0,
        ...     train_epochs=2, lr=0.05, n_flagged=1, n_clean=9,
        ...     baseline=Accuracies(flagged=1.0, clean=1.0), layers=[row])
        >>> round(report.layers[0].flagged_recovered, 2)
        0.8
    """

    KIND: ClassVar[str] = "retrain"
    kind: Literal["retrain"] = "retrain"
    rewind_epoch: int
    train_epochs: int
    lr: float
    n_test: int | None = None
    baseline: Accuracies
    layers: list[LayerRetrain]
