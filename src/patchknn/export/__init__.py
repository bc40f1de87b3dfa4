"""Export a fitted model for deployment without PyTorch: ONNX or OpenVINO graphs + the memory bank.

:func:`export_model` writes a folder that :mod:`patchknn.runtime` scores with onnxruntime (or
OpenVINO), numpy, Pillow, scipy, threadpoolctl and faiss-cpu only, giving the same maps, scores and verdicts as
:meth:`PatchKNN.predict <patchknn.model.PatchKNN.predict>` (``tests/test_export.py``).

One graph per backbone pass (a single model has one; an ensemble's members on the same network and
weights, such as the ``best`` preset's two views, share one graph with an output ``rows_<i>`` per
member), input ``images``: uint8 ``(B, 3, S, S)`` RGB already resized to ``image_size`` (resizing
stays in the loader, :func:`patchknn.data.load_resized`, so images are decoded exactly as for the
torch model), dynamic batch axis; output ``rows`` (``rows_<i>``): float32 ``(B, grid*grid, d)``,
the vectors searched in the bank. An option the export does not reproduce is refused
(:data:`~patchknn.export.graphs.REPRODUCED_OPTIONS`). The graph holds the backbone's
normalisation, the backbone up to the deepest used layer, the pooling and resize to the grid, and
the PCA projection (layer by layer, as :meth:`PatchFeatureExtractor.project
<patchknn.features.PatchFeatureExtractor.project>`). A ``precision="bfloat16"`` model is exported
in float32 (ONNX and CPUs run float32; see docs/export.md for the measured difference).

Beside the graphs, written like a model file (safetensors + ``patchknn.json``, checksummed, never
pickle): each member's memory bank (+ IVF centroids), the configuration, the threshold, ``fit_info``
and an ensemble's member normalisation. The backbone weights live only inside the graphs; the PCA
is in the graphs too.

Example:
    >>> from patchknn.export import export_model                    # doctest: +SKIP
    >>> export_model("bottle.model", "bottle.onnx")                 # doctest: +SKIP
    >>> from patchknn.runtime import load                           # doctest: +SKIP
    >>> load("bottle.onnx").predict(["test/broken.png"])[0].score   # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from patchknn.export.graphs import EXPORT_FORMATS, export_model


def __getattr__(name: str) -> Any:
    # the graphs need torch: imported on first use, so `patchknn.export.commands` (registered on
    # the CLI) keeps `patchknn --help` free of torch
    if name in ("EXPORT_FORMATS", "export_model"):
        from patchknn.export import graphs

        return getattr(graphs, name)
    raise AttributeError(f"module 'patchknn.export' has no attribute {name!r}")


__all__ = ["EXPORT_FORMATS", "export_model"]
