"""Example-tied dropout: direct each training example's memorization into its own few units.

A layer with ``C`` channels keeps its first ``round(p_gen * C)`` channels (generalization units)
on for every example; each other channel (a memorization unit) is on for example ``i`` with
probability ``p_mem``, drawn by an integer hash of ``(seed, i, channel)``. Masks are computed on
the fly for the ids of the current batch: nothing grows with the number of examples, and the same
example gets the same mask in every epoch, process and device.

:class:`TiedDropout` places the dropout on a model's layer outputs and applies it through the
unit masks of :mod:`memaudit.masks`, only inside a scope: no module is replaced, and the
model's state dict keeps its keys. :meth:`TiedDropout.fold` writes the expectation- or
drop-mode scaling into the weights, so that the result is a plain model.

The masks are drawn by :func:`memaudit.keyed.draws`. Modules: ``_tied`` (:class:`TiedDropout`,
:func:`default_layers`), ``_placement`` (:func:`conv_layers`, :func:`stage_outputs`, the
outputs' sizes), ``_fold`` (folding a scaling into the weights, :func:`recalibrate_norms`).
"""

from memaudit.dropout._fold import recalibrate_norms
from memaudit.dropout._placement import conv_layers, mlp_hidden_layers, stage_outputs
from memaudit.dropout._tied import MODES, DropoutMode, TiedDropout, default_layers

__all__ = [
    "MODES",
    "DropoutMode",
    "TiedDropout",
    "conv_layers",
    "default_layers",
    "mlp_hidden_layers",
    "recalibrate_norms",
    "stage_outputs",
]
