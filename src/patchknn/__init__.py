"""patchknn: unsupervised visual anomaly detection with pretrained patch features and k-NN.

Example:
    >>> from patchknn import PatchKNN
    >>> model = PatchKNN()  # the paper's method: Caffe ResNet-50, layers 1-3, 28x28, PCA 95 %, k=1
"""

from patchknn._version import __version__
from patchknn.config import PRESETS, PatchKNNConfig, preset
from patchknn.errors import (
    ConfigError,
    DatasetError,
    ImageError,
    ModelFileError,
    NotFittedError,
    PatchKNNError,
    WeightsError,
)
from patchknn.model import PatchKNN, Prediction

__all__ = [
    "PRESETS",
    "ConfigError",
    "DatasetError",
    "ImageError",
    "ModelFileError",
    "NotFittedError",
    "PatchKNN",
    "PatchKNNConfig",
    "PatchKNNError",
    "Prediction",
    "WeightsError",
    "__version__",
    "preset",
]
