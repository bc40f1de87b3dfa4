"""The HTML report of `patchknn evaluate --report` and `patchknn report`."""

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from patchknn.cli import app
from patchknn.report import select_gallery
from patchknn.report.html import TABLE_COLUMNS

runner = CliRunner()
TINY_FLAGS = ["--backbone", "resnet50", "--weights", "random", "--image-size", "64", "--grid-size", "8", "-q"]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.metrics: dict[str, tuple[str, str]] = {}  # "cat/key" -> (data-value, shown text)
        self._cell: str | None = None
        self._value = ""
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        if tag == "td" and "data-metric" in a:
            self._cell, self._value, self._text = a["data-metric"], a["data-value"], []

    def handle_data(self, data):
        if self._cell is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.metrics[self._cell] = (self._value, "".join(self._text))
            self._cell = None


def check_page(html: Path, results: dict) -> _Page:
    """Every image the page references exists; every metric shown equals results.json's."""
    page = _Page()
    page.feed(html.read_text(encoding="utf-8"))
    assert page.images, "the page has no image"
    for src in page.images:
        if src.startswith("data:"):
            assert src.startswith("data:image/png;base64,")
            assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
        else:
            assert not src.startswith(("http:", "https:", "/")), src  # offline, relative
            assert (html.parent / src).is_file(), src
    rows = {**results["categories"], "mean": results["mean"]}
    expected = {f"{c}/{k}" for c in results["categories"] for k, _, _ in TABLE_COLUMNS}
    assert expected <= set(page.metrics)
    for cell, (value, shown) in page.metrics.items():
        category, key = cell.split("/")
        truth = rows[category].get(key)
        if truth is None:
            assert value == "null" and shown == "–", cell
        else:
            assert float(value) == pytest.approx(truth, rel=0, abs=0), cell
            assert float(shown) == pytest.approx(truth, rel=5e-3, abs=5e-4), cell
    return page


@pytest.fixture(scope="module")
def synthetic_report(synthetic_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    out = base / "report"
    r = runner.invoke(
        app, ["evaluate", "--data-root", str(synthetic_root), "-c", "synthetic", "--report", str(out), *TINY_FLAGS]
    )
    assert r.exit_code == 0, r.output
    return out


def test_evaluate_report_page(synthetic_report):
    results = json.loads((synthetic_report / "results.json").read_text())
    page = check_page(synthetic_report / "index.html", results)
    files = [s for s in page.images if not s.startswith("data:")]
    assert files and all(s.startswith("assets/synthetic/") for s in files)
    text = (synthetic_report / "index.html").read_text()
    for part in ("Configuration", "paper (Table 2)", "pixel precision-recall curve", "Worst false positives",
                 "Worst misses", "Best detections", "calibrated threshold"):
        assert part in text, part
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert 'class="tune"' not in text  # a preset chosen by hand: no tune block
    # the default threshold rule is named in the calibration note ("defects", not a stray "mean + None")
    note = text.split("Calibrated threshold")[1][:400]
    assert "synthetic defects (made on these images)" in note and "None" not in note
    data = json.loads((synthetic_report / "assets" / "synthetic.json").read_text())
    assert data["threshold"] == results["categories"]["synthetic"]["threshold"] is not None
    assert data["curves"]["pr"] and data["curves"]["roc"] and data["curves"]["pro"]
    assert len(data["images"]) == results["categories"]["synthetic"]["n_test"]
    assert sum(x["label"] == 0 for x in data["images"]) == 3
    row = results["categories"]["synthetic"]
    for key in ("image_f1_threshold", "threshold_image_precision", "threshold_image_recall",
                "threshold_image_f1", "threshold_pixel_f1"):
        assert key in row


def test_report_command_rebuilds_elsewhere(synthetic_report, tmp_path):
    results_path = synthetic_report / "results.json"
    page_path = tmp_path / "sub" / "page.html"
    r = runner.invoke(app, ["report", str(results_path), "--output", str(page_path), "-q"])
    assert r.exit_code == 0, r.output
    page = check_page(page_path, json.loads(results_path.read_text()))
    assert any(s.startswith("../") for s in page.images)  # relative to the new page


def test_report_without_assets_has_the_table(synthetic_report, tmp_path):
    results = json.loads((synthetic_report / "results.json").read_text())
    bare = tmp_path / "results.json"
    bare.write_text(json.dumps(results))
    r = runner.invoke(app, ["report", str(bare), "-q"])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "index.html").read_text()
    assert "No curves or gallery stored" in text
    page = _Page()
    page.feed(text)
    assert page.metrics["synthetic/pixel_auprc"][0] == repr(results["categories"]["synthetic"]["pixel_auprc"])


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of every <h2>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.h2: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data)

    def handle_endtag(self, tag):
        self._in_h2 = False


def _harmless_page(results: dict, folder: Path) -> tuple[str, _Tags]:
    """Write ``results`` (and the page) into ``folder``; the page has no script element, no
    event-handler attribute and no image whose source came from the hostile text."""
    from patchknn.report import write_report

    (folder / "results.json").write_text(json.dumps(results))
    text = write_report(folder / "results.json", progress=False).read_text(encoding="utf-8")
    tags = _Tags()
    tags.feed(text)
    assert "script" not in {t for t, _ in tags.tags}
    assert not [a for _, attrs in tags.tags for a in attrs if a.startswith("on")]
    assert all(a.get("src") != "x" for t, a in tags.tags if t == "img")
    return text, tags


def test_hostile_names_are_escaped(synthetic_report, tmp_path):
    """A category, configuration value or image name holding markup is shown as text (the page is
    a Jinja2 template with autoescape): no script element, no event-handler attribute."""
    from patchknn.report.layout import safe_name

    hostile = '<script>alert("x")</script>'
    results = json.loads((synthetic_report / "results.json").read_text())
    results["categories"] = {hostile: results["categories"]["synthetic"]}
    results["config"]["backbone"] = hostile
    data = json.loads((synthetic_report / "assets" / "synthetic.json").read_text())
    entries = [e for group in data["gallery"].values() for e in group]
    assert entries
    for e in entries:
        e["name"] = '"><img src=x onerror=alert(1)>' + e["name"]
        e["verdict"] = '"onmouseover="alert(1)'
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / f"{safe_name(hostile)}.json").write_text(json.dumps(data))
    text, tags = _harmless_page(results, tmp_path)
    assert hostile in tags.h2  # shown as the text it is
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text
    assert len([a for t, a in tags.tags if t == "figure"]) == len(entries)


def test_report_rejects_a_non_results_file(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    from patchknn.report import ReportError, write_report

    with pytest.raises(ReportError, match="not a patchknn results file"):
        write_report(tmp_path / "x.json")


def test_select_gallery():
    scores = np.array([0.9, 0.2, 0.8, 0.1, 0.7, 0.95])
    labels = np.array([0, 0, 0, 1, 1, 1])
    iou = np.array([0, 0, 0, 0.0, 0.5, 0.2])
    g = select_gallery(scores, labels, iou, 2)
    assert g["false_positives"] == [0, 2]
    assert g["misses"] == [3, 4]
    assert g["detections"] == [5]  # 3 and 4 are already misses


@pytest.mark.mvtec
def test_bottle_report(bottle_evaluation):
    """The report for the real bottle category: every image exists, metrics equal results.json."""
    ev = bottle_evaluation
    results = ev.results
    assert json.loads((ev.report_dir / "results.json").read_text()) == results
    page = check_page(ev.html, results)
    row = results["categories"]["bottle"]
    assert row["pixel_auprc"] >= 0.75 and row["paper_pixel_auprc"] == 0.773
    assert row["threshold"] is not None and row["image_f1_threshold"] is not None
    # calibrated on normal images only, it should still separate most of bottle's test set
    assert row["threshold_image_f1"] >= 0.8
    gallery = [s for s in page.images if not s.startswith("data:")]
    assert len(gallery) >= 8
    data = json.loads((ev.report_dir / "assets" / "bottle.json").read_text())
    assert data["color_scale"]["source"] == "model"
    assert data["calibration"]["n_images"] == 32  # calibration_images, the default


# ------------------------------------------------------------------ the tune result (--preset auto)
class _TuneTable(HTMLParser):
    """The rows of the page's tune table: candidate name (data-candidate), chosen or not, cells."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, bool, list[str]]] = []
        self._cells: list[str] | None = None
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-candidate" in a:
            self.rows.append((a["data-candidate"], a.get("class") == "chosen", []))
        if tag == "td" and self.rows:
            self._in_td = True
            self.rows[-1][2].append("")

    def handle_data(self, data):
        if self._in_td:
            self.rows[-1][2][-1] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_td = False


@pytest.fixture(scope="module")
def auto_report(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto-report") / "report"
    r = runner.invoke(app, ["evaluate", "--data-root", str(synthetic_root), "-c", "synthetic", "--preset", "auto",
                            "--budget", "0.01", "--report", str(out), *TINY_FLAGS])
    assert r.exit_code == 0, r.output
    return out


def test_report_shows_the_tune_table_and_marks_the_choice(auto_report):
    from patchknn.tune.result import TuneResult

    results = json.loads((auto_report / "results.json").read_text())
    check_page(auto_report / "index.html", results)  # the metrics still equal results.json's
    row = results["categories"]["synthetic"]
    tuned = TuneResult.from_dict(row["tune"])
    assert results["config"]["preset"] == "auto" and row["config"] == tuned.chosen.config
    text = (auto_report / "index.html").read_text(encoding="utf-8")
    table = _TuneTable()
    table.feed(text)
    assert [name for name, _, _ in table.rows] == [r.name for r in tuned.ranked()]  # every candidate, ranked
    assert [name for name, chosen, _ in table.rows if chosen] == [tuned.choice]
    by_name = {r.name: r for r in tuned.rows}
    for name, _, cells in table.rows:
        r = by_name[name]
        assert name in cells[0]
        for cell, value in zip(cells[1:4], (r.pixel_auprc, r.image_auroc, r.threshold_f1)):
            assert cell == ("–" if value is None else f"{value:.3f}")
        assert cells[4] == ("–" if r.objective is None else f"{r.objective:.4f}")
        assert cells[5].startswith(r.status)
    assert any(cells[5] == "skipped: budget spent" for _, _, cells in table.rows)  # 0.6 s: one group ran
    assert "Chosen from normal images only, without the test set" in text
    assert f"fitted on {tuned.n_fit} normal training images" in " ".join(text.split())
    assert f"Configuration chosen by <code>patchknn tune</code>: {tuned.choice}" in text


def test_tune_table_escapes_a_hostile_candidate_name(auto_report, tmp_path):
    from patchknn.report import ReportError, write_report

    hostile = '<script>alert("t")</script><img src=x onerror=alert(2)>'
    results = json.loads((auto_report / "results.json").read_text())
    tuned = results["categories"]["synthetic"]["tune"]
    for r in tuned["rows"]:
        if r["name"] == tuned["choice"]:
            r["name"] = hostile
    tuned["choice"] = hostile
    tuned["reason"] = hostile
    text, tags = _harmless_page(results, tmp_path)
    table = _TuneTable()
    table.feed(text)
    assert [name for name, chosen, _ in table.rows if chosen] == [hostile]  # shown as the text it is, marked
    assert "&lt;script&gt;alert(&#34;t&#34;)&lt;/script&gt;" in text
    # a tune entry that is not a tune result: one clear error naming the category
    results["categories"]["synthetic"]["tune"] = {"rows": [], "choice": "x"}
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(ReportError, match="'synthetic'.*tune result"):
        write_report(tmp_path / "results.json", progress=False)
