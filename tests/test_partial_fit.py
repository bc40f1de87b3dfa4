"""PatchKNN.partial_fit (issue 16): exact against a fit on all the images with the first PCA.

The reference of every check is built through fit's own path: a model loaded from the fit on A
(same backbone, same PCA) whose ``fit_store`` gets the features of A + B and ``pca=`` that PCA.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import TINY, tiny_model

from patchknn import PatchKNN
from patchknn.bank import collect_features
from patchknn.config import PatchKNNConfig
from patchknn.errors import ConfigError, NotFittedError
from patchknn.index import build_index
from patchknn.threshold import calibrate, held_out_grids, separating_threshold, threshold_from_scores

#: small and quick: two layers of the random-weight ResNet-50 (its layer3 is 80 % of the build time)
# the quantile rule: these tests check that partial_fit recalibrates exactly as a fit does (the
# "defects" rule keeps the fit's operating point instead: test_defects_rule_keeps_the_operating_point)
CAL = {"layers": ("layer1", "layer2"), "calibration_images": 8, "num_workers": 0, "threshold_method": "quantile"}


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = [rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8) for _ in range(9)]
    out[-1] = np.full((64, 64, 3), 250, dtype=np.uint8)  # far from every other image: new patches to keep
    return out


def reference(saved_a, images, runtime=None) -> PatchKNN:
    """A fit on ``images`` with the PCA of the model saved at ``saved_a`` (fit's own path)."""
    ref = PatchKNN.load(saved_a, **(runtime or {"progress": False, "num_workers": 0}))
    return ref.fit_store(collect_features(ref, images).store, time.perf_counter(), pca=ref.pca_)


def assert_same_answers(model, ref, images) -> list:
    got, want = model.predict(images), ref.predict(images)
    for g, w in zip(got, want):
        assert g.score == pytest.approx(w.score, rel=1e-4, abs=1e-4)
        assert g.is_anomalous == w.is_anomalous
        np.testing.assert_allclose(g.anomaly_map, w.anomaly_map, rtol=1e-4, atol=1e-3)
    return got


@pytest.fixture(scope="module")
def flat(images, tmp_path_factory):
    """Fit on A = images[:6], saved, then partial_fit(B = images[6:])."""
    a, b = images[:6], images[6:]
    model = tiny_model(**CAL).fit(a)
    saved = model.save(tmp_path_factory.mktemp("flat") / "a")
    threshold_a = model.threshold_
    model.partial_fit(b)
    return model, saved, threshold_a


def test_partial_fit_equals_a_fit_with_the_old_pca(flat, images):
    model, saved, threshold_a = flat
    ref = reference(saved, images)
    np.testing.assert_array_equal(model.pca_.components, ref.pca_.components)  # PCA unchanged
    np.testing.assert_allclose(model.index_.bank, ref.index_.bank, rtol=1e-5, atol=1e-4)
    assert model.index_.bank.shape[0] == 9 * TINY["grid_size"] ** 2
    # the threshold recalibrated by fit's rule over the 9 images, not kept from A
    assert model.threshold_ == pytest.approx(ref.threshold_, rel=1e-5)
    assert model.threshold_ != pytest.approx(threshold_a, rel=1e-3)
    assert model.fit_info_["calibration"]["n_images"] == 8
    assert model.fit_info_["n_train_images"] == 9
    assert model.fit_info_["added"] == {"names": ["<array #0>", "<array #1>", "<array #2>"], "count": 3}
    assert_same_answers(model, ref, images[4:8])


def test_defects_rule_keeps_the_operating_point(images):
    """With threshold_method="defects" (the default) fit separates held-out normal scores from
    synthetic defects on the same images; partial_fit (no defects: only the new images are at
    hand) applies the share of normal scores the fit put below its threshold to its new scores."""
    model = tiny_model(**{**CAL, "threshold_method": "defects"}).fit(images[:6])
    cal = model.fit_info_["calibration"]
    normal, made = np.array(cal["image_scores"]), np.array(cal["defect_scores"])
    assert cal["n_defects"] == 2 * len(normal) == made.size
    cap = float(np.quantile(normal, 0.99))
    assert model.threshold_ == pytest.approx(min(separating_threshold(normal, made), cap), rel=1e-6)
    assert cal["defects_quantile"] == pytest.approx(float((normal < model.threshold_).mean()))
    model.partial_fit(images[6:])
    after = model.fit_info_["calibration"]
    assert after["defects_quantile"] == cal["defects_quantile"] and "defect_scores" not in after
    assert model.threshold_ == pytest.approx(float(np.quantile(after["image_scores"], cal["defects_quantile"])))


def test_partial_fit_of_a_loaded_model_is_the_same(flat, images):
    model, saved, _ = flat
    loaded = PatchKNN.load(saved, progress=False, num_workers=0).partial_fit(images[6:])
    np.testing.assert_allclose(loaded.index_.bank, model.index_.bank, rtol=1e-6, atol=1e-5)
    assert loaded.threshold_ == pytest.approx(model.threshold_, rel=1e-6)


def test_partial_fit_errors(images):
    with pytest.raises(NotFittedError):
        tiny_model(**CAL).partial_fit(images[:1])
    model = tiny_model(**{**CAL, "threshold_method": "none"}).fit(images[:2])
    with pytest.raises(ConfigError, match="at least one normal image"):
        model.partial_fit([])
    model.partial_fit(images[2:3])  # no threshold method: the bank still grows, no threshold
    assert model.threshold_ is None and model.index_.bank.shape[0] == 3 * TINY["grid_size"] ** 2


def greedy_continued(bank: np.ndarray, kept: np.ndarray, start: int, m: int) -> list[int]:
    """The textbook greedy k-center, continued from ``kept`` over ``bank[start:]`` (squared
    distances, no projection: the tiny model's PCA has fewer dimensions than ``coreset_dim``)."""
    x = bank.astype(np.float64)
    d = ((x[start:, None, :] - x[None, kept, :]) ** 2).sum(-1).min(axis=1)
    chosen = []
    for _ in range(m):
        j = int(np.argmax(d))
        chosen.append(start + j)
        d = np.minimum(d, ((x[start:] - x[start + j]) ** 2).sum(-1))
        d[j] = -np.inf
    return sorted(chosen)


def test_coreset_is_continued_from_the_kept_rows(images, tmp_path):
    """With a coreset: old kept rows stay, new rows are chosen by greedy k-center continued from
    them (ceil(ratio x new rows)); bank, threshold and answers equal a model built from that bank."""
    a, b = images[:6], images[6:]
    model = tiny_model(coreset_ratio=0.25, **CAL).fit(a)
    saved = model.save(tmp_path / "a")
    full_a, kept_a = (x.copy() for x in model.training_.rows())
    assert full_a.shape[1] < model.config.coreset_dim  # so the test's greedy needs no projection
    model.partial_fit(b)
    full, kept = model.training_.rows()
    cells = TINY["grid_size"] ** 2
    ref = reference(saved, images)  # a fit on A + B with the old PCA: same full bank
    np.testing.assert_allclose(full, ref.training_.full, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(kept[: kept_a.size], kept_a)
    new = kept[kept_a.size :]
    m = int(np.ceil(0.25 * 3 * cells))
    assert new.size == m and new.min() >= 6 * cells
    assert new.tolist() == greedy_continued(full, kept_a, 6 * cells, m)
    # the image far from the bank: its patches go first (all of its distinct ones are kept)
    assert np.isin(np.arange(8 * cells, 9 * cells), new).any()
    np.testing.assert_array_equal(model.index_.bank, full[kept])
    # threshold: fit's rule (coreset folds) on the full bank with these kept rows
    expected = PatchKNN.load(saved, progress=False)
    expected.index_ = build_index(full[kept], "flat")
    cal = calibrate(expected, full, 9, bank_rows=kept, index_bank=full[kept], progress=False)
    assert model.threshold_ == pytest.approx(cal.threshold, rel=1e-6)
    expected.threshold_ = cal.threshold
    assert_same_answers(model, expected, images[4:8])
    # a loaded coreset model reads its training bank from the file and gives the same result
    loaded = PatchKNN.load(saved, progress=False, num_workers=0)
    assert loaded.training_ is not None and loaded.training_.full is None  # not read until needed
    loaded.partial_fit(b)
    np.testing.assert_array_equal(loaded.training_.kept, kept)
    assert loaded.threshold_ == pytest.approx(model.threshold_, rel=1e-6)
    small = PatchKNN.load(loaded.save(tmp_path / "small", training=False), progress=False, num_workers=0)
    assert not list((tmp_path / "small").glob("training-*"))  # a smaller file, without partial_fit
    with pytest.raises(ConfigError, match="no training bank"):
        small.partial_fit(b[:1])
    # and saves it again (the version after this one can be partially fitted too)
    again = PatchKNN.load(loaded.save(tmp_path / "ab"), progress=False)
    np.testing.assert_array_equal(again.training_.rows()[1], kept)


def test_ensemble_partial_fit_per_member(images, tmp_path, monkeypatch):
    """The best preset's structure (raw + layer-normalised views, coreset) on tiny data: every
    member exact, the ensemble's normalisation and threshold by fit's rule on their new grids."""
    from patchknn.ensemble import EnsemblePatchKNN

    config = PatchKNNConfig(
        backbone="resnet50", layers=("layer1", "layer2"), image_size=64, grid_size=8, coreset_ratio=0.5,
        calibration_images=8, threshold_method="quantile",
        ensemble=("layer_norm=true",),
    )
    ens = EnsemblePatchKNN(None, config, weights="random", progress=False, num_workers=0).fit(images[:6])
    saved = ens.save(tmp_path / "ens")
    ens.partial_fit(images[6:])
    assert ens.fit_info_["n_train_images"] == 9 and ens.fit_info_["added"]["count"] == 3
    refs = []
    for i, member in enumerate(ens.members):
        folder = sorted(p for p in saved.iterdir() if p.name.startswith(f"member-{i}-"))[0]
        ref = reference(folder, images)
        np.testing.assert_allclose(member.training_.full, ref.training_.full, rtol=1e-5, atol=1e-4)
        full, kept = member.training_.rows()
        refs.append((ref, full, kept))
    # the ensemble's rule on the members' held-out grids (threshold.held_out_grids, same folds)
    grids = [held_out_grids(m, full, 9, bank_rows=kept, index_bank=m.index_.bank)[1] for m, (_, full, kept)
             in zip(ens.members, refs)]
    norm = np.array([(g.mean(), max(g.std(), 1e-12)) for g in grids])
    np.testing.assert_allclose(ens.norm_, norm, rtol=1e-5)
    from patchknn import scoring

    z = np.mean([(g - mu) / sd for g, (mu, sd) in zip(grids, norm)], axis=0).astype(np.float32)
    scores = np.array([scoring.image_score(g, ens.config) for g in z])
    assert ens.threshold_ == pytest.approx(threshold_from_scores(scores, "quantile", quantile=0.99), rel=1e-5)
    # saved and loaded as a version: the same answers
    from patchknn.versions import list_versions, load_version, save_version

    info = save_version(ens, saved, author="qa", note="three more")
    assert info.number == 2 and info.n_added == 3 and [v.number for v in list_versions(saved)] == [1, 2]
    back = load_version(saved, progress=False, num_workers=0)
    assert isinstance(back, EnsemblePatchKNN) and back.threshold_ == pytest.approx(ens.threshold_)
    # a reader that read the folder's patchknn.json just before the switch to version 2: its
    # member folders are gone from the root, so it reads the new version instead of failing
    from patchknn import ensemble as ensemble_module
    from patchknn.serialization import load_model
    from patchknn.versions import version_path

    stale = [load_model(version_path(saved, 1))]
    monkeypatch.setattr(ensemble_module, "load_model", lambda p: stale.pop() if stale else load_model(p))
    late = EnsemblePatchKNN.load(saved, progress=False, num_workers=0)
    assert not stale and late.threshold_ == pytest.approx(ens.threshold_)
    monkeypatch.undo()
    assert back.predict(images[:2])[0].score == pytest.approx(ens.predict(images[:2])[0].score, rel=1e-5)


def test_bottle_partial_fit_is_exact(mvtec_root, caffe_weights, tmp_path):
    """Real data, the paper's method: fit on 12 bottle training images, partial_fit 6 more; the
    bank, threshold and answers on test images (good and defective) equal a fit on the 18 with
    the PCA of the 12."""
    train = sorted((mvtec_root / "bottle" / "train" / "good").glob("*.png"))
    a, b = [str(p) for p in train[:12]], [str(p) for p in train[12:18]]
    test = sorted((mvtec_root / "bottle" / "test" / "good").glob("*.png"))[:2]
    test += sorted((mvtec_root / "bottle" / "test" / "broken_large").glob("*.png"))[:2]
    runtime = {"weights": str(caffe_weights), "progress": False, "num_workers": 0}
    model = PatchKNN.from_preset("paper", **runtime).fit(a)
    saved = model.save(tmp_path / "a")
    model.partial_fit(b)
    ref = reference(saved, a + b, {"progress": False, "num_workers": 0})
    assert model.fit_info_["n_train_images"] == 18 and model.fit_info_["added"]["names"] == b
    np.testing.assert_allclose(model.index_.bank, ref.index_.bank, rtol=1e-4, atol=1e-3)
    # the same held-out scores; the paper preset's "defects" rule keeps the operating point of the
    # fit on A (the share of held-out normal scores below its threshold) on them
    held, want = model.fit_info_["calibration"], ref.fit_info_["calibration"]
    np.testing.assert_allclose(held["image_scores"], want["image_scores"], rtol=1e-5)
    q = PatchKNN.load(saved).fit_info_["calibration"]["defects_quantile"]
    assert held["defects_quantile"] == q
    assert model.threshold_ == pytest.approx(float(np.quantile(held["image_scores"], q)), rel=1e-6)
    ref.threshold_ = model.threshold_
    got = assert_same_answers(model, ref, [str(p) for p in test])
    assert [p.verdict for p in got][2:] == ["NG", "NG"]  # the broken bottles stay detected
