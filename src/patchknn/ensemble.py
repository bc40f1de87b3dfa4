"""Ensembles of backbones: one :class:`~patchknn.model.PatchKNN` per backbone, maps averaged after
normalising each member's scores on normal data.

Distances of different backbones live on different scales (ResNet-50 layer1..3 patch distances are
tens, EfficientNet-Lite2's a few units), so averaging raw maps would let one member dominate. At fit
time each member scores ``calibration_images`` of its own training images *leave-one-image-out*
(the image's own patches are taken out of the memory bank for it), and the mean and standard
deviation of those normal patch scores become the member's z-score normalisation. The ensemble's map
is the mean of the members' z-scored grids; smoothing, upsampling and the image score then follow the
shared configuration exactly as for a single model.

All members share the configuration (image size, grid, aggregation, ...), except the backbone and
its default layers, so each image is decoded once per batch and every member sees the same pixels.

Example:
    >>> from patchknn.ensemble import EnsemblePatchKNN
    >>> ens = EnsemblePatchKNN(["resnet50-caffe", "efficientnet-lite2"])    # doctest: +SKIP
    >>> ens.fit("bottle/train/good").predict(["bottle/test/broken_large/000.png"])[0].score  # doctest: +SKIP
    >>> ens.save("bottle.ensemble"); EnsemblePatchKNN.load("bottle.ensemble")  # doctest: +SKIP

Cost: the sum of the members' (backbone + search) per image, plus, at fit time, scoring the
calibration images once more per member.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from patchknn.backbones import build_backbone  # noqa: F401  (patched by benchmarks/ablation.py)
from patchknn.backbones.base import WeightsArg
from patchknn.config import PatchKNNConfig
from patchknn.data import iter_batches
from patchknn.errors import ConfigError, ModelFileError, NotFittedError
from patchknn.model import OutputSize, PatchKNN, Prediction, _as_sources, _resolve_size, _source_name
from patchknn.serialization import load_model, save_model

__all__ = ["EnsemblePatchKNN"]

ENSEMBLE_KIND = "ensemble"


class EnsemblePatchKNN:
    """Several backbones, one memory bank each; their normalised maps are averaged.

    Args:
        backbones: registered backbone names, at least two, distinct.
        config: the shared options (``backbone`` and ``layers`` are replaced per member by each
            backbone and its default layers); default: the paper's.
        weights: one weights argument for every member, or a list with one per backbone.
        **runtime: keyword-only :class:`~patchknn.model.PatchKNN` options (device, batch_size, ...).

    Attributes:
        members: the fitted :class:`PatchKNN` models, in ``backbones`` order.
        norm_: ``(n_members, 2)`` mean and standard deviation of each member's leave-one-image-out
            normal patch scores.
    """

    def __init__(
        self,
        backbones: Sequence[str] = ("resnet50-caffe", "efficientnet-lite2"),
        config: PatchKNNConfig | None = None,
        *,
        weights: WeightsArg | Sequence[WeightsArg] = None,
        **runtime: Any,
    ) -> None:
        backbones = list(backbones)
        if len(backbones) < 2 or len(set(backbones)) != len(backbones):
            raise ConfigError(f"an ensemble needs at least two distinct backbones, got {backbones}")
        config = config or PatchKNNConfig()
        if isinstance(weights, list | tuple):
            if len(weights) != len(backbones):
                raise ConfigError(f"weights: {len(weights)} given for {len(backbones)} backbones")
            member_weights = list(weights)
        else:
            member_weights = [weights] * len(backbones)
        self.config = config
        self.backbones = backbones
        self.runtime = dict(runtime)
        self.members = [
            PatchKNN.from_config(config.replace(backbone=name, layers=None), weights=w, **runtime)
            for name, w in zip(backbones, member_weights)
        ]
        self.norm_: np.ndarray | None = None
        self.threshold_: float | None = None
        self.fit_info_: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"EnsemblePatchKNN(backbones={self.backbones!r}, config={self.config!r})"

    @property
    def lead(self) -> PatchKNN:
        """The first member: its configuration drives maps and image scores."""
        return self.members[0]

    @property
    def is_fitted(self) -> bool:
        return self.norm_ is not None and all(m.is_fitted for m in self.members)

    # ------------------------------------------------------------------------------- fitting
    def fit(self, images: Sequence[Any] | str | Path) -> EnsemblePatchKNN:
        """Fit every member on the same normal images, then calibrate their normalisation."""
        sources = _as_sources(images)
        for member in self.members:
            member.fit(sources)
        n_cal = min(self.config.calibration_images or 8, len(sources))
        if len(sources) < 2:
            raise ConfigError("an ensemble needs at least two normal images to calibrate its members")
        n_cal = max(1, min(n_cal, len(sources) - 1))
        picks = np.linspace(0, len(sources) - 1, n_cal).round().astype(int)
        cal = [sources[i] for i in sorted(set(picks.tolist()))]
        self.norm_ = np.array([_loo_stats(m, cal) for m in self.members], dtype=np.float64)
        self.fit_info_ = {
            "members": [m.fit_info_ for m in self.members],
            "calibration_images": len(cal),
            "bank_size": sum(int(m.fit_info_["bank_size"]) for m in self.members),
            "n_components": sum(int(m.fit_info_["n_components"]) for m in self.members),
            "n_train_images": int(self.lead.fit_info_["n_train_images"]),
        }
        return self

    # ---------------------------------------------------------------------------- predicting
    def predict(self, images: Sequence[Any] | str | Path, output_size: OutputSize = None) -> list[Prediction]:
        """Score ``images``; one :class:`~patchknn.model.Prediction` per input, in order."""
        return list(self.predict_iter(images, output_size=output_size))

    def predict_iter(
        self, images: Sequence[Any] | str | Path, output_size: OutputSize = None
    ) -> Iterator[Prediction]:
        """Like :meth:`predict`, yielding results as batches finish."""
        self._check_fitted()
        lead = self.lead
        sources = _as_sources(images)
        batches = iter_batches(
            sources,
            image_size=self.config.image_size,
            batch_size=lead.batch_size,
            num_workers=lead.num_workers,
            on_error=lead.on_error,
        )
        names = [_source_name(s, i) for i, s in enumerate(sources)]
        reported = 0
        disable = not lead.progress or not sys.stderr.isatty()
        with tqdm(total=len(sources), desc="predict", unit="img", disable=disable, leave=False) as bar:
            for batch in batches:
                grids, weights = self.score_batch(batch.images)
                for j, i in enumerate(batch.indices):
                    yield from PatchKNN._errors_before(batches, names, reported, i)
                    reported = i + 1
                    out = _resolve_size(output_size, self.config.image_size, batch.sizes[j])
                    amap = lead.grid_to_map(grids[j], out)
                    score = lead.image_score(grids[j], amap, float(weights[j]))
                    yield Prediction(names[i], amap, score, self.threshold_)
                bar.update(len(batch.indices))
        yield from PatchKNN._errors_before(batches, names, reported, len(sources))

    @torch.inference_mode()
    def score_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``(B, 3, S, S)`` -> mean of the members' z-scored grids, and mean image weights."""
        self._check_fitted()
        total: np.ndarray | None = None
        weight_sum: np.ndarray | None = None
        for member, (mu, sd) in zip(self.members, self.norm_):  # type: ignore[arg-type]
            grids, weights = member.score_batch(images)
            z = (grids.astype(np.float64) - mu) / sd
            total = z if total is None else total + z
            weight_sum = weights if weight_sum is None else weight_sum + weights
        n = len(self.members)
        return (total / n).astype(np.float32), weight_sum / n  # type: ignore[operator]

    def score_grid(self, images: torch.Tensor) -> np.ndarray:
        """uint8 ``(B, 3, S, S)`` -> ``(B, grid, grid)`` ensemble scores (z-score units)."""
        return self.score_batch(images)[0]

    # ------------------------------------------------------------------------------- storage
    def save(self, path: str | Path) -> Path:
        """Save as a directory: ``patchknn.json`` + normalisation (safetensors) + one model per member
        in ``member-<i>/`` (each a complete :meth:`PatchKNN.save` directory)."""
        self._check_fitted()
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        for i, member in enumerate(self.members):
            member.save(root / f"member-{i}")
        meta = {
            "kind": ENSEMBLE_KIND,
            "config": self.config.to_dict(),
            "backbones": list(self.backbones),
            "members": [f"member-{i}" for i in range(len(self.members))],
            "threshold": self.threshold_,
            "fit_info": self.fit_info_,
        }
        return save_model(root, meta, {"ensemble": {"norm": np.asarray(self.norm_, dtype=np.float64)}})

    @classmethod
    def load(cls, path: str | Path, **runtime: Any) -> EnsemblePatchKNN:
        """Load a directory written by :meth:`save`; ``runtime`` = keyword-only options."""
        root = Path(path)
        doc, groups = load_model(root)
        if doc.get("kind") != ENSEMBLE_KIND:
            raise ModelFileError(f"{root}: not an ensemble model (load it with PatchKNN.load)")
        try:
            config = PatchKNNConfig.from_dict(doc["config"])
            backbones = [str(b) for b in doc["backbones"]]
            folders = [str(f) for f in doc["members"]]
            norm = np.asarray(groups["ensemble"]["norm"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"{root}: the ensemble description is missing or damaged ({e})") from e
        if len(folders) != len(backbones) or norm.shape != (len(backbones), 2):
            raise ModelFileError(f"{root}: members, backbones and normalisation disagree")
        if any(Path(f).name != f for f in folders):
            raise ModelFileError(f"{root}: member folder names must be plain names")
        ens = cls.__new__(cls)
        ens.config = config
        ens.backbones = backbones
        ens.runtime = dict(runtime)
        ens.members = [PatchKNN.load(root / f, **runtime) for f in folders]
        for name, member in zip(backbones, ens.members):
            if member.config.backbone != name:
                raise ModelFileError(f"{root}: member {member.config.backbone!r} where {name!r} was expected")
        ens.norm_ = norm
        thr = doc.get("threshold")
        ens.threshold_ = None if thr is None else float(thr)
        ens.fit_info_ = dict(doc.get("fit_info") or {})
        return ens

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError("this EnsemblePatchKNN is not fitted yet; call fit(images) or load(path)")


# ----------------------------------------------------------------------------------- helpers
@torch.inference_mode()
def _loo_stats(member: PatchKNN, images: Sequence[Any]) -> tuple[float, float]:
    """Mean and std of ``member``'s patch scores on its own training ``images``, each image scored
    without its own patches.

    An image's own patches are found in the bank as exact matches (distance ~ 0) of its patch
    vectors, so this holds whatever subsampling built the bank (a coreset keeps some of them).
    """
    bank = member.index_.bank  # type: ignore[union-attr]
    k = member.config.k
    depth = min(bank.shape[0], k + 48)
    scores: list[np.ndarray] = []
    for batch in iter_batches(images, image_size=member.config.image_size, batch_size=member.batch_size):
        feats = member._features(batch.images)
        for rows in feats:
            q = rows if member.pca_ is None else member.pca_.transform(rows)
            q = np.ascontiguousarray(q.numpy(), dtype=np.float32)
            dist, ids = faiss.knn(q, bank, depth)
            dist = np.sqrt(np.maximum(dist, 0))
            tol = 1e-2 * max(float(np.median(dist[:, -1])), 1e-12)  # float error of faiss' L2
            own = set(ids[dist[:, 0] <= tol, 0].tolist())
            keep = ~np.isin(ids, list(own)) if own else np.ones_like(ids, dtype=bool)
            out = np.empty(q.shape[0], dtype=np.float64)
            for r in range(q.shape[0]):
                d = dist[r][keep[r]][:k]
                if d.shape[0] < k:  # all near neighbours were the image's own: search the rest exactly
                    mask = np.ones(bank.shape[0], dtype=bool)
                    mask[list(own)] = False
                    full = np.sqrt(((bank[mask] - q[r]) ** 2).sum(axis=1))
                    d = np.sort(full)[:k]
                out[r] = d.mean()
            scores.append(out)
    allv = np.concatenate(scores)
    return float(allv.mean()), float(max(allv.std(), 1e-12))
