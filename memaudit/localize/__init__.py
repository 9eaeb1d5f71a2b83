"""Localization: a batched greedy search for the few units whose zeroing flips an example.

For each flagged example ``(x_i, y_i)`` the model predicts correctly, the search zeroes units one
step at a time, choosing by a first-order estimate of the paper's objective

    L_i(m) = -CE(f(x_i; m), y_i) + w * mean_r CE(f(x_r; m), y_r)

(make the example's loss go up while the loss on non-flagged reference rows ``r`` stays down),
until the prediction is no longer ``y_i``. Every example has its own mask row ``m_i``; one forward
and one backward per step serve the whole active batch, and examples leave the batch as they flip.

**The reference term in the batched setting.** The authors recompute the reference loss's
gradient ``g_ref(m_i) = d mean_r CE(x_r; m_i) / dm`` on the edited model at every step, for every
example; the score is ``dL_i/dm = -dCE_i/dm (at m_i) + w * g_ref``. Three modes
(``ScanSettings.reference_mode``):

- ``shared``: ``g_ref(1)``, computed once per scan on the unedited model and shared by all
  examples and steps. A memorized example flips after a few units, so the term barely moves and
  the answers match the authors'. An example that needs many units drifts: the shared term
  under-counts the damage of a long edit, so it flips with fewer units (on the testbed's clean
  examples, a median of 5 against the authors' 9) at a higher accuracy cost.
- ``refreshed`` (default): the search first runs in shared mode with a budget of
  ``shared_units`` (4). Examples that flip within it keep that answer. The rest are searched
  again from the start, with ``g_ref`` recomputed exactly at each example's own mask after 1, 2,
  4, 8, ... zeroed units and held in between (only for the examples that have not flipped at
  that mask). This removes most of the drift at a fraction of the exact cost (clean examples: a
  median of 8 against the authors' 9).
- ``exact``: ``g_ref(m_i)`` at every step: every example's mask on every reference row
  (``A x R`` rows per step, shared by examples with equal masks). It gives the authors' term
  unit for unit, at close to their cost on a CPU.

**Precision.** The refreshes are most of a refreshed scan's work and the after-edit accuracy
most of the rest. ``precision="mixed"`` (what ``auto`` picks on a device with native bfloat16)
runs both under bfloat16 autocast, the accuracy with every close call redone in float32 (the
same accuracies as float32), and the scores, flip checks and pruning in float32; ``bf16`` runs
every forward under autocast.

``benchmarks/bench_scan.py`` measures all three against the sequential search in the same run.

The package: :mod:`~memaudit.localize._scorers` (which unit next), :mod:`~memaudit.localize._search`
(the greedy loop, the reference term, pruning, edit costs), :mod:`~memaudit.localize._scan`
(:func:`scan`, the whole scan of a list of ids as one function) and
:mod:`~memaudit.localize._shard` (the ranks of a scan under ``torchrun``).
"""

from memaudit.localize._scan import flip_units, scan, scan_settings, to_result
from memaudit.localize._scorers import (
    SCORERS,
    ScoreContext,
    Scorer,
    Scores,
    register_scorer,
    rows_per_pass,
    target_objective,
)
from memaudit.localize._search import (
    Found,
    Reference,
    edited_accuracy,
    exact_reference_grad,
    greedy_search,
    predict_masked,
    prune,
    reference_gradient,
    resolved,
    search_chunk,
)
from memaudit.localize._shard import World, expected_cost, shard

__all__ = [
    "SCORERS",
    "Found",
    "Reference",
    "ScoreContext",
    "Scorer",
    "Scores",
    "World",
    "edited_accuracy",
    "exact_reference_grad",
    "expected_cost",
    "flip_units",
    "greedy_search",
    "predict_masked",
    "prune",
    "reference_gradient",
    "register_scorer",
    "resolved",
    "rows_per_pass",
    "scan",
    "scan_settings",
    "search_chunk",
    "shard",
    "target_objective",
    "to_result",
]
