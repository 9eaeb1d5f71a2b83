"""Layer probes of the paper: which layers do memorized examples use?

Three probes over *layer groups* (the parameters that form one layer or one block):

* gradient accounting: per layer, the norms of the summed gradients of the flagged and of the
  other examples (divided by sqrt(#parameters)) and their cosine, on a checkpoint
  (:func:`gradient_accounting`), over a folder of per-epoch checkpoints
  (:func:`gradient_history`) or while training (:class:`GradientTracker`);
* layer rewinding (:func:`rewind_layers`): one layer at a time set back to an earlier epoch;
* layer retraining (:func:`retrain_layers`): one layer rewound, then retrained alone on the
  non-flagged examples.

Rewinding and retraining copy one group's tensors into the live model and copy them back after:
the model is never deep-copied.
"""

from memaudit.probes._gradients import (
    GradientStats,
    GradientTracker,
    gradient_accounting,
    gradient_history,
    gradients_report,
)
from memaudit.probes._layers import (
    Checkpoint,
    LayerGroup,
    ProbeStep,
    find_checkpoints,
    layer_groups,
    read_state,
    swapped,
)
from memaudit.probes._rewind import retrain_layers, rewind_layers
from memaudit.schema import Grouping

__all__ = [
    "Checkpoint",
    "GradientStats",
    "GradientTracker",
    "Grouping",
    "LayerGroup",
    "ProbeStep",
    "find_checkpoints",
    "gradient_accounting",
    "gradient_history",
    "gradients_report",
    "layer_groups",
    "read_state",
    "retrain_layers",
    "rewind_layers",
    "swapped",
]
