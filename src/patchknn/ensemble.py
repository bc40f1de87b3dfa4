"""Ensembles of PatchKNN models (work in progress)."""

from patchknn.backbones import build_backbone  # noqa: F401


class EnsemblePatchKNN:  # placeholder, replaced below
    pass
