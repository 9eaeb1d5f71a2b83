"""Example-tied dropout: direct each training example's memorization into its own few units.

A layer with ``C`` channels keeps its first ``round(p_gen * C)`` channels (generalization units)
on for every example; each other channel (a memorization unit) is on for example ``i`` with
probability ``p_mem``, drawn by an integer hash of ``(seed, i, channel)``. Masks are computed on
the fly for the ids of the current batch: nothing grows with the number of examples, and the same
example gets the same mask in every epoch, process and device.

Layers are inserted as modules (:func:`insert_dropout`) and removed again
(:func:`remove_dropout`), optionally folding the expectation- or drop-mode scaling into the
preceding conv / linear / batch-norm weights so that the result is a plain model. The batch's
example ids reach the layers through :func:`bind_ids`; the model's ``forward`` is unchanged.

Modules: ``_layer`` (the layer and :func:`bind_ids`), ``_placement`` (:func:`insert_dropout`),
``_fold`` (:func:`remove_dropout`, :func:`plain_copy`, :func:`recalibrate_norms`).
"""

from memaudit.dropout._fold import plain_copy, recalibrate_norms, remove_dropout
from memaudit.dropout._layer import (
    MODES,
    DropoutMode,
    ExampleTiedDropout,
    WithDropout,
    bind_ids,
    dropout_layers,
    set_mode,
    tied_draws,
)
from memaudit.dropout._placement import conv_layers, default_layers, insert_dropout, stage_outputs

__all__ = [
    "MODES",
    "DropoutMode",
    "ExampleTiedDropout",
    "WithDropout",
    "bind_ids",
    "conv_layers",
    "default_layers",
    "dropout_layers",
    "insert_dropout",
    "plain_copy",
    "recalibrate_norms",
    "remove_dropout",
    "set_mode",
    "stage_outputs",
    "tied_draws",
]
