"""Remove what a trained model memorized about flagged examples: :func:`unlearn`.

Every method takes the same :class:`UnlearnJob` (a copy of the model it may change, the data,
flagged and retained rows, a training budget) and returns the unlearned model; :func:`unlearn`
measures the model before and after on the same data and returns an :class:`UnlearnResult`.
Methods live in a registry (:data:`METHODS`, :func:`register_method`).

Modules: ``_methods`` (the job, the registry and the methods), ``_baselines`` (the
literature's baselines: NegGrad+, SalUn, localize-then-reset, SSD), ``_run`` (:func:`unlearn`,
the measurement).
"""

from memaudit.unlearn import _baselines  # noqa: F401  # registers the baselines
from memaudit.unlearn._methods import (
    METHODS,
    Option,
    UnlearnJob,
    UnlearnMethod,
    fresh_copy,
    register_method,
)
from memaudit.unlearn._run import (
    UnlearnResult,
    UnlearnStep,
    budget_epochs,
    measure,
    mia_auc,
    unlearn,
    unlearn_settings,
)

__all__ = [
    "METHODS",
    "Option",
    "UnlearnJob",
    "UnlearnMethod",
    "UnlearnResult",
    "UnlearnStep",
    "budget_epochs",
    "fresh_copy",
    "measure",
    "mia_auc",
    "register_method",
    "unlearn",
    "unlearn_settings",
]
