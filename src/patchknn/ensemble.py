"""Ensembles: several :class:`~patchknn.model.PatchKNN` members (different backbones, or the same
backbone with different feature options), their maps averaged after normalising each member's
scores on normal data.

Distances of different members live on different scales (ResNet-50 layer1..3 patch distances are
tens, EfficientNet-Lite2's a few units, L2-normalised layers below one), so averaging raw maps would
let one member dominate. At fit time each member scores a few of its own training images
*leave-one-image-out* (the image's own patches are taken out of the memory bank for it); the mean
and standard deviation of those normal patch scores become the member's z-score normalisation. The
ensemble's grid is the mean of the members' z-scored grids (weighted with ``ensemble_weights="auto"``:
:mod:`patchknn.member_weights`, which also owns the combination); upsampling, smoothing and the image
score then follow the shared configuration exactly as for a single model. The same held-out ensemble
scores calibrate the ensemble's decision threshold (``threshold_method``, as for one model).

Members share the input (image size and grid): each image is decoded once per batch, and members
that use the same backbone network (same name, layers and weights) share one backbone pass.

Members are given as backbone names or as dictionaries of options that replace the shared ones::

    EnsemblePatchKNN(["resnet50-keras", "efficientnet-lite2"])              # two backbones
    EnsemblePatchKNN([{}, {"layer_norm": True}], preset("best"))            # one backbone, two views

A member that changes the backbone gets that backbone's default layers unless it names ``layers``.

Example:
    >>> from patchknn.ensemble import EnsemblePatchKNN
    >>> ens = EnsemblePatchKNN(["resnet50-keras", "efficientnet-lite2"])    # doctest: +SKIP
    >>> ens.fit("bottle/train/good").predict(["bottle/test/broken_large/000.png"])[0].score  # doctest: +SKIP
    >>> ens.save("bottle.ensemble"); EnsemblePatchKNN.load("bottle.ensemble")  # doctest: +SKIP

Cost per image: every distinct backbone pass plus every member's search; at fit time, scoring the
calibration images once more per member.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from patchknn import member_weights, scoring
from patchknn.backbones.base import WeightsArg
from patchknn.bank import fitted_images, training_store, with_train_flips
from patchknn.calibration_defects import DefectSources
from patchknn.config import ENSEMBLE_SHARED, PatchKNNConfig, member_spec, network_options
from patchknn.data import as_sources
from patchknn.errors import ConfigError, ModelFileError, NotFittedError
from patchknn.kinds import register_model_kind
from patchknn.model import IndexFactory, PatchKNN
from patchknn.serialization import load_model, read_meta, save_model

__all__ = ["EnsemblePatchKNN", "member_configs"]

ENSEMBLE_KIND = "ensemble"
MemberSpec = str | Mapping[str, Any]


def member_configs(config: PatchKNNConfig, members: Sequence[MemberSpec]) -> list[PatchKNNConfig]:
    """The configuration of each member: ``config`` with the member's options applied.

    Example:
        >>> from patchknn.presets import preset
        >>> [c.backbone for c in member_configs(preset("paper"), ["resnet50-keras", "efficientnet-lite2"])]
        ['resnet50-keras', 'efficientnet-lite2']
        >>> [c.layer_norm for c in member_configs(preset("paper"), [{}, {"layer_norm": True}])]
        [False, True]
    """
    base = config.replace(ensemble=())
    out = []
    for spec in members:
        opts = {"backbone": spec} if isinstance(spec, str) else dict(spec)
        bad = sorted(set(opts) & set(ENSEMBLE_SHARED))
        if bad:
            raise ConfigError(f"ensemble members share {list(ENSEMBLE_SHARED)}; a member may not set {bad}")
        out.append(base.replace(**network_options(opts, base.backbone)))
    if len(out) < 2:
        raise ConfigError(f"an ensemble needs at least two distinct members, got {list(members)}")
    try:  # the main configuration with the others as `ensemble` strings checks they all differ
        out[0].replace(ensemble=tuple(member_spec(out[0], c) for c in out[1:]))
    except ConfigError as e:
        raise ConfigError(f"an ensemble needs at least two distinct members: {e}") from None
    return out


class EnsemblePatchKNN(PatchKNN):
    """Several members, one memory bank each; their normalised maps are averaged.

    A :class:`~patchknn.model.PatchKNN` (same ``fit`` / ``predict`` / ``save`` / ``load``) whose
    :attr:`config` is the first member's configuration with the others in ``config.ensemble``;
    ``PatchKNN.from_config`` / ``from_preset`` / ``load`` return one for such configurations.

    Args:
        members: backbone names and/or dictionaries of options that replace ``config``'s (see the
            module docstring); at least two, all different. ``None`` = ``config.ensemble_members()``.
        config: the shared options (default: the paper's).
        weights: a list with one weights argument per member, or one argument: ``None``/``"random"``
            for every member, or a file for the members on the first member's backbone (the others
            use their default weights).
        **runtime: keyword-only :class:`~patchknn.model.PatchKNN` options (device, batch_size, ...).

    Attributes:
        members: the member :class:`PatchKNN` models, in order.
        norm_: ``(n_members, 2)`` mean and standard deviation of each member's leave-one-image-out
            normal patch scores.
        member_weights_: ``(n_members,)`` the members' weights in the combined grid (all 1 with
            ``ensemble_weights="equal"``; chosen at fit with ``"auto"``, see
            :mod:`patchknn.member_weights`); a member weighted 0 is not scored.
        threshold_: decision threshold on the ensemble's image score (``None`` = no decision).
    """

    _is_ensemble = True

    def __init__(
        self,
        members: Sequence[MemberSpec] | None = ("resnet50-keras", "efficientnet-lite2"),
        config: PatchKNNConfig | None = None,
        *,
        weights: WeightsArg | Sequence[WeightsArg] = None,
        **runtime: Any,
    ) -> None:
        config = config or PatchKNNConfig()
        configs = config.ensemble_members() if members is None else member_configs(config, list(members))
        if len(configs) < 2:
            raise ConfigError("an ensemble needs at least two distinct members; the configuration has one")
        if isinstance(weights, list | tuple):
            if len(weights) != len(configs):
                raise ConfigError(f"weights: {len(weights)} given for {len(configs)} members")
            net_weights = list(weights)
        elif weights is None or str(weights).startswith("random"):
            net_weights = [weights] * len(configs)
        else:
            # a weights file belongs to one network: the members on the first member's backbone use it,
            # the others their own default weights (e.g. the packaged EfficientNet-Lite2 file)
            net_weights = [weights if c.backbone == configs[0].backbone else None for c in configs]
        full = configs[0].replace(ensemble=tuple(member_spec(configs[0], c) for c in configs[1:]))
        super().__init__(**full.as_kwargs(), weights=net_weights[0], **runtime)
        self.runtime = dict(runtime)
        # members need no threshold of their own: the ensemble calibrates one on its own scores
        self.members = [
            PatchKNN.from_config(c.replace(threshold_method="none"), weights=w, **runtime)
            for c, w in zip(configs, net_weights)
        ]
        self.norm_: np.ndarray | None = None
        self.member_weights_: np.ndarray | None = None

    @classmethod
    def from_config(cls, config: PatchKNNConfig, **runtime: Any) -> EnsemblePatchKNN:
        """The ensemble of ``config.ensemble_members()``."""
        return cls(None, config, **runtime)

    @property
    def backbones(self) -> list[str]:
        return [m.config.backbone for m in self.members]

    @property
    def lead(self) -> PatchKNN:
        """The first member (the main configuration)."""
        return self.members[0]

    @property
    def extractor(self) -> Any:
        """The first member's backbone + grid resampling."""
        return self.lead.extractor

    @property
    def is_fitted(self) -> bool:
        return self.norm_ is not None and self.member_weights_ is not None and all(m.is_fitted for m in self.members)

    # ------------------------------------------------------------------------------- fitting
    def fit(self, images: Sequence[Any] | str | Path) -> EnsemblePatchKNN:
        """Fit every member on the same normal images, then calibrate normalisation and threshold."""
        t0 = time.perf_counter()
        sources = as_sources(images)
        if len(sources) < 2:
            raise ConfigError("an ensemble needs at least two normal images to calibrate its members")
        stores, _, kept = self._member_stores(sources, "fit")
        cfg = self.config
        auto = cfg.ensemble_weights == "auto"  # their masks choose the weights
        defects = DefectSources(kept, masks=auto) if cfg.threshold_method == "defects" or auto else None  # made once
        for member, store in zip(self.members, stores):
            member.fit_store(store, t0, keep_held_out=True, sources=defects)
        return self._calibrate(t0, defects)

    def partial_fit(self, images: Sequence[Any] | str | Path) -> EnsemblePatchKNN:
        """Add normal ``images`` to every member exactly (:meth:`PatchKNN.partial_fit`: each member
        equals a fit on the old and new images with its old PCA), then recalibrate the members'
        normalisation and the threshold by :meth:`fit`'s rule on the members' new held-out grids."""
        self._check_fitted()
        t0 = time.perf_counter()
        sources = as_sources(images)
        stores, names, _ = self._member_stores(sources, "partial_fit")
        old = self.fit_info_
        for member, store in zip(self.members, stores):
            member.extend_store(store, names, t0, keep_held_out=True)
        self._calibrate(t0)
        n = int(self.fit_info_["n_train_images"])
        self.fit_info_ |= {
            "fit_seconds": old.get("fit_seconds"),
            "partial_fit_seconds": round(time.perf_counter() - t0, 3),
            "added": {"names": names, "count": n - int(old.get("n_train_images", 0))},
        }
        return self

    def _member_stores(self, sources: list[Any], what: str) -> tuple[list[Any], list[str], list[Any]]:
        """Every member's training store of ``sources``, the names and sources of the images in them
        (``skipped_`` set on all, for the unreadable ones left out): one decoding
        pass for all members, and one backbone pass per distinct network (members on the same
        network read the maps it computed for the batch, :class:`_SharedBackbone`)."""
        if not sources:
            raise ConfigError(f"{what} needs at least one normal image")
        self._share_backbones()
        lead = self.lead
        stores = [training_store(m, len(sources)) for m in self.members]
        batches = lead.batches(sources)  # members share image_size
        try:
            with lead.progress_bar(len(sources), f"{what}: features") as bar:
                for batch in batches:
                    # one tensor: the shared backbones see the same input (members share train_flips)
                    images = with_train_flips(batch.images.to(lead.device), self.config.train_flips)
                    for member, store in zip(self.members, stores):
                        store.add(*member.fit_features(images))
                    bar.update(len(batch.indices))
        finally:
            _SharedBackbone.forget_all(self.members)
        errors = getattr(batches, "errors", [])
        self.skipped_ = [(src, reason) for _, src, reason in errors]
        for member in self.members:
            member.skipped_ = list(self.skipped_)
        return stores, *fitted_images(sources, errors)

    def _calibrate(self, t0: float, defects: DefectSources | None = None) -> EnsemblePatchKNN:
        """The members' normalisation and weights and the ensemble's threshold from the members'
        held-out grids of the same images, by the folds (and coreset replacements) of the single
        model's calibration (:func:`patchknn.threshold.held_out_grids`). ``defects``: the synthetic
        defects made on them (their masks choose ``ensemble_weights="auto"``; without them, as in
        :meth:`partial_fit`, the weights stay as they were)."""
        held = [m.__dict__.pop("held_out_") for m in self.members]
        cal = held[0].images
        if not cal:
            raise ConfigError("an ensemble needs calibration_images >= 1 to normalise its members")
        self.norm_ = np.array([(h.grids.mean(), max(h.grids.std(), 1e-12)) for h in held], dtype=np.float64)
        weighting = self._choose_weights(held, cal, defects)

        def combined(grids: list[np.ndarray]) -> np.ndarray:  # the members' z-scored grids, weighed
            return member_weights.combine(
                grids, self.norm_, self.member_weights_, *member_weights.member_highpass(self.members),  # type: ignore[arg-type]
            )

        z = combined([h.grids for h in held])
        scores = np.array([scoring.image_score(g, self.config) for g in z])
        made = None
        if len(held[0].defect_grids):
            made = np.array([scoring.image_score(g, self.config) for g in combined([h.defect_grids for h in held])])
        from patchknn.threshold import IMAGE_QUANTILES, PATCH_QUANTILES, summarize, threshold_for

        self.threshold_, defects_info = None, {}
        if self.config.threshold_method != "none":
            operating = (getattr(self, "fit_info_", None) or {}).get("calibration", {}).get("defects_quantile")
            self.threshold_, defects_info = threshold_for(self.config, scores, made, operating_quantile=operating)
        calibration = {
            "method": self.config.threshold_method,
            "threshold": self.threshold_,
            "n_images": len(cal),
            "image_scores": [round(float(v), 6) for v in scores],
            "units": "mean of the members' z-scores" if weighting["method"] == "equal" else
                     "weighted mean of the members' z-scores",
            "image": summarize(scores, IMAGE_QUANTILES),
            "patch": summarize(z.ravel(), PATCH_QUANTILES),
            "member_weights": weighting,
        } | defects_info
        infos = [m.fit_info_ for m in self.members]
        self.fit_info_ = {
            "n_train_images": int(infos[0]["n_train_images"]),
            "n_skipped": len(self.skipped_),
            "bank_size": sum(int(i["bank_size"]) for i in infos),
            "n_components": sum(int(i["n_components"]) for i in infos),
            "fit_seconds": round(time.perf_counter() - t0, 3),
            "members": infos,
            "calibration": calibration,
            "weights_id": [str(i.get("weights_id", "unknown")) for i in infos],
        }
        return self

    def _choose_weights(self, held: list[Any], cal: list[int], defects: DefectSources | None) -> dict[str, Any]:
        """Set :attr:`member_weights_` by ``config.ensemble_weights``; returns its record for
        ``fit_info_["calibration"]["member_weights"]`` (method, weights, the candidates' table)."""
        n = len(self.members)
        previous = self.member_weights_
        if self.config.ensemble_weights != "auto":
            self.member_weights_ = member_weights.equal_weights(n)
            return {"method": "equal", "weights": self.member_weights_.tolist()}
        masks = None if defects is None else defects.masks_of(self.config.seed, cal)
        if masks is None or not len(held[0].defect_grids):  # partial_fit: no new defects, keep the weights
            self.member_weights_ = member_weights.equal_weights(n) if previous is None else previous
            old = (getattr(self, "fit_info_", None) or {}).get("calibration", {}).get("member_weights", {})
            return {"method": "auto", "weights": self.member_weights_.tolist(),
                    "candidates": old.get("candidates", []), "kept": True}
        self.member_weights_, table = member_weights.choose_weights(
            [h.grids for h in held], [h.defect_grids for h in held], masks, self.norm_, self.config,
            kinds=DefectSources.kinds_of(cal), highpass=member_weights.member_highpass(self.members)[0],
        )
        return {"method": "auto", "weights": self.member_weights_.tolist(), "candidates": table}

    # ---------------------------------------------------------------------------- predicting
    @torch.inference_mode()
    def score_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``(B, 3, S, S)`` -> mean of the members' z-scored grids, and mean image weights.

        :meth:`predict` / :meth:`predict_iter` (inherited) turn them into maps and scores exactly
        as for one model."""
        self._check_fitted()
        self._share_backbones()
        try:  # a member weighted 0 is not scored
            return member_weights.score_members(
                lambda m: m.score_batch(images), self.members, self.norm_, self.member_weights_,  # type: ignore[arg-type]
            )
        finally:
            _SharedBackbone.forget_all(self.members)

    # ------------------------------------------------------------------------------- storage
    def save(self, path: str | Path, *, training: bool = True) -> Path:
        """Save as a directory: ``patchknn.json`` (kind ``ensemble``) + the normalisation
        (safetensors) + one complete :meth:`PatchKNN.save` directory per member.

        Atomic as a whole: the members go to new folders (``member-<i>-<token>``) and only then
        does ``patchknn.json``, replaced in one step, point to them; a reader sees the previous
        ensemble or this one, never a mix. The previous members' folders are removed afterwards.
        ``training``: as in :meth:`PatchKNN.save`, for every member.
        """
        self._check_fitted()
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(4)
        folders = [f"member-{i}-{token}" for i in range(len(self.members))]
        for folder, member in zip(folders, self.members):
            member.save(root / folder, training=training)
        meta = {
            "kind": ENSEMBLE_KIND,
            "config": self.config.to_dict(),
            "backbones": self.backbones,
            "members": folders,
            "threshold": self.threshold_,
            "fit_info": self.fit_info_,
        }
        tensors = {
            "norm": np.asarray(self.norm_, dtype=np.float64),
            "weights": np.asarray(self.member_weights_, dtype=np.float64),
        }
        out = save_model(root, meta, {"ensemble": tensors})
        for old in root.glob("member-*"):  # the previous save's members, now unreferenced
            if old.is_dir() and old.name not in folders:
                shutil.rmtree(old, ignore_errors=True)
        return out

    @classmethod
    def load(cls, path: str | Path, *, index: IndexFactory | None = None, **runtime: Any) -> EnsemblePatchKNN:
        """Load a directory written by :meth:`save`; ``runtime`` = keyword-only options; ``index``
        as in :meth:`PatchKNN.load`, called for each member."""
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
        except ConfigError as e:
            raise ModelFileError(f"{root}: the saved configuration is not usable here: {e}") from e
        expected = config.ensemble_members() if config.ensemble else []
        if not (len(folders) == len(backbones) == len(expected)) or norm.shape != (len(folders), 2):
            raise ModelFileError(f"{root}: members, configuration and normalisation disagree")
        weights = member_weights.saved_weights(groups["ensemble"], len(folders), f"{root}: ")
        if any(Path(f).name != f for f in folders):
            raise ModelFileError(f"{root}: member folder names must be plain names")
        try:
            members = [PatchKNN.load(root / f, index=index, **runtime) for f in folders]
        except ModelFileError:
            if all((root / f).is_dir() for f in folders) or read_meta(root).get("members") == folders:
                raise
            # a member folder went away because a newer save (or version switch) replaced the
            # ensemble meanwhile: read that one (as load_model does for a single model's files)
            return cls.load(path, index=index, **runtime)
        for m, want in zip(members, expected):
            if m.config != want.replace(threshold_method="none"):
                raise ModelFileError(f"{root}: member {m.config.backbone!r} does not match the ensemble's options")
        ens = cls(None, config, **{"weights": "random", **runtime})
        ens.members = members
        ens.norm_ = norm
        ens.member_weights_ = weights
        thr = doc.get("threshold")
        ens.threshold_ = None if thr is None else float(thr)
        ens.fit_info_ = dict(doc.get("fit_info") or {})
        return ens

    # ------------------------------------------------------------------------------- helpers
    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError("this EnsemblePatchKNN is not fitted yet; call fit(images) or load(path)")

    def _share_backbones(self) -> None:
        """Members with the same backbone network use one module that remembers its last batch."""
        seen: dict[tuple[Any, ...], _SharedBackbone] = {}
        for m in self.members:
            ext = m.extractor
            net = ext.backbone
            inner = net.inner if isinstance(net, _SharedBackbone) else net
            cfg = m.config
            key = (cfg.backbone, tuple(cfg.resolved_layers), cfg.precision, repr(m.weights), _state_key(inner))
            if key in seen:
                ext.backbone = seen[key]
            else:
                shared = net if isinstance(net, _SharedBackbone) else _SharedBackbone(inner)
                ext.backbone = seen[key] = shared


class _SharedBackbone(nn.Module):
    """A backbone that returns its previous result when called again on the very same tensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self._last: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["inner"], name)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        last = self._last
        if last is not None and last[0] is images:
            return last[1]
        out = self.inner(images)
        self._last = (images, out)
        return out

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # saved like the plain network
        return self.inner.state_dict(*args, **kwargs)

    @staticmethod
    def forget_all(members: Sequence[PatchKNN]) -> None:
        for m in members:
            net = m.extractor.backbone
            if isinstance(net, _SharedBackbone):
                net._last = None


def _state_key(net: nn.Module) -> tuple[Any, ...]:
    """Identity of a network's weights: same object, or the same weights provenance."""
    wid = str(getattr(net, "weights_id", "") or "")
    return (wid,) if wid and not wid.startswith("random") else (id(net),)


register_model_kind(ENSEMBLE_KIND, EnsemblePatchKNN)
