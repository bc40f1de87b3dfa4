"""patchknn: unsupervised visual anomaly detection with pretrained patch features and k-NN.

Example:
    >>> from patchknn import PatchKNN
    >>> model = PatchKNN()  # the paper's method: Keras' ResNet-50, layers 1-3, 28x28, PCA 95 %, k=1
"""

import os

# Idle OpenMP threads of the backbone sleep instead of spinning, so the image-decoding workers get
# the cores (fast preset on bottle, 2 cores: 19.3-19.7 -> 22.1-23.1 images/s end to end; the
# backbone alone is ~10 % slower without decoding beside it). Effective only when patchknn is
# imported before torch; an OMP_WAIT_POLICY set by the user is kept. See docs/speed.md.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from typing import TYPE_CHECKING  # noqa: E402

from patchknn._version import __version__  # noqa: E402
from patchknn.config import PatchKNNConfig  # noqa: E402
from patchknn.errors import (  # noqa: E402
    ConfigError,
    DatasetError,
    ImageError,
    ModelFileError,
    NotFittedError,
    PatchKNNError,
    WeightsError,
)
from patchknn.presets import PRESETS, preset  # noqa: E402

if TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__ below
    from patchknn.model import PatchKNN, Prediction

# The estimator pulls in torch (seconds): imported on first use, so that `patchknn --help`, the
# configuration and the errors stay light (PEP 562).
_LAZY = {"PatchKNN": "patchknn.model", "Prediction": "patchknn.model"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'patchknn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

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
