"""The report page: one self-contained HTML file per run (works offline, no scripts, no fonts).

The markup is the Jinja2 template ``templates/report.html.j2`` (with ``templates/report.css``),
rendered with autoescape: every name, path and value from the results is escaped. This module
turns the results and the per-category report data into the template's values (numbers
formatted, plots drawn, image paths made relative to the page).

Layout: the summary and the metrics table (every category beside the paper's Table 2, the
calibrated and the F1-optimal thresholds and how the calibrated one decides), the configuration,
then per category: thresholds and calibration statistics, four plots (pixel precision-recall,
ROC, PRO, image-score histogram; embedded as base64 PNG) and a gallery (worst false positives,
worst misses, best detections: input | ground truth | heat map, files under ``assets/``).

Every metric in the table carries its exact value: ``<td data-metric="bottle/pixel_auprc"
data-value="0.7812...">``, so the page can be checked against ``results.json``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

from patchknn.errors import PatchKNNError
from patchknn.report import plots
from patchknn.report.layout import ASSETS, GALLERY_KINDS, GALLERY_TITLES, ReportError, load_category_data, safe_name

#: (key, header, tooltip) of the two metrics tables, in order.
PROTOCOL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("pixel_auprc", "pixel AUPRC", "area under the pooled pixel precision-recall curve"),
    ("paper_pixel_auprc", "paper (Table 2)", "the paper's pixel AUPRC (ResNet kNN column)"),
    ("pixel_auroc", "pixel AUROC", "area under the pooled pixel ROC curve"),
    ("aupro", "AUPRO@0.3", "area under the per-region-overlap curve up to FPR 0.3, normalised"),
    ("image_auroc", "image AUROC", "area under the image-score ROC curve"),
    ("pixel_f1_max", "pixel F1-max", "best pooled pixel F1 over all thresholds"),
)
DECISION_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("threshold", "calibrated threshold", "decision threshold calibrated on held-out normal training images"),
    ("threshold_image_precision", "image precision", "image precision at the calibrated threshold"),
    ("threshold_image_recall", "image recall", "image recall at the calibrated threshold"),
    ("threshold_image_f1", "image F1", "image F1 at the calibrated threshold"),
    ("threshold_pixel_f1", "pixel F1", "pooled pixel F1 of the mask map >= calibrated threshold"),
    ("image_f1_threshold", "F1-optimal threshold", "image threshold with the best F1 (uses the test labels)"),
    ("image_f1_max", "image F1 there", "image F1 at the F1-optimal threshold (the best possible)"),
)
TABLE_COLUMNS = PROTOCOL_COLUMNS + DECISION_COLUMNS
THRESHOLD_KEYS = {"threshold", "image_f1_threshold"}


def write_report(
    results_path: str | Path,
    output: str | Path | None = None,
    *,
    assets: str | Path | None = None,
    title: str | None = None,
    progress: bool = True,
) -> Path:
    """Write the HTML page for a ``results.json`` (and its ``assets/`` folder, when there is one).

    Args:
        results_path: a results document written by ``patchknn evaluate``.
        output: the HTML file; default ``index.html`` next to the results file.
        assets: the folder with ``<category>.json`` report data; default ``assets/`` next to the
            results file. Categories without data get their table row only.
        title: page title.
        progress: progress bar over the categories (only when stderr is a terminal).

    Returns:
        The path of the page.
    """
    results_path = Path(results_path)
    try:
        results = json.loads(results_path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{results_path}: cannot read the results file ({e})") from e
    if not isinstance(results, dict) or not isinstance(results.get("categories"), dict):
        raise ReportError(f"{results_path}: not a patchknn results file (no 'categories')")
    output = Path(output) if output is not None else results_path.parent / "index.html"
    assets_dir = Path(assets) if assets is not None else results_path.parent / ASSETS
    output.parent.mkdir(parents=True, exist_ok=True)
    page = render(results, assets_dir, output.parent, title=title, progress=progress)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, output)
    return output


def render(
    results: dict[str, Any],
    assets_dir: Path,
    page_dir: Path,
    *,
    title: str | None = None,
    progress: bool = True,
) -> str:
    """The page as a string; image paths are made relative to ``page_dir``."""
    from tqdm.auto import tqdm

    categories = list(results["categories"])
    title = title or f"patchknn report: {', '.join(categories[:4])}{' …' if len(categories) > 4 else ''}"
    sections: list[dict[str, Any]] = []
    disable = not progress or not sys.stderr.isatty()
    for name in tqdm(categories, desc="report: page", unit="category", disable=disable, leave=False):
        data_path = assets_dir / f"{safe_name(name)}.json"
        data = load_category_data(data_path) if data_path.is_file() else None
        sections.append(_category_section(name, results["categories"][name], data, assets_dir, page_dir))
    return _template().render(
        title=title,
        version=results.get("patchknn_version", "?"),
        resolution=results.get("resolution", "input"),
        generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        protocol=_metrics_table(results, PROTOCOL_COLUMNS, paper=True),
        decision=_metrics_table(results, DECISION_COLUMNS, paper=False),
        config=[(k, json.dumps(v)) for k, v in (results.get("config") or {}).items()],
        sections=sections,
    )


@functools.cache
def _template() -> Any:
    """The page template (``templates/report.html.j2``, package data), autoescaped."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("patchknn.report", "templates"),
        autoescape=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("report.html.j2")


# ------------------------------------------------------------------------------------ pieces
def _metrics_table(
    results: dict[str, Any], columns: tuple[tuple[str, str, str], ...], *, paper: bool
) -> dict[str, Any]:
    items = [*results["categories"].items()]
    if len(items) > 1:
        items.append(("mean", results.get("mean") or {}))
    rows = []
    for name, row in items:
        mean = name == "mean"
        cells = [None if mean and key not in row else _metric_cell(name, key, row.get(key)) for key, _, _ in columns]
        diff = None
        ours, ref = row.get("pixel_auprc"), row.get("paper_pixel_auprc")
        if paper and ours is not None and ref is not None:
            diff = {"cls": "pos" if ours - ref >= 0 else "neg", "text": f"{ours - ref:+.3f}"}
        rows.append({"name": name, "mean": mean, "anchor": safe_name(name), "cells": cells, "diff": diff})
    return {"columns": [{"label": label, "tip": tip} for _, label, tip in columns], "paper": paper, "rows": rows}


def _metric_cell(category: str, key: str, value: Any) -> dict[str, str]:
    """A table cell: its exact value (``data-value``) beside the rounded one shown."""
    exact = "null" if value is None else repr(float(value))
    shown = "–" if value is None else (f"{value:.4g}" if key in THRESHOLD_KEYS else f"{value:.3f}")
    return {"metric": f"{category}/{key}", "exact": exact, "shown": shown}


def _category_section(
    name: str, row: dict[str, Any], data: dict[str, Any] | None, assets_dir: Path, page_dir: Path
) -> dict[str, Any]:
    section: dict[str, Any] = {
        "name": name, "anchor": safe_name(name), "facts": _facts(row, data), "tune": _tune(name, row), "data": None,
    }
    if data is None:
        return section
    plots_shown = [
        (label, _data_uri(png))
        for label, png in (
            ("pixel precision-recall curve", plots.pr_png(data)),
            ("ROC curves", plots.roc_png(data)),
            ("per-region overlap curve", plots.pro_png(data)),
            ("image-score histogram", plots.histogram_png(data)),
        )
        if png is not None
    ]
    section["data"] = {
        "calibration": _calibration(data),
        "plots": plots_shown,
        "gallery": _gallery(data, assets_dir, page_dir),
    }
    return section


def _facts(row: dict[str, Any], data: dict[str, Any] | None) -> list[tuple[str, str]]:
    return [
        (_fmt(row.get("pixel_auprc")), "pixel AUPRC"),
        (_fmt(row.get("paper_pixel_auprc")), "paper (Table 2)"),
        (_fmt(row.get("image_auroc")), "image AUROC"),
        (_fmt(row.get("threshold"), 4), "calibrated threshold" + (f" ({data['threshold_method']})" if data else "")),
        (_fmt(row.get("image_f1_threshold"), 4), "F1-optimal threshold"),
        (f"{row.get('n_train', '?')} / {row.get('n_test', '?')} ({row.get('n_test_defective', '?')} defective)",
         "train / test images"),
        (f"{row.get('bank_size', '?')} × {row.get('n_components', '?')}", "memory bank (patches × dims)"),
        (f"{row.get('fit_seconds', 0):.1f} s · {row.get('predict_images_per_second', 0):.1f} img/s",
         "fit time · prediction speed"),
    ]


def _tune(category: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """The tune block of a category whose configuration ``patchknn tune`` chose (``row["tune"]``:
    ``evaluate --preset auto``, or a model fitted with ``fit --preset auto``), else ``None``."""
    doc = row.get("tune")
    if doc is None:
        return None
    from patchknn.tune.result import TuneResult

    try:
        if not isinstance(doc, dict):
            raise ReportError(f"not a tune result: a JSON {type(doc).__name__}")
        result = TuneResult.from_dict(doc)
    except PatchKNNError as e:
        raise ReportError(f"category {category!r}: {e}") from e
    chosen = row.get("config") or result.chosen.config
    return {
        "choice": result.choice,
        "reason": result.reason,
        "objective": result.objective,
        "n_fit": result.n_fit, "n_heldout": result.n_heldout, "n_defective": result.n_defective,
        "kinds": ", ".join(result.defect_kinds) or "–",
        "budget": f"{result.budget_minutes:g}", "seconds": f"{result.seconds:.0f}",
        "n_scored": sum(r.status == "scored" for r in result.rows),
        "rows": [
            {"name": r.name, "chosen": r.name == result.choice, "pixel_auprc": _fmt(r.pixel_auprc),
             "image_auroc": _fmt(r.image_auroc), "threshold_f1": _fmt(r.threshold_f1),
             "objective": "–" if r.objective is None else f"{r.objective:.4f}", "status": r.status,
             "note": r.note}
            for r in result.ranked()
        ],
        "config": [(k, json.dumps(v)) for k, v in chosen.items()],
    }


def _calibration(data: dict[str, Any]) -> dict[str, Any]:
    """The calibration note's values: the threshold, its rule and the held-out score statistics."""
    cal = data.get("calibration") or {}
    if cal.get("threshold") is None:
        return {"threshold": None, "why": cal.get("reason") or f"threshold_method = {data.get('threshold_method')!r}"}
    img = cal.get("image") or {}
    pix = cal.get("patch") or {}
    rules = {
        "quantile": f"quantile {cal.get('quantile')} of",
        "sigma": f"mean + {cal.get('sigma')} × std of",
        "defects": f"the lowest cut with the best F1 (at most the {cal.get('quantile')} quantile) between "
        f"{cal.get('n_defects')} synthetic defects (made on these images) and",
    }
    rule = rules.get(str(cal.get("method")), f"{cal.get('method')} of")
    return {
        "threshold": f"{cal['threshold']:.4g}", "rule": rule, "n_images": cal.get("n_images"),
        "n_groups": cal.get("n_groups"), "image_mean": f"{img.get('mean', 0):.4g}",
        "image_std": f"{img.get('std', 0):.4g}", "image_max": f"{img.get('max', 0):.4g}",
        "patch_median": f"{pix.get('q50', 0):.4g}", "patch_q999": f"{pix.get('q999', 0):.4g}",
    }


def _gallery(data: dict[str, Any], assets_dir: Path, page_dir: Path) -> dict[str, Any]:
    """The gallery's legend (colour scale, outline) and its groups of images, paths relative to the page."""
    scale = data.get("color_scale") or {}
    outline = data.get("outline_threshold")
    colorbar = None
    if scale.get("vmin") is not None and scale.get("vmax") is not None:
        colorbar = _data_uri(plots.colorbar_png(scale["vmin"], scale["vmax"], outline))
    base = assets_dir.parent
    groups = []
    for k in GALLERY_KINDS:
        entries = [
            {
                "name": e["name"],
                "src": Path(os.path.relpath(base / e["file"], page_dir)).as_posix(),
                "verdict": e.get("verdict"),
                "score": f"{e['score']:.4g}",
                "iou": None if e.get("iou") is None else f"{e['iou']:.2f}",
            }
            for e in (data.get("gallery") or {}).get(k) or []
        ]
        groups.append({"title": GALLERY_TITLES[k], "entries": entries})
    return {
        "colorbar": colorbar,
        "source": "the model's normal-score statistics" if scale.get("source") == "model"
        else "the good test images (the model has no calibration statistics)",
        "kind": "calibrated" if data.get("outline_kind") == "calibrated" else "F1-optimal (no calibrated threshold)",
        "outline": None if outline is None else f"{outline:.4g}",
        "groups": groups,
    }


# ----------------------------------------------------------------------------------- helpers
def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}g}" if digits != 3 else f"{v:.3f}"


__all__ = ["TABLE_COLUMNS", "render", "write_report"]
