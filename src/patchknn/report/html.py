"""The report page: one self-contained HTML file per run (works offline, no scripts, no fonts).

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
import html
import json
import os
import sys
from pathlib import Path
from typing import Any

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

CSS = """
:root { --ink:#1d1d1f; --muted:#6b6b6b; --line:#e3e3e3; --bg:#fafafa; --accent:#b5361d; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color:var(--ink);
       background:var(--bg); }
main { max-width:1240px; margin:0 auto; padding:20px 24px 48px; }
h1 { font-size:24px; margin:4px 0 2px; } h2 { font-size:19px; margin:32px 0 10px; border-bottom:1px solid var(--line);
     padding-bottom:4px; } h3 { font-size:15px; margin:20px 0 8px; } h4 { font-size:13.5px; margin:14px 0 6px; }
.sub { color:var(--muted); margin:0 0 12px; }
nav a { margin-right:12px; }
a { color:var(--accent); text-decoration:none; } a:hover { text-decoration:underline; }
table { border-collapse:collapse; background:#fff; font-variant-numeric:tabular-nums; }
th, td { border:1px solid var(--line); padding:4px 8px; text-align:right; white-space:nowrap; }
th { background:#f2f2f2; font-weight:600; font-size:12.5px; }
td:first-child, th:first-child { text-align:left; }
tr.mean td { font-weight:600; background:#f7f7f7; }
.scroll { overflow-x:auto; }
.pos { color:#1a7f37; } .neg { color:#b42318; }
.cfg { display:grid; grid-template-columns:repeat(auto-fill, minmax(260px, 1fr)); gap:0 18px; background:#fff;
       border:1px solid var(--line); padding:8px 12px; }
.cfg div { display:flex; justify-content:space-between; border-bottom:1px dotted var(--line); padding:2px 0; }
.cfg span:first-child { color:var(--muted); } .cfg span:last-child { font-family:ui-monospace, Menlo, monospace; }
.facts { display:flex; flex-wrap:wrap; gap:10px; margin:8px 0 12px; }
.fact { background:#fff; border:1px solid var(--line); padding:6px 10px; min-width:150px; }
.fact b { display:block; font-size:16px; } .fact span { color:var(--muted); font-size:12px; }
.plots { display:grid; grid-template-columns:repeat(auto-fill, minmax(280px, 1fr)); gap:10px; }
.plots img { width:100%; background:#fff; border:1px solid var(--line); }
.gallery { display:flex; flex-wrap:wrap; gap:10px; }
figure { margin:0; background:#fff; border:1px solid var(--line); padding:6px; }
figure img { display:block; height:180px; width:auto; }
figcaption { font-size:12px; color:var(--muted); margin-top:4px; max-width:560px; }
.tag { display:inline-block; padding:0 6px; border-radius:3px; font-weight:600; font-size:11px; color:#fff; }
.tag.NG { background:#b42318; } .tag.OK { background:#1a7f37; }
.legend { color:var(--muted); font-size:12.5px; display:flex; align-items:center; gap:18px; flex-wrap:wrap; }
.legend img { height:64px; }
.note { color:var(--muted); font-size:12.5px; }
footer { color:var(--muted); font-size:12px; margin-top:40px; }
"""


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
    sections: list[str] = []
    disable = not progress or not sys.stderr.isatty()
    for name in tqdm(categories, desc="report: page", unit="category", disable=disable, leave=False):
        data_path = assets_dir / f"{safe_name(name)}.json"
        data = load_category_data(data_path) if data_path.is_file() else None
        sections.append(_category_section(name, results["categories"][name], data, assets_dir, page_dir))
    version = results.get("patchknn_version", "?")
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = " ".join(f'<a href="#cat-{_e(safe_name(n))}">{_e(n)}</a>' for n in categories)
    head = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
    )
    summary = (
        f"<h1>{_e(title)}</h1>\n"
        f'<p class="sub">patchknn {_e(version)} · resolution {_e(results.get("resolution", "input"))} · '
        f"{len(categories)} categor{'y' if len(categories) == 1 else 'ies'} · generated {now}</p>\n"
        f"<nav>{nav}</nav>\n"
    )
    body = [
        head,
        summary,
        '<h2 id="metrics">Metrics</h2>\n',
        "<h3>Detection and segmentation (MVTec AD protocol)</h3>\n",
        _metrics_table(results, PROTOCOL_COLUMNS, paper=True),
        '<p class="note">Pixel metrics pool every pixel of every test image; the paper\'s Table 2 reports '
        "pixel AUPRC.</p>\n",
        "<h3>Decision threshold</h3>\n",
        _metrics_table(results, DECISION_COLUMNS, paper=False),
        '<p class="note">Precision, recall and F1 of the decision <i>score ≥ calibrated threshold</i> '
        "(the pixel F1 of the mask <i>map ≥ threshold</i>). The calibrated threshold comes from normal "
        "training images only, held out from the memory bank by cross-validation; the F1-optimal "
        "threshold is the best one in hindsight (it uses the test labels).</p>\n",
        '<h2 id="config">Configuration</h2>\n',
        _config_block(results.get("config") or {}),
        *sections,
        f'<footer>Generated by patchknn {_e(version)}. Regenerate with '
        f"<code>patchknn report results.json</code>.</footer>\n</main>\n</body>\n</html>\n",
    ]
    return "".join(body)


# ------------------------------------------------------------------------------------ pieces
def _metrics_table(results: dict[str, Any], columns: tuple[tuple[str, str, str], ...], *, paper: bool) -> str:
    head = "".join(f'<th title="{_e(tip)}">{_e(label)}</th>' for _, label, tip in columns)
    extra = "<th>diff vs paper</th>" if paper else ""
    rows = [f'<div class="scroll"><table class="metrics">\n<tr><th>category</th>{head}{extra}</tr>\n']
    items = [*results["categories"].items()]
    if len(items) > 1:
        items.append(("mean", results.get("mean") or {}))
    for name, row in items:
        cls = ' class="mean"' if name == "mean" else ""
        label = _e(name) if name == "mean" else f'<a href="#cat-{_e(safe_name(name))}">{_e(name)}</a>'
        cells = [f"<td>{label}</td>"]
        for key, _, _ in columns:
            if name == "mean" and key not in row:
                cells.append("<td>–</td>")
                continue
            cells.append(_metric_cell(name, key, row.get(key)))
        if paper:
            ours, ref = row.get("pixel_auprc"), row.get("paper_pixel_auprc")
            if ours is not None and ref is not None:
                diff = ours - ref
                cells.append(f'<td class="{"pos" if diff >= 0 else "neg"}">{diff:+.3f}</td>')
            else:
                cells.append("<td>–</td>")
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>\n")
    rows.append("</table></div>\n")
    return "".join(rows)


def _metric_cell(category: str, key: str, value: Any) -> str:
    exact = "null" if value is None else repr(float(value))
    shown = "–" if value is None else (f"{value:.4g}" if key in THRESHOLD_KEYS else f"{value:.3f}")
    return f'<td data-metric="{_e(category)}/{key}" data-value="{exact}">{shown}</td>'


def _config_block(config: dict[str, Any]) -> str:
    items = "".join(
        f"<div><span>{_e(k)}</span><span>{_e(json.dumps(v))}</span></div>" for k, v in config.items()
    )
    return f'<div class="cfg">{items}</div>\n'


def _category_section(
    name: str, row: dict[str, Any], data: dict[str, Any] | None, assets_dir: Path, page_dir: Path
) -> str:
    out = [f'<h2 id="cat-{_e(safe_name(name))}">{_e(name)}</h2>\n']
    out.append(_facts(row, data))
    if data is None:
        out.append(
            '<p class="note">No curves or gallery stored for this category: write them with '
            "<code>patchknn evaluate ... --report DIR</code>.</p>\n"
        )
        return "".join(out)
    out.append(_calibration_note(data))
    out.append('<h3>Curves</h3>\n<div class="plots">\n')
    for label, png in (
        ("pixel precision-recall curve", plots.pr_png(data)),
        ("ROC curves", plots.roc_png(data)),
        ("per-region overlap curve", plots.pro_png(data)),
        ("image-score histogram", plots.histogram_png(data)),
    ):
        if png is not None:
            out.append(f'<img alt="{_e(label)}" src="{_data_uri(png)}">\n')
    out.append("</div>\n")
    out.append(_gallery(data, assets_dir, page_dir))
    return "".join(out)


def _facts(row: dict[str, Any], data: dict[str, Any] | None) -> str:
    facts = [
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
    items = "".join(f'<div class="fact"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for v, k in facts)
    return f'<div class="facts">{items}</div>\n'


def _calibration_note(data: dict[str, Any]) -> str:
    cal = data.get("calibration") or {}
    if cal.get("threshold") is None:
        why = cal.get("reason") or f"threshold_method = {data.get('threshold_method')!r}"
        return f'<p class="note">No calibrated threshold ({_e(why)}).</p>\n'
    img = cal.get("image") or {}
    pix = cal.get("patch") or {}
    rule = (
        f"quantile {cal.get('quantile')} of"
        if cal.get("method") == "quantile"
        else f"mean + {cal.get('sigma')} × std of"
    )
    return (
        f'<p class="note">Calibrated threshold <b>{cal["threshold"]:.4g}</b> = {rule} the scores of '
        f"{cal.get('n_images')} training images, each scored against the memory bank without its own "
        f"patches ({cal.get('n_groups')}-fold). Held-out normal image scores: mean {img.get('mean', 0):.4g}, "
        f"std {img.get('std', 0):.4g}, max {img.get('max', 0):.4g}; normal patch scores: median "
        f"{pix.get('q50', 0):.4g}, 99.9th percentile {pix.get('q999', 0):.4g}.</p>\n"
    )


def _gallery(data: dict[str, Any], assets_dir: Path, page_dir: Path) -> str:
    scale = data.get("color_scale") or {}
    outline = data.get("outline_threshold")
    kind = "calibrated" if data.get("outline_kind") == "calibrated" else "F1-optimal (no calibrated threshold)"
    source = (
        "the model's normal-score statistics"
        if scale.get("source") == "model"
        else "the good test images (the model has no calibration statistics)"
    )
    bar = ""
    if scale.get("vmin") is not None and scale.get("vmax") is not None:
        png = plots.colorbar_png(scale["vmin"], scale["vmax"], outline)
        bar = f'<img alt="colour scale" src="{_data_uri(png)}">'
    out = [
        "<h3>Gallery</h3>\n",
        f'<div class="legend">{bar}<span>Each row: input · ground truth (green) · anomaly map '
        f"(inferno; the same colour scale for every image, from {_e(source)}), predicted region "
        f"(map ≥ {kind} threshold{'' if outline is None else f' {outline:.4g}'}) outlined in cyan.</span></div>\n",
    ]
    base = assets_dir.parent
    for k in GALLERY_KINDS:
        entries = (data.get("gallery") or {}).get(k) or []
        out.append(f"<h4>{_e(GALLERY_TITLES[k])}</h4>\n")
        if not entries:
            out.append('<p class="note">none</p>\n')
            continue
        out.append('<div class="gallery">\n')
        for e in entries:
            src = Path(os.path.relpath(base / e["file"], page_dir)).as_posix()
            verdict = e.get("verdict")
            tag = f'<span class="tag {verdict}">{verdict}</span> ' if verdict else ""
            iou = "" if e.get("iou") is None else f" · IoU {e['iou']:.2f}"
            out.append(
                f'<figure><img loading="lazy" alt="{_e(e["name"])}" src="{_e(src)}">'
                f"<figcaption>{tag}<b>{_e(e['name'])}</b> · score {e['score']:.4g}{iou}</figcaption></figure>\n"
            )
        out.append("</div>\n")
    return "".join(out)


# ----------------------------------------------------------------------------------- helpers
def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}g}" if digits != 3 else f"{v:.3f}"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


__all__ = ["TABLE_COLUMNS", "render", "write_report"]
