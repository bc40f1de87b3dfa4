"""Every path gives the same answer, for every preset, on both real categories (issue 12).

For each preset (``paper``, ``fast``, ``best``) and each real category (MVTec AD ``bottle``, MTD
``magnetic_tile``), one model is fitted and saved; then the same test images are scored by
``PatchKNN.predict`` on the loaded model, by the inspection server over real HTTP, by
``score-archive`` on Ray, and by a model whose memory bank is sharded across Ray actors. Scores
must agree to float32 round-off (the backbone's last bits change with the batch size and the
exact search's summation order) and verdicts exactly. On bottle, the calibrated threshold must
separate the whole test set with image precision and recall >= 0.95 for every preset.

magnetic_tile's training set is subsampled here (every 12th of 762 images) to keep CI short; the
full-set figures are in the README, made by ``benchmarks/calibration.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from patchknn import PatchKNN
from patchknn.data import MVTecCategory

pytest.importorskip("ray")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _live import LiveServer  # noqa: E402
from conftest import fit_preset  # noqa: E402

PRESETS = ("paper", "fast", "best")
CATEGORIES = ("bottle", "magnetic_tile")
MTD_TRAIN_STEP = 12
REL = 2e-5
KEY = "paths-test-key-0123456789abcdef"


def _root(category: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("mvtec_root" if category == "bottle" else "mtd_root")


def _sample(dataset: MVTecCategory) -> list:
    """A fixed handful of test images: the first two good ones and the first of each defect kind
    (up to five kinds), so that both verdicts occur."""
    samples = dataset.test_samples()
    good = [s for s in samples if s.label == 0][:2]
    seen: dict[str, object] = {}
    for s in samples:
        kind = Path(s.path).parent.name
        if s.label == 1 and kind not in seen:
            seen[kind] = s
    return good + list(seen.values())[:5]


CASES = [pytest.param((p, c), id=f"{p}-{c}") for c in CATEGORIES for p in PRESETS]
BOTTLE = [c for c in CASES if c.values[0][1] == "bottle"]


@pytest.fixture(scope="module")
def case(request, caffe_weights, tmp_path_factory):
    """One fitted, saved model per (preset, category), with a folder of test images."""
    name, category = request.param
    root = _root(category, request)
    dataset = MVTecCategory(root, category)
    train = dataset.train_paths()
    if category == "magnetic_tile":
        train = train[::MTD_TRAIN_STEP]
    base = tmp_path_factory.mktemp(f"{name}-{category}")
    if category == "bottle":  # the session's fits (conftest), also used by test_evaluation and test_export
        model, model_dir = request.getfixturevalue("bottle_models")(name)
    else:
        model, model_dir = fit_preset(name, train, caffe_weights, base)
    images = base / "images"
    images.mkdir()
    paths = []
    for i, s in enumerate(_sample(dataset)):
        target = images / f"{i:02d}-{Path(s.path).parent.name}{Path(s.path).suffix}"
        shutil.copyfile(s.path, target)
        paths.append(str(target))
    loaded = PatchKNN.load(model_dir, progress=False)
    return {"name": name, "category": category, "model": model, "dir": model_dir, "images": images,
            "paths": paths, "dataset": dataset, "expected": loaded.predict(paths)}


def _same(got: list[tuple[float, str | None]], expected, where: str) -> None:
    assert len(got) == len(expected)
    for (score, verdict), pred in zip(got, expected, strict=True):
        assert pred.error is None
        assert score == pytest.approx(pred.score, rel=REL), f"{where}: {pred.source}"
        assert verdict == pred.verdict, f"{where}: {pred.source} {score} vs {pred.score} (threshold {pred.threshold})"


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_predict_equals_the_fitted_model_and_both_verdicts_occur(case):
    fitted = case["model"].predict(case["paths"])
    _same([(p.score, p.verdict) for p in fitted], case["expected"], "fitted vs loaded")
    for a, b in zip(fitted, case["expected"]):  # the maps too (best's are drawn along the image: guided_filter)
        scale = float(np.abs(b.anomaly_map).max())
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=REL, atol=REL * scale)
    assert {p.verdict for p in case["expected"]} <= {"OK", "NG"}
    assert case["model"].threshold_ is not None


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_score_does_not_depend_on_the_map_size(case):
    model = case["model"]
    original = model.predict(case["paths"], output_size="original")
    assert any(p.anomaly_map.shape != (model.config.image_size,) * 2 for p in original)
    _same([(p.score, p.verdict) for p in original], case["expected"], "output_size='original'")


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_server_over_http_equals_predict(case):
    from patchknn.server.app import create_app
    from patchknn.server.settings import ServerSettings, load_models

    settings = ServerSettings(api_keys=(KEY,), max_batch=4, request_timeout_s=300)  # a loaded CI machine
    app = create_app(load_models([f"m={case['dir']}"]), settings)
    got = []
    with LiveServer(app) as live, live.client(headers={"Authorization": f"Bearer {KEY}"}) as client:
        for p in case["paths"]:
            with open(p, "rb") as f:
                r = client.post("/v1/models/m/predict", files={"file": (Path(p).name, f.read())})
            assert r.status_code == 200, r.text
            body = r.json()
            got.append((body["score"], body["verdict"]))
    _same(got, case["expected"], "server")


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_score_archive_and_sharded_bank_equal_predict(case, ray_instance, tmp_path):
    import pyarrow.parquet as pq

    from patchknn.distributed import load_sharded, score_archive

    out = tmp_path / "scores"
    summary = score_archive(case["dir"], [case["images"]], out, batch_size=4, progress=False, quiet=True)
    assert summary.n_scored == len(case["paths"]) and summary.n_errors == 0
    rows = {r["image"]: r for r in pq.read_table(out / "parts").to_pylist()}
    _same([(rows[p]["score"], rows[p]["verdict"]) for p in case["paths"]], case["expected"], "score-archive")

    sharded = load_sharded(case["dir"], 2, progress=False)
    try:
        preds = sharded.predict(case["paths"])
    finally:
        for member in getattr(sharded, "members", [sharded]):
            member.index_.close()
    _same([(p.score, p.verdict) for p in preds], case["expected"], "sharded bank")


#: bottle, whole test set, per preset: the least pixel AUPRC and image AUROC (README tables; the
#: paper preset's 0.7912 is asserted to +-0.002 through the CLI in test_evaluation.py, and ``fast``
#: keeps its promise of at most 0.005 below it; ``best``: issue 17's target)
BOTTLE_FLOORS = {"paper": (0.7912 - 0.002, 1.0), "fast": (0.7912 - 0.005, 1.0), "best": (0.87, 1.0)}


@pytest.mark.parametrize("case", BOTTLE, indirect=True)
def test_calibrated_threshold_separates_bottle(case):
    """Bottle, whole test set: the threshold fitted on normal images only finds the defective
    bottles (recall) without flagging the good ones (precision), and the preset's accuracy holds
    (pixel AUPRC, image AUROC; one scoring of the test set)."""
    from patchknn.evaluation import score_category

    ev = score_category(case["model"], case["dataset"])
    row = ev.metrics
    print(case["name"], {k: row[k] for k in ("pixel_auprc", "image_auroc", "aupro", "threshold_image_precision",
                                             "threshold_image_recall", "calibration_gap")})
    precision, recall = row["threshold_image_precision"], row["threshold_image_recall"]
    assert precision >= 0.95 and recall >= 0.95, (case["name"], precision, recall, case["model"].threshold_)
    auprc_floor, auroc_floor = BOTTLE_FLOORS[case["name"]]
    assert row["pixel_auprc"] >= auprc_floor, (case["name"], row["pixel_auprc"])
    assert row["image_auroc"] >= auroc_floor, (case["name"], row["image_auroc"])
