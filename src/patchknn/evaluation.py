"""Fit on a category's normal training images, score its test set, compute the paper's metrics.

Example:
    >>> from patchknn.presets import preset
    >>> from patchknn.evaluation import evaluate
    >>> results = evaluate("mvtec", ["bottle"], preset("paper"))   # doctest: +SKIP
    >>> results["categories"]["bottle"]["pixel_auprc"]             # doctest: +SKIP
    0.79

``config`` may also be :class:`AutoPreset` (``patchknn evaluate --preset auto``): per category,
:func:`patchknn.tune.tune` chooses the configuration from the category's ``train/good`` images
alone (held-out normal images with synthetic defects; the test set is never looked at), the choice
is fitted on all of them and evaluated, and the result row records the tune table (``"tune"``) and
the configuration evaluated (``"config"``).

    >>> results = evaluate("mvtec", ["bottle"], AutoPreset(budget_minutes=10))  # doctest: +SKIP
    >>> results["categories"]["bottle"]["tune"]["choice"]                       # doctest: +SKIP
    'best-single+smooth1'
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from patchknn import metrics
from patchknn._version import __version__
from patchknn.config import PatchKNNConfig
from patchknn.data import DEFAULT_MAX_PIXELS, MVTecCategory, Sample, load_mask, resize_mask
from patchknn.errors import ConfigError, DatasetError, ImageError
from patchknn.model import PatchKNN
from patchknn.presets import AUTO_PRESET as AUTO
from patchknn.presets import preset
from patchknn.tune.result import TuneResult

Resolution = Literal["input", "original"]
METRIC_KEYS = ("pixel_auprc", "pixel_auroc", "image_auroc", "aupro", "pixel_f1_max")


@dataclass(frozen=True)
class AutoPreset:
    """``--preset auto`` in an evaluation: each category's configuration is chosen by
    :func:`patchknn.tune.tune` from its ``train/good`` images only, then fitted on all of them.

    Attributes:
        budget_minutes: the search's budget per category (``tune --budget``).
        fixed: options fixed in every candidate (the method flags given with ``--preset auto``).
        max_fit_images: fit the candidates on at most this many images (``None``: all).
    """

    budget_minutes: float = 10.0
    fixed: Mapping[str, Any] = field(default_factory=dict)
    max_fit_images: int | None = None

    def __post_init__(self) -> None:
        if not self.budget_minutes > 0:
            raise ConfigError(f"--budget must be a positive number of minutes, got {self.budget_minutes}")
        preset("paper", **self.fixed)  # the fixed options are checked now, not after a category's search

    @property
    def seed(self) -> int:
        """The seed of the split, the defects and every candidate (the fixed ``seed``, else 0)."""
        return int(self.fixed.get("seed", 0) or 0)

    def to_dict(self) -> dict[str, Any]:
        """The ``config`` entry of the results document."""
        fixed = {k: list(v) if isinstance(v, tuple) else v for k, v in self.fixed.items()}
        return {"preset": AUTO, "budget_minutes": self.budget_minutes, "fixed": fixed,
                "max_fit_images": self.max_fit_images}

    def choose(self, sources: list[Any], desc: str = "tune", **runtime: Any) -> TuneResult:
        """Run :func:`patchknn.tune.tune` on ``sources`` (normal images); the
        :class:`~patchknn.tune.result.TuneResult`. A progress bar counts the candidates scored
        (on a terminal, unless ``progress=False``)."""
        from patchknn.execution import progress_bar
        from patchknn.tune.candidates import default_candidates
        from patchknn.tune.search import tune

        candidates = default_candidates({"seed": self.seed, **self.fixed})
        with progress_bar(len(candidates), desc, runtime.get("progress", True), unit="candidate") as bar:
            return tune(sources, budget_minutes=self.budget_minutes, seed=self.seed, candidates=candidates,
                        max_fit_images=self.max_fit_images, on_group=lambda rows: bar.update(len(rows)),
                        **{**runtime, "progress": False})


def evaluation_config(
    preset_name: str, overrides: Mapping[str, Any] | None = None, *, budget_minutes: float = 10.0,
    max_fit_images: int | None = None,
) -> PatchKNNConfig | AutoPreset:
    """What ``patchknn evaluate --preset NAME`` evaluates: the preset with ``overrides``, or for
    ``auto`` an :class:`AutoPreset` with ``overrides`` fixed in every candidate (``max_fit_images``:
    its candidates' fits, see :func:`patchknn.tune.tune`)."""
    if preset_name == AUTO:
        return AutoPreset(budget_minutes, dict(overrides or {}), max_fit_images=max_fit_images)
    return preset(preset_name, **dict(overrides or {}))


@cache
def paper_table2() -> dict[str, float]:
    """The paper's Table 2 (ResNet kNN column): pixel AUPRC per MVTec AD category, plus ``mean``."""
    text = resources.files("patchknn.resources").joinpath("paper_table2.json").read_text()
    data = json.loads(text)
    return {**data["categories"], "mean": data["mean"]}


@dataclass
class CategoryEvaluation:
    """Everything one category's evaluation produced.

    Attributes:
        category: the category name.
        metrics: the result row (metrics, counts, timings; see :func:`evaluate`).
        samples: the test samples, in the order of the arrays.
        maps: ``(N, H, W)`` float32 anomaly maps at the evaluation resolution.
        masks: ``(N, H, W)`` bool ground truth (all False for good images).
        scores: ``(N,)`` image scores.
        labels: ``(N,)`` 1 = defective.
        model: the fitted model.
    """

    category: str
    metrics: dict[str, Any]
    samples: list[Sample]
    maps: np.ndarray
    masks: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    model: PatchKNN = field(repr=False)


def evaluate_category(
    root: str | Path,
    category: str,
    config: PatchKNNConfig | AutoPreset,
    *,
    resolution: Resolution = "input",
    fpr_limit: float = 0.3,
    **runtime: Any,
) -> CategoryEvaluation:
    """Fit ``config`` on ``<root>/<category>/train/good`` and evaluate on its test set.

    Args:
        root: MVTec-AD-style data root.
        category: category folder name.
        config: the method's configuration, or :class:`AutoPreset`: ``patchknn tune`` chooses it
            from the ``train/good`` images alone (the model's ``fit_info_["tune"]`` and the row's
            ``"tune"`` record the table; ``tune_seconds`` the search's time).
        resolution: ``"input"`` compares maps and masks at ``image_size`` (masks resized with
            nearest neighbour, the default); ``"original"`` at each image's own resolution.
        fpr_limit: the false-positive-rate limit of AUPRO.
        **runtime: keyword-only :class:`PatchKNN` options (weights, device, batch_size, ...).
    """
    _check_resolution(resolution)
    dataset = MVTecCategory(root, category)
    dataset.validate(max_pixels=runtime.get("max_pixels", DEFAULT_MAX_PIXELS))
    train = dataset.train_paths()
    tuned, tune_seconds = None, None
    if isinstance(config, AutoPreset):
        t0 = time.perf_counter()
        tuned = config.choose(train, f"tune {category}", **runtime)  # train/good only: never the test set
        tune_seconds = time.perf_counter() - t0
        config = tuned.config
    model = PatchKNN.from_config(config, **runtime)
    t0 = time.perf_counter()
    model.fit(train)
    fit_seconds = time.perf_counter() - t0
    if tuned is not None:
        model.fit_info_["tune"] = tuned.to_dict()  # as `fit --preset auto` records it
    ev = score_category(model, dataset, resolution=resolution, fpr_limit=fpr_limit)
    ev.metrics["fit_seconds"] = round(fit_seconds, 3)
    if tune_seconds is not None:
        ev.metrics["tune_seconds"] = round(tune_seconds, 3)
    return ev


def _check_resolution(resolution: str) -> None:
    if resolution not in ("input", "original"):
        raise DatasetError(f"resolution must be 'input' or 'original', got {resolution!r}")


def score_category(
    model: PatchKNN,
    dataset: MVTecCategory,
    *,
    resolution: Resolution = "input",
    fpr_limit: float = 0.3,
) -> CategoryEvaluation:
    """Score a category's test set with an already fitted ``model`` and compute the metrics
    (the second half of :func:`evaluate_category`; ``fit_seconds`` is left out of the row)."""
    _check_resolution(resolution)
    config, category = model.config, dataset.category
    samples = dataset.test_samples()

    t1 = time.perf_counter()
    output = "input" if resolution == "input" else "original"
    preds = model.predict([s.path for s in samples], output_size=output)
    predict_seconds = time.perf_counter() - t1
    failed = next((p for p in preds if p.error is not None), None)  # on_error="skip": metrics need all
    if failed is not None:
        raise ImageError(failed.source, f"{failed.error} (a test image cannot be skipped in an evaluation)")

    maps = np.stack([p.anomaly_map for p in preds])  # type: ignore[misc]
    masks = np.stack(
        [_mask_for(s, m.shape, resolution, config.image_size, model.max_pixels) for s, m in zip(samples, maps)]
    )
    scores = np.array([p.score for p in preds], dtype=np.float64)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    row: dict[str, Any] = dict(metrics.compute_all(maps, masks, scores, labels, fpr_limit=fpr_limit))
    paper = paper_table2().get(category)
    row |= {
        "paper_pixel_auprc": paper,
        "n_train": int(model.fit_info_["n_train_images"]),
        "n_test": len(samples),
        "n_test_defective": int(labels.sum()),
        "predict_images_per_second": round(len(samples) / max(predict_seconds, 1e-9), 3),
        "bank_size": int(model.fit_info_["bank_size"]),
        "n_components": int(model.fit_info_["n_components"]),
        "resolution": resolution,
    }
    # the calibrated decision threshold (normal images only) beside the F1-optimal one
    # (image_f1_threshold, which needs the test labels), and how the calibrated one decides
    from patchknn.metrics.decision import threshold_metrics

    row["threshold"] = model.threshold_
    row |= threshold_metrics(maps, masks, scores, labels, model.threshold_)
    f1, f1_max = row.get("threshold_image_f1"), row.get("image_f1_max")  # calibration gap (issue 12)
    row["calibration_gap"] = None if f1 is None or f1_max is None else float(f1_max - f1)
    tuned = model.fit_info_.get("tune")
    if tuned is not None:  # a model whose configuration `patchknn tune` chose (fit --preset auto)
        row["config"] = config.to_dict()
        row["tune"] = tuned
    return CategoryEvaluation(category, row, samples, maps, masks, scores, labels, model)


def _mask_for(
    sample: Sample, shape: tuple[int, ...], resolution: Resolution, image_size: int,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    if sample.mask_path is None:
        return np.zeros(shape, dtype=bool)
    mask = load_mask(sample.mask_path, max_pixels=max_pixels)
    if resolution == "input":
        return resize_mask(mask, (image_size, image_size))
    if mask.shape != tuple(shape):
        raise DatasetError(
            f"{sample.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
            f"{sample.path} is {shape[1]}x{shape[0]}"
        )
    return mask


def evaluate(
    root: str | Path,
    categories: list[str],
    config: PatchKNNConfig | AutoPreset,
    *,
    resolution: Resolution = "input",
    fpr_limit: float = 0.3,
    on_category: Any = None,
    **runtime: Any,
) -> dict[str, Any]:
    """Evaluate several categories; returns the ``results.json`` document.

    ``{"config": {...}, "categories": {name: row}, "mean": {metric: mean over categories}}``.
    ``on_category(CategoryEvaluation)`` is called after each category (e.g. to write a report).
    With :class:`AutoPreset`, ``config`` is its :meth:`AutoPreset.to_dict` and each row holds the
    configuration ``tune`` chose for that category (``"config"``) and the tune table (``"tune"``).
    """
    if not categories:
        raise DatasetError("no category to evaluate")
    rows: dict[str, dict[str, Any]] = {}
    import sys

    from tqdm.auto import tqdm

    hide = len(categories) < 2 or not runtime.get("progress", True) or not sys.stderr.isatty()
    for name in tqdm(categories, desc="evaluate", unit="category", disable=hide):
        ev = evaluate_category(root, name, config, resolution=resolution, fpr_limit=fpr_limit, **runtime)
        rows[name] = ev.metrics
        if on_category is not None:
            on_category(ev)
    return results_document(config.to_dict(), resolution, rows)


def evaluate_model(
    model: PatchKNN,
    root: str | Path,
    categories: list[str],
    *,
    resolution: Resolution = "input",
    fpr_limit: float = 0.3,
    on_category: Any = None,
) -> dict[str, Any]:
    """:func:`evaluate` of an already fitted (e.g. saved and loaded) ``model``: no fit, its own
    threshold and options; each category's test set is scored and the same document returned
    (``"model_fit_info"``: the model's training record, so the report names what was evaluated)."""
    if not categories:
        raise DatasetError("no category to evaluate")
    rows: dict[str, dict[str, Any]] = {}
    for name in categories:
        dataset = MVTecCategory(root, name)
        dataset.validate(max_pixels=model.max_pixels)
        ev = score_category(model, dataset, resolution=resolution, fpr_limit=fpr_limit)
        rows[name] = ev.metrics
        if on_category is not None:
            on_category(ev)
    doc = results_document(model.config.to_dict(), resolution, rows)
    doc["model_fit_info"] = {k: v for k, v in model.fit_info_.items() if k != "tune"}
    return doc


def results_document(config: dict[str, Any], resolution: str, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``results.json`` document of per-category rows (with their mean)."""
    return {
        "patchknn_version": __version__,
        "config": config,
        "resolution": resolution,
        "categories": rows,
        "mean": mean_row(rows),
    }


def mean_row(rows: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Mean of each metric over the categories where it is defined."""
    out: dict[str, float | None] = {}
    keys = list(METRIC_KEYS) + ["fit_seconds", "predict_images_per_second"]
    keys += ["image_f1_max", "threshold_image_precision", "threshold_image_recall", "threshold_image_f1",
             "threshold_pixel_f1", "calibration_gap"]
    for key in keys:
        vals = [r[key] for r in rows.values() if r.get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
    paper = [r.get("paper_pixel_auprc") for r in rows.values()]
    out["paper_pixel_auprc"] = float(np.mean(paper)) if paper and None not in paper else None
    return out


def markdown_table(results: dict[str, Any]) -> str:
    """Pixel AUPRC per category beside the paper's Table 2, plus the other metrics."""
    head = (
        "| category | pixel AUPRC | paper (Table 2) | diff | pixel AUROC | AUPRO@0.3 | image AUROC | pixel F1-max |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for name, row in [*results["categories"].items(), ("mean", results["mean"])]:
        paper = row.get("paper_pixel_auprc")
        ours = row.get("pixel_auprc")
        diff = f"{ours - paper:+.3f}" if ours is not None and paper is not None else "–"
        cells = [
            f"**{name}**" if name == "mean" else name,
            _fmt(ours),
            _fmt(paper),
            diff,
            _fmt(row.get("pixel_auroc")),
            _fmt(row.get("aupro")),
            _fmt(row.get("image_auroc")),
            _fmt(row.get("pixel_f1_max")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    chosen = [(name, row["tune"]) for name, row in results["categories"].items() if row.get("tune")]
    if chosen:
        lines.append("")
    for name, tuned in chosen:
        n_scored = sum(r.get("status") == "scored" for r in tuned.get("rows", []))
        lines.append(f"{name}: tune chose {tuned.get('choice')} from normal training images only "
                     f"({n_scored} of {len(tuned.get('rows', []))} candidates scored)")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"
