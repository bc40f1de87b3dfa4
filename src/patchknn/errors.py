"""The exception types patchknn raises.

Every error the package raises on purpose derives from :class:`PatchKNNError`, so callers can catch
one type. Errors that concern a value a caller passed also derive from :class:`ValueError`.
"""

from __future__ import annotations

from pathlib import Path


class PatchKNNError(Exception):
    """Base class of every error raised on purpose by patchknn."""


class ConfigError(PatchKNNError, ValueError):
    """An option has a value that is not allowed; the message says what is."""


class ImageError(PatchKNNError, ValueError):
    """An image could not be read or used; names the file (when there is one) and the reason."""

    def __init__(self, source: str | Path | None, reason: str) -> None:
        self.source = None if source is None else str(source)
        self.reason = reason
        where = f"{self.source}: " if self.source else ""
        super().__init__(f"{where}{reason}")

    def __reduce__(self):  # picklable across processes (DataLoader workers, Ray)
        return (type(self), (self.source, self.reason))


class DatasetError(PatchKNNError, ValueError):
    """A dataset folder does not have the expected layout (missing masks, empty folders, ...)."""


class WeightsError(PatchKNNError):
    """Backbone weights are missing, unreachable or do not match the network."""


class ModelFileError(PatchKNNError):
    """A saved model is missing, truncated, tampered with, or of an unsupported format."""


class NotFittedError(PatchKNNError, AttributeError):
    """The estimator was used before :meth:`PatchKNN.fit` (or :meth:`PatchKNN.load`)."""
