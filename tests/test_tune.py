"""patchknn tune (issue 17): synthetic defects, the budgeted search, the choice, `fit --preset auto`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY
from PIL import Image
from typer.testing import CliRunner

from patchknn.defects import DEFECT_KINDS, LARGE_AREA, MAX_AREA, MIN_AREA, TUNE_KINDS, add_defect, defect_set
from patchknn.errors import ConfigError
from patchknn.presets import preset
from patchknn.tune.candidates import Candidate, default_candidates, plan_groups
from patchknn.tune.group import Scored
from patchknn.tune.result import TuneResult
from patchknn.tune.search import EvaluationSet, candidate_row, choose, tune

TINY_OPTIONS = {k: v for k, v in TINY.items() if k not in ("weights", "progress")}


@pytest.fixture(scope="module")
def normal_images(synthetic_root):
    """Real-looking normal images: the synthetic washers (RGB), a grayscale non-square crop of one,
    and a textured random image."""
    paths = sorted((synthetic_root / "synthetic" / "train" / "good").glob("*.png"))
    rgb = np.asarray(Image.open(paths[0]).convert("RGB"))
    gray = np.asarray(Image.open(paths[1]).convert("L"))[:, 10:80]  # (96, 70)
    rng = np.random.default_rng(1)
    texture = rng.integers(40, 200, size=(60, 140, 3), dtype=np.uint8)
    return {"rgb": rgb, "gray": gray, "texture": texture}


# ------------------------------------------------------------------------------------------ defects
@pytest.mark.parametrize("kind", TUNE_KINDS)
def test_defect_mask_is_exactly_the_changed_pixels_and_sized_in_range(normal_images, kind):
    low, high = LARGE_AREA if kind == "large" else (MIN_AREA, MAX_AREA)
    for name, img in normal_images.items():
        for index in range(3):
            d = add_defect(img, kind, seed=5, index=index)
            assert d.image.shape == img.shape and d.image.dtype == np.uint8, name
            assert d.mask.shape == img.shape[:2] and d.mask.dtype == bool
            changed = (d.image != img).reshape(*img.shape[:2], -1).any(axis=2)
            np.testing.assert_array_equal(d.mask, changed)
            assert low <= d.area <= high, (name, kind, d.area)
            assert d.kind == kind


def test_defects_are_deterministic_given_the_seed(normal_images):
    img = normal_images["rgb"]
    a = defect_set([img, img], per_image=3, seed=7)
    b = defect_set([img, img], per_image=3, seed=7)
    c = defect_set([img, img], per_image=3, seed=8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.mask, y.mask)
    assert any(not np.array_equal(x.mask, z.mask) for x, z in zip(a, c))
    assert [d.kind for d in a] == [DEFECT_KINDS[i % len(DEFECT_KINDS)] for i in range(6)]
    assert [d.source for d in a] == [0, 0, 0, 1, 1, 1]


def test_blob_computed_in_its_box_equals_the_whole_image_formula():
    """``_blob`` computes only the pixels within its reach (speed); every pixel must be what the
    whole-image formula gives, at any aspect, rim and centre (inside, on or beyond an edge)."""
    from patchknn.defects import _blob

    def whole(rng, shape, cy, cx, area):
        h, w = shape
        r = np.sqrt(area / np.pi)
        aspect = rng.uniform(0.5, 2.0)
        ry, rx = r * np.sqrt(aspect), r / np.sqrt(aspect)
        theta0 = rng.uniform(0, np.pi)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        dy, dx = y - cy, x - cx
        u = dx * np.cos(theta0) + dy * np.sin(theta0)
        v = -dx * np.sin(theta0) + dy * np.cos(theta0)
        angle = np.arctan2(v / ry, u / rx)
        rim = np.ones_like(angle)
        for k in (2, 3, 5):
            rim += rng.uniform(0.0, 0.12) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
        return (u / rx) ** 2 + (v / ry) ** 2 <= rim**2

    draw = np.random.default_rng(0)
    for i in range(300):
        shape = (int(draw.integers(16, 90)), int(draw.integers(16, 90)))
        cy, cx = (float(draw.uniform(-10, s + 10)) for s in shape)
        area = float(draw.uniform(1, 0.3 * shape[0] * shape[1]))
        got = _blob(np.random.default_rng((1, i)), shape, cy, cx, area)
        np.testing.assert_array_equal(got, whole(np.random.default_rng((1, i)), shape, cy, cx, area))


def test_grayscale_stays_grayscale_and_alpha_is_kept(normal_images):
    gray = normal_images["gray"]
    as_rgb = np.repeat(gray[..., None], 3, axis=2)
    for kind in TUNE_KINDS:
        d = add_defect(as_rgb, kind, seed=1)
        assert (d.image == d.image[..., :1]).all(), kind  # the channels stay equal
        np.testing.assert_array_equal(d.image[..., 0], add_defect(gray, kind, seed=1).image)
    rgba = np.dstack([normal_images["rgb"], np.full(normal_images["rgb"].shape[:2], 200, np.uint8)])
    d = add_defect(rgba, "colour", seed=2)
    assert (d.image[..., 3] == 200).all() and d.mask.any()


def test_defect_input_errors():
    with pytest.raises(ConfigError, match="unknown defect kind"):
        add_defect(np.zeros((32, 32), np.uint8), "dent")
    with pytest.raises(ConfigError, match="uint8"):
        add_defect(np.zeros((32, 32), np.float32))
    with pytest.raises(ConfigError, match="16x16"):
        add_defect(np.zeros((8, 40), np.uint8))


# ------------------------------------------------------------------------------------------- search
def _tiny(name, **changes):
    return Candidate(name, preset("paper", **{**TINY_OPTIONS, **changes}))


class FakeClock:
    """Each reading is ``step`` seconds after the previous one."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_candidates_are_grouped_by_backbone_pass_and_ordered_cheap_first():
    cands = default_candidates()
    names = [c.name for c in cands]
    assert names[:3] == ["paper", "best", "fast"] or names[0] == "paper"
    assert len(names) == len(set(names)) and "auto" not in names
    # around `best`: layers with and without stage5 (magnetic_tile's lever), the normalised view alone
    eff = [c.config for c in cands if c.config.backbone == "efficientnet-lite2"]
    assert any("stage5" in c.resolved_layers for c in eff) and any("stage5" not in c.resolved_layers for c in eff)
    assert any(c.layer_norm and not c.ensemble for c in eff)
    groups = plan_groups(cands)
    assert "paper" in [c.name for c in groups[0].candidates]
    assert [g.cost for g in groups[1:]] == sorted(g.cost for g in groups[1:])
    # the baseline and the candidates sharing its fitted model (smoothing, image score) come first, alone
    assert len(groups[0].members) == 1
    assert {"paper", "paper+smooth1", "paper+topk_mean"} <= {c.name for c in groups[0].candidates}
    # the other feature views on the same network are fitted together, each a member of its own
    same_net = next(g for g in groups if "paper+layer_norm" in [c.name for c in g.candidates])
    assert "paper+layers2-3" in [c.name for c in same_net.candidates] and len(same_net.members) >= 2
    assert all(len(g.candidates) == 1 for g in groups if g.ensemble)
    # best's three views weighed per product at their own fit, fitted as that ensemble
    auto = next(c for c in cands if c.name == "best+3views+auto")
    assert auto.config.ensemble_weights == "auto" and len(auto.config.ensemble) == 2
    assert any(g.ensemble and g.candidates == [auto] for g in groups)


def test_candidates_with_other_train_flips_are_fitted_apart_and_cost_their_copies():
    """Group members share the batches they are fed, flipped copies included: a candidate with
    other ``train_flips`` is a group of its own, and costs one backbone pass per copy."""
    plain = Candidate("plain", preset("paper", layer_norm=True))
    flips = Candidate("flips", preset("paper", layer_norm=True, train_flips=("hflip", "vflip", "rot180")))
    other = Candidate("other", preset("paper", layers=("layer2", "layer3")))
    groups = plan_groups([Candidate("paper", preset("paper")), plain, flips, other])
    by_name = {c.name: g for g in groups for c in g.candidates}
    assert by_name["plain"] is by_name["other"] and by_name["flips"] is not by_name["plain"]
    assert flips.cost == pytest.approx(4 * plain.cost)


def test_an_auto_weighted_ensemble_is_scored_with_the_weights_its_own_fit_chose(synthetic_root):
    train = synthetic_root / "synthetic" / "train" / "good"
    auto = _tiny("ens+auto", ensemble=("layer_norm=true",), ensemble_weights="auto")
    result = tune(train, candidates=[_tiny("a"), auto], budget_minutes=10, weights="random", progress=False,
                  holdout=0.4, max_heldout=3, defects_per_image=2)
    assert result.defect_kinds == list(TUNE_KINDS)  # 6 defects: every kind once, large blobs included
    row = next(r for r in result.rows if r.name == "ens+auto")
    assert row.status == "scored" and row.objective is not None
    weights = [float(w) for w in row.note.removeprefix("scored; member weights ").split(",")]
    assert len(weights) == 2 and all(w in (0.0, 1.0, 2.0) for w in weights) and sum(weights) > 0
    assert row.config["ensemble_weights"] == "auto"
    assert "not scored" not in result.reason


def test_a_train_flips_candidate_is_fitted_with_its_copies(synthetic_root):
    train = synthetic_root / "synthetic" / "train" / "good"
    flips = _tiny("a+flips", layer_norm=True, train_flips=("hflip",))
    cands = [_tiny("a"), _tiny("a+layer_norm", layer_norm=True), flips]
    result = tune(train, candidates=cands, budget_minutes=10, weights="random", progress=False,
                  holdout=0.4, max_heldout=3, defects_per_image=2)
    rows = {r.name: r for r in result.rows}
    assert all(r.status == "scored" and r.objective is not None for r in rows.values())
    assert rows["a+flips"].config["train_flips"] == ["hflip"] and rows["a+layer_norm"].config["train_flips"] == []
    assert rows["a+flips"].objective != rows["a+layer_norm"].objective  # the copies changed its bank


def test_search_stops_at_the_budget_and_returns_the_best_so_far(synthetic_root):
    train = synthetic_root / "synthetic" / "train" / "good"
    cands = [_tiny("a"), _tiny("a+smooth1", smoothing_sigma=1.0), _tiny("b", image_size=96, grid_size=12)]
    # every clock reading is 61 s later: the first group ends past a 1-minute budget
    result = tune(train, candidates=cands, budget_minutes=1.0, clock=FakeClock(61.0), weights="random",
                  progress=False, max_heldout=2, defects_per_image=2)
    status = {r.name: r.status for r in result.rows}
    assert status == {"a": "scored", "a+smooth1": "scored", "b": "skipped"}
    assert result.choice in ("a", "a+smooth1")
    assert result.chosen.objective == max(r.objective for r in result.rows if r.objective is not None)
    assert "budget spent" in result.reason
    assert (result.n_fit, result.n_heldout, result.n_defective) == (6, 2, 4)
    assert result.seconds == pytest.approx(61.0 * 2)  # the first group only: no group started after
    # JSON round trip
    path = result.save(synthetic_root.parent / "tune.json")
    again = TuneResult.load(path)
    assert again.to_dict() == result.to_dict() and again.config == result.config
    assert json.loads(path.read_text())["choice"] == result.choice
    with pytest.raises(ConfigError, match="not a tune result"):
        TuneResult.from_dict({"rows": []})


def test_the_choice_ranks_a_clearly_better_candidate_first():
    rng = np.random.default_rng(0)
    masks = [np.zeros((32, 32), bool) for _ in range(4)] + [np.zeros((32, 32), bool) for _ in range(4)]
    for m in masks[4:]:
        y, x = rng.integers(4, 24, 2)
        m[y : y + 6, x : x + 6] = True
    evalset = EvaluationSet([None] * 8, masks, np.array([0] * 4 + [1] * 4))
    good_maps = np.stack([m.astype(np.float32) + 0.1 * rng.random((32, 32)) for m in masks])
    bad_maps = rng.random((8, 32, 32)).astype(np.float32)
    cfg = preset("paper", **{**TINY_OPTIONS, "image_size": 32, "grid_size": 4})
    rows = [
        candidate_row(Scored(Candidate(name, cfg), maps, maps.reshape(8, -1).max(axis=1), thr, 1.0), evalset)
        for name, maps, thr in (("noise", bad_maps, 0.99), ("sharp", good_maps, 0.6))
    ]
    assert rows[1].pixel_auprc > 0.9 > rows[0].pixel_auprc
    assert rows[1].image_auroc == 1.0 and rows[1].threshold_f1 == 1.0
    assert choose(rows).name == "sharp"
    # equal objectives: the cheaper one
    cheap = candidate_row(Scored(Candidate("cheap", cfg), good_maps, good_maps.reshape(8, -1).max(axis=1),
                                 0.6, 1.0), evalset)
    cheap.cost = rows[1].cost / 2
    assert choose([*rows, cheap]).name == "cheap"


# ---------------------------------------------------------------------------------------------- CLI
def test_fit_preset_auto_records_the_tune_result(synthetic_root, tmp_path):
    from patchknn.cli import app
    from patchknn.serialization import read_meta

    train = synthetic_root / "synthetic" / "train" / "good"
    out = tmp_path / "model"
    result = CliRunner().invoke(app, [
        "fit", str(train), "-o", str(out), "--preset", "auto", "--budget", "0.01", "--backbone", "resnet50",
        "--weights", "random", "--image-size", "64", "--grid-size", "8", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    meta = read_meta(out)
    tuned = TuneResult.from_dict(meta["fit_info"]["tune"])
    assert tuned.chosen.status == "scored"
    assert meta["config"] == tuned.chosen.config  # the model is the chosen configuration
    assert meta["config"]["image_size"] == 64 and meta["config"]["backbone"] == "resnet50"
    assert any(r.status == "skipped" for r in tuned.rows)  # 0.6 s budget: only the first group ran
    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and '"tune"' in info.output and tuned.choice in info.output
    # `patchknn tune` prints the table and the choice, and writes the JSON
    res = CliRunner().invoke(app, [
        "tune", str(train), "--budget", "0.01", "--output", str(tmp_path / "t.json"), "--weights", "random",
        "--set", "backbone=resnet50", "--set", "image_size=64", "--set", "grid_size=8",
    ])
    assert res.exit_code == 0, res.output
    saved = TuneResult.load(tmp_path / "t.json")
    assert f"choice: {saved.choice}" in res.output and "pixel AUPRC" in res.output
    assert saved.config.backbone == "resnet50" and saved.config.image_size == 64
