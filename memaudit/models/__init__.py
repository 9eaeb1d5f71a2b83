"""Loading classifiers of any family behind one entry point, :func:`load_model`.

Every model comes back as a :class:`Classifier`: an ``nn.Module`` whose forward returns a logits
tensor ``[B, K]`` and which carries a :class:`ModelInfo` (architecture, classes, preprocessing,
training data). Families (timm, Hugging Face, memaudit's own small nets) live in a registry.

Modules: ``_classifier`` (:class:`ModelInfo`, :class:`Classifier`), ``_families`` (the
registry, :func:`build_model`), ``_loading`` (:func:`load_model`, :func:`save_model`).
"""

from memaudit.models._classifier import Classifier, DataRef, Expected, ModelInfo, Preprocess
from memaudit.models._families import FAMILIES, Family, build_model, register_family
from memaudit.models._loading import CHECKPOINT_FORMAT, load_model, read_weights, save_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "FAMILIES",
    "Classifier",
    "DataRef",
    "Expected",
    "Family",
    "ModelInfo",
    "Preprocess",
    "build_model",
    "load_model",
    "read_weights",
    "register_family",
    "save_model",
]
