"""memaudit: audit image classifiers for memorized training examples, localize and remove them."""

from memaudit._version import __version__
from memaudit.auditor import Auditor
from memaudit.data import ImageDataset, load_dataset, read_ids
from memaudit.errors import MemauditError
from memaudit.masks import UnitMasks
from memaudit.models import Classifier, ModelInfo, load_model, save_model
from memaudit.schema import ScanReport, ScanSettings, Unit
from memaudit.units import UnitSpace

__all__ = [
    "Auditor",
    "Classifier",
    "ImageDataset",
    "MemauditError",
    "ModelInfo",
    "ScanReport",
    "ScanSettings",
    "Unit",
    "UnitMasks",
    "UnitSpace",
    "__version__",
    "load_dataset",
    "load_model",
    "read_ids",
    "save_model",
]
