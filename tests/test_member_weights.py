"""Ensemble member weights (patchknn.member_weights, ``ensemble_weights``): the one combination of
members' grids used by every path, the fit-time choice of ``"auto"`` from the calibration's held-out
synthetic defects, and the weights in saved models and exports."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY

from patchknn import PatchKNN, member_weights
from patchknn.defects import DEFECT_KINDS
from patchknn.ensemble import EnsemblePatchKNN
from patchknn.errors import ConfigError, ModelFileError
from patchknn.export import export_model
from patchknn.presets import preset
from patchknn.runtime import ExportedModel

SMALL = {k: v for k, v in TINY.items() if k not in ("weights", "progress")}
RUNTIME = {k: v for k, v in TINY.items() if k in ("weights", "progress")}


def _images(n, seed=1, size=64):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    return [np.clip(base.astype(int) + rng.integers(-8, 8, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


# ------------------------------------------------------------------------------- the combination
def test_candidate_weights_are_every_direction_once_equal_first():
    assert member_weights.candidate_weights(2) == [(1, 1), (0, 1), (1, 0), (1, 2), (2, 1)]
    three = member_weights.candidate_weights(3)
    assert three[0] == (1, 1, 1) and len(three) == len(set(three)) == 19
    directions = {tuple(np.round(np.array(w) / np.linalg.norm(w), 9)) for w in three}
    assert len(directions) == 19  # no two candidates are multiples of each other
    assert all(set(w) <= {0, 1, 2} and any(w) for w in three)


def test_equal_weights_give_the_plain_mean_bit_for_bit():
    rng = np.random.default_rng(0)
    grids = [rng.normal(size=(3, 5, 5)).astype(np.float32) * s for s in (1.0, 7.0, 0.1)]
    norm = np.array([[0.1, 1.0], [2.0, 7.0], [-0.3, 0.1]])
    before = np.mean([(g - mu) / sd for g, (mu, sd) in zip(grids, norm)], axis=0).astype(np.float32)
    np.testing.assert_array_equal(member_weights.combine(grids, norm), before)
    np.testing.assert_array_equal(member_weights.combine(grids, norm, np.ones(3)), before)
    # weighted: sum_i w_i z_i / sum_i w_i, and a member weighted 0 needs no grids at all
    w = np.array([2.0, 0.0, 1.0])
    z = [(g - mu) / sd for g, (mu, sd) in zip(grids, norm)]
    np.testing.assert_allclose(member_weights.combine([grids[0], None, grids[2]], norm, w),
                               (2 * z[0] + z[2]) / 3, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="non-zero"):
        member_weights.combine(grids, norm, np.zeros(3))


def test_damaged_weights_are_refused():
    for bad in ([1.0], [1.0, -1.0], [0.0, 0.0], [np.nan, 1.0], [[1.0, 1.0]]):
        with pytest.raises(ModelFileError, match="member weights"):
            member_weights.check_weights(np.array(bad), 2)
    assert member_weights.check_weights(np.array([0, 2]), 2).tolist() == [0.0, 2.0]


def test_choose_weights_keeps_the_member_that_outlines_the_defects():
    """Member 0's grids mark the defect's cells; member 1's are noise: "auto" keeps member 0 alone,
    and with the members swapped, member 1 alone. Every candidate is in the table."""
    rng = np.random.default_rng(0)
    cfg = preset("paper", **SMALL)  # image 64, grid 8
    n, g, s = 6, cfg.grid_size, cfg.image_size
    masks = np.zeros((n, s, s), dtype=bool)
    signal_normal = rng.normal(size=(n, g, g)) * 0.1
    signal_defect = rng.normal(size=(n, g, g)) * 0.1
    for i in range(n):
        r, c = rng.integers(1, g - 3, size=2)
        signal_defect[i, r : r + 2, c : c + 2] += 5.0
        masks[i, r * 8 : (r + 2) * 8, c * 8 : (c + 2) * 8] = True
    noise_normal, noise_defect = rng.normal(size=(n, g, g)), rng.normal(size=(n, g, g))
    norm = np.array([[0.0, 1.0], [0.0, 1.0]])
    w, table = member_weights.choose_weights(
        [signal_normal, noise_normal], [signal_defect, noise_defect], masks, norm, cfg
    )
    assert w.tolist() == [1.0, 0.0]
    assert [row["weights"] for row in table] == [list(c) for c in member_weights.candidate_weights(2)]
    best = max(table, key=lambda row: row["pixel_auprc"])
    assert best["weights"] == [1, 0] and best["pixel_auprc"] > 0.9
    w, _ = member_weights.choose_weights(
        [noise_normal, signal_normal], [noise_defect, signal_defect], masks, norm, cfg
    )
    assert w.tolist() == [0.0, 1.0]


def test_choose_weights_does_not_trade_a_kind_of_defect_for_the_pooled_figure():
    """Member 0 outlines the large defects and misses the small ones; member 1 finds the small ones
    but marks the large ones below normal. The pooled figure (its pixels mostly the large defects')
    prefers (2, 1), which loses the small kind by more than KIND_MARGIN against equal weights: with
    the defects' kinds, "auto" keeps equal weights, and the table says why."""
    rng = np.random.default_rng(0)
    cfg = preset("paper", **SMALL)  # image 64, grid 8
    n, g, s = 8, cfg.grid_size, cfg.image_size
    masks, kinds = np.zeros((n, s, s), dtype=bool), []
    a_def, b_def = rng.normal(size=(n, g, g)) * 0.1, rng.normal(size=(n, g, g)) * 0.5
    for i in range(n):
        size = 4 if i % 2 == 0 else 1
        kinds.append("large" if size == 4 else "small")
        r, c = rng.integers(1, g - size - 1, size=2)
        masks[i, r * 8 : (r + size) * 8, c * 8 : (c + size) * 8] = True
        if size == 4:
            a_def[i, r : r + size, c : c + size] += 5.0
            b_def[i, r : r + size, c : c + size] -= 3.0
        else:
            b_def[i, r : r + size, c : c + size] += 3.0
    normal = [rng.normal(size=(n, g, g)) * 0.1, rng.normal(size=(n, g, g)) * 0.5]
    norm = np.array([[0.0, 1.0], [0.0, 1.0]])
    pooled, _ = member_weights.choose_weights(normal, [a_def, b_def], masks, norm, cfg)
    assert pooled.tolist() == [2.0, 1.0]
    w, table = member_weights.choose_weights(normal, [a_def, b_def], masks, norm, cfg, kinds=kinds)
    assert w.tolist() == [1.0, 1.0]
    rows = {tuple(row["weights"]): row for row in table}
    equal, two_one = rows[1, 1], rows[2, 1]
    assert two_one["pixel_auprc"] > equal["pixel_auprc"] and not two_one["eligible"] and equal["eligible"]
    assert two_one["kinds_auprc"]["small"] < equal["kinds_auprc"]["small"] - member_weights.KIND_MARGIN
    assert set(equal["kinds_auprc"]) == {"large", "small"}
    with pytest.raises(ValueError, match="kinds"):
        member_weights.choose_weights(normal, [a_def, b_def], masks, norm, cfg, kinds=kinds[:-1])


def test_config_checks_ensemble_weights():
    assert preset("paper").ensemble_weights == "equal"
    with pytest.raises(ConfigError, match="ensemble_weights must be one of"):
        preset("paper", ensemble_weights="mean")
    five = tuple(f"layer_norm=true+aggregation={a}" for a in (1, 3, 5, 7))
    with pytest.raises(ConfigError, match="at most 4 members"):
        preset("paper", ensemble=five, ensemble_weights="auto")
    with pytest.raises(ConfigError, match="shared"):
        preset("paper", ensemble=("ensemble_weights=auto",))
    assert preset("paper", ensemble_weights="auto").ensemble_weights == "auto"  # one model: no effect


# ------------------------------------------------------------------------------ in the ensemble
@pytest.fixture(scope="module")
def auto_ensemble():
    cfg = preset("paper", **{**SMALL, "calibration_images": 4, "ensemble": ("layer_norm=true",),
                             "ensemble_weights": "auto"})
    return PatchKNN.from_config(cfg, **RUNTIME).fit(_images(6))


def test_auto_weights_are_chosen_at_fit_and_recorded(auto_ensemble):
    ens = auto_ensemble
    assert isinstance(ens, EnsemblePatchKNN)
    record = ens.fit_info_["calibration"]["member_weights"]
    assert record["method"] == "auto" and record["weights"] == ens.member_weights_.tolist()
    table = record["candidates"]
    assert [row["weights"] for row in table] == [list(c) for c in member_weights.candidate_weights(2)]
    assert table[0]["eligible"] and all(set(row["kinds_auprc"]) <= set(DEFECT_KINDS) for row in table)
    eligible = [row for row in table if row["eligible"]]
    best = max(row["pixel_auprc"] for row in eligible)
    chosen = next(row for row in eligible if row["pixel_auprc"] == best)  # the first of the best eligible
    assert np.array_equal(np.array(chosen["weights"], float), ens.member_weights_)
    # the threshold is calibrated on the weighted grids: the same rule on the chosen weights' scores
    assert ens.threshold_ is not None and np.isfinite(ens.threshold_)
    equal = preset("paper", **{**SMALL, "calibration_images": 4, "ensemble": ("layer_norm=true",)})
    eq = PatchKNN.from_config(equal, **RUNTIME).fit(_images(6))
    assert eq.member_weights_.tolist() == [1.0, 1.0]
    assert eq.fit_info_["calibration"]["member_weights"] == {"method": "equal", "weights": [1.0, 1.0]}
    if ens.member_weights_.tolist() == [1.0, 1.0]:  # same weights, same fit: same threshold
        assert ens.threshold_ == eq.threshold_


def _weighted(ens, weights):
    ens.member_weights_ = np.asarray(weights, dtype=np.float64)
    return ens


def test_weights_act_on_every_path_and_a_zero_member_is_not_scored(auto_ensemble, tmp_path):
    ens = auto_ensemble
    chosen = ens.member_weights_.copy()
    test = _images(2, seed=5)
    x = torch.from_numpy(np.stack(test)).permute(0, 3, 1, 2).contiguous()
    try:
        grids = [m.score_batch(x)[0] for m in ens.members]
        _weighted(ens, [1.0, 2.0])
        z = [(g.astype(np.float64) - mu) / sd for g, (mu, sd) in zip(grids, ens.norm_)]
        np.testing.assert_allclose(ens.score_batch(x)[0], (z[0] + 2 * z[1]) / 3, rtol=1e-5, atol=1e-5)
        expected = ens.predict(test)
        # saved and loaded: the same weights and answers
        loaded = PatchKNN.load(ens.save(tmp_path / "ens"), progress=False)
        assert loaded.member_weights_.tolist() == [1.0, 2.0]
        for a, b in zip(loaded.predict(test), expected):
            np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        # exported: the runtime weighs the members the same way
        out = export_model(ens, tmp_path / "exp")
        runtime = ExportedModel(out, "onnxruntime")
        assert runtime.member_weights_.tolist() == [1.0, 2.0]
        for a, b in zip(runtime.predict(test), expected):
            np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4,
                                       atol=1e-4 * float(np.abs(b.anomaly_map).max()))
        # a member weighted 0 is not scored, and its view leaves the maps
        _weighted(ens, [0.0, 1.0])
        calls = []
        ens.members[0].score_batch = lambda images: calls.append(1)  # type: ignore[method-assign]
        only = ens.score_batch(x)[0]
        del ens.members[0].score_batch
        assert not calls
        np.testing.assert_allclose(only, z[1], rtol=1e-5, atol=1e-5)
    finally:
        _weighted(ens, chosen)


def test_a_model_file_without_weights_loads_with_equal_weights(auto_ensemble, tmp_path):
    """Ensembles saved before ensemble_weights existed have no weights tensor: the plain mean."""
    from patchknn.serialization import load_model, save_model

    ens = auto_ensemble
    root = ens.save(tmp_path / "old")
    doc, groups = load_model(root)
    meta = {k: v for k, v in doc.items() if k not in ("format", "format_version", "patchknn_version", "files")}
    save_model(root, meta, {"ensemble": {"norm": groups["ensemble"]["norm"]}})
    loaded = PatchKNN.load(root, progress=False)
    assert loaded.member_weights_.tolist() == [1.0, 1.0]
    doc = json.loads((root / "patchknn.json").read_text())
    assert doc["kind"] == "ensemble"


def test_partial_fit_keeps_the_chosen_weights():
    """partial_fit makes no new synthetic defects: the weights chosen at fit stay (and say so)."""
    cfg = preset("paper", **{**SMALL, "calibration_images": 4, "ensemble": ("layer_norm=true",),
                             "ensemble_weights": "auto"})
    ens = PatchKNN.from_config(cfg, **RUNTIME).fit(_images(6))
    ens.member_weights_ = np.array([2.0, 1.0])  # as if fit had chosen them
    ens.partial_fit(_images(2, seed=9))
    assert ens.member_weights_.tolist() == [2.0, 1.0]
    record = ens.fit_info_["calibration"]["member_weights"]
    assert record["kept"] is True and record["weights"] == [2.0, 1.0] and len(record["candidates"]) == 5


# ---------------------------------------------------------------- a member's local contrast
def test_local_contrast_keeps_a_cells_peak_and_drops_broad_rises():
    z = np.zeros((2, 12, 12))
    z[0, 5, 5] = 3.0  # one cell above its neighbourhood
    z[1] = 2.0  # a rise over the whole grid
    z[1, :, 8:] += 1.0  # and a broad step
    c = member_weights.local_contrast(z, 1.5)
    assert c.min() >= 0.0 and c[0, 5, 5] > 2.5 and c[0, 5, 5] == c[0].max()
    assert c[1].max() < 0.5 and c[1, :, :5].max() < 1e-9  # a constant grid has no contrast
    assert member_weights.local_contrast(z, 0.0) is z
    # after the border fill: the two outer rings copy the inner cells before the blur
    edge = np.zeros((1, 12, 12))
    edge[0, 0, :] = 50.0  # the outermost ring's peak is filled away
    assert member_weights.local_contrast(edge, 1.5, border_cells=2).max() == 0.0
    assert member_weights.local_contrast(edge, 1.5).max() > 10.0


def test_combine_takes_a_highpass_members_local_contrast():
    rng = np.random.default_rng(3)
    grids = [rng.normal(size=(2, 10, 10)).astype(np.float32) * s for s in (3.0, 0.5)]
    norm = np.array([[0.5, 3.0], [0.0, 0.5]])
    z = [(g.astype(np.float64) - mu) / sd for g, (mu, sd) in zip(grids, norm)]
    expected = (member_weights.local_contrast(z[0], 1.5, 2) + z[1]) / 2
    got = member_weights.combine(grids, norm, None, [1.5, 0.0], 2)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(member_weights.combine(grids, norm, None, [0.0, 0.0], 2),
                                  member_weights.combine(grids, norm))


def test_grid_highpass_is_a_members_option_only():
    with pytest.raises(ConfigError, match="grid_highpass must be in"):
        preset("paper", grid_highpass=-1.0)
    with pytest.raises(ConfigError, match="grid_highpass must be a number"):
        preset("paper", grid_highpass=True)
    with pytest.raises(ConfigError, match="ensemble member"):
        PatchKNN.from_config(preset("paper", **SMALL, grid_highpass=1.0), **RUNTIME).fit(_images(3))
    cfg = preset("best", grid_highpass=1.5, ensemble=("layer_norm=true+aggregation=3+grid_highpass=0",))
    assert [(m.layer_norm, m.grid_highpass) for m in cfg.ensemble_members()] == [(False, 1.5), (True, 0.0)]


def test_a_highpass_member_is_combined_the_same_on_every_path(tmp_path, monkeypatch):
    cfg = preset("paper", **{**SMALL, "calibration_images": 4, "border_cells": 1, "grid_highpass": 1.0,
                             "ensemble": ("layer_norm=true+grid_highpass=0",)})
    seen, plain = [], member_weights.local_contrast
    monkeypatch.setattr(member_weights, "local_contrast", lambda z, *a: seen.append(z.shape) or plain(z, *a))
    ens = PatchKNN.from_config(cfg, **RUNTIME).fit(_images(6))
    assert (4, 8, 8) in seen  # the threshold is calibrated on the held-out grids combined the same way
    monkeypatch.undo()
    assert [m.config.grid_highpass for m in ens.members] == [1.0, 0.0]
    test = _images(2, seed=5)
    x = torch.from_numpy(np.stack(test)).permute(0, 3, 1, 2).contiguous()
    grids = [m.score_batch(x)[0] for m in ens.members]
    z = [(g.astype(np.float64) - mu) / sd for g, (mu, sd) in zip(grids, ens.norm_)]
    expected_grid = (member_weights.local_contrast(z[0], 1.0, 1) + z[1]) / 2
    np.testing.assert_allclose(ens.score_batch(x)[0], expected_grid, rtol=1e-5, atol=1e-5)
    expected = ens.predict(test)
    loaded = PatchKNN.load(ens.save(tmp_path / "ens"), progress=False)
    assert [m.config.grid_highpass for m in loaded.members] == [1.0, 0.0]
    for a, b in zip(loaded.predict(test), expected):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        assert a.score == b.score and a.is_anomalous == b.is_anomalous
    runtime = ExportedModel(export_model(ens, tmp_path / "exp"), "onnxruntime")
    for a, b in zip(runtime.predict(test), expected):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4,
                                   atol=1e-4 * float(np.abs(b.anomaly_map).max()))
        assert a.is_anomalous == b.is_anomalous
