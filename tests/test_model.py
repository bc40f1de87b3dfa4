import numpy as np
import pytest
from conftest import tiny_model
from PIL import Image

from patchknn import NotFittedError, PatchKNN, Prediction
from patchknn.errors import ConfigError, ImageError


def test_fit_predict_shapes_and_scores(synthetic_root):
    train = sorted((synthetic_root / "synthetic" / "train" / "good").glob("*.png"))
    model = tiny_model().fit(train)
    assert model.is_fitted
    info = model.fit_info_
    assert info["n_train_images"] == len(train)
    assert info["bank_size"] == len(train) * 64
    assert 1 <= info["n_components"] <= info["feature_dim"]
    preds = model.predict(train[:2])
    assert all(isinstance(p, Prediction) for p in preds)
    assert preds[0].anomaly_map.shape == (64, 64)
    assert preds[0].anomaly_map.dtype == np.float32
    # a training image is in the bank: its patches are at distance ~0
    assert preds[0].score == pytest.approx(float(preds[0].anomaly_map.max()))
    assert preds[0].score < 1e-2
    assert preds[0].verdict == "OK" and not preds[0].mask.any()  # calibrated threshold by default


def test_inputs_paths_folder_pil_arrays_agree(synthetic_root):
    folder = synthetic_root / "synthetic" / "train" / "good"
    train = sorted(folder.glob("*.png"))
    model = tiny_model().fit(folder)
    assert model.fit_info_["n_train_images"] == len(train)
    test = sorted((synthetic_root / "synthetic" / "test").glob("*/*.png"))[:2]
    by_path = model.predict(test)
    by_pil = model.predict([Image.open(p) for p in test])
    by_arr = model.predict([np.asarray(Image.open(p).convert("RGB")) for p in test])
    for a, b, c in zip(by_path, by_pil, by_arr):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        np.testing.assert_array_equal(a.anomaly_map, c.anomaly_map)
    assert by_arr[0].source == "<array #0>"


def test_output_sizes(rng_images):
    model = tiny_model().fit(rng_images)
    assert model.predict(rng_images[:1], output_size="original")[0].anomaly_map.shape == (80, 72)
    assert model.predict(rng_images[:1], output_size=(30, 40))[0].anomaly_map.shape == (30, 40)
    assert model.predict(rng_images[:1], output_size=32)[0].anomaly_map.shape == (32, 32)


def test_anomaly_scores_higher_on_defects(synthetic_root):
    from patchknn.data import MVTecCategory

    ds = MVTecCategory(synthetic_root, "synthetic")
    model = tiny_model().fit(ds.train_paths())
    samples = ds.test_samples()
    preds = model.predict([s.path for s in samples])
    good = [p.score for p, s in zip(preds, samples) if s.label == 0]
    bad = [p.score for p, s in zip(preds, samples) if s.label == 1]
    assert np.isfinite(good + bad).all()
    assert np.mean(bad) > np.mean(good)


def test_deterministic_bit_identical(rng_images):
    a = tiny_model(seed=3).fit(rng_images).predict(rng_images[:2])
    b = tiny_model(seed=3).fit(rng_images).predict(rng_images[:2])
    for x, y in zip(a, b):
        assert np.array_equal(x.anomaly_map, y.anomaly_map)


def test_k_and_options_run(rng_images):
    for opts in [
        {"k": 3},
        {"pca_variance": None},
        {"aggregation": 3, "layer_norm": True},
        {"smoothing_sigma": 1.0, "image_score": "topk_mean", "image_score_topk": 5},
    ]:
        preds = tiny_model(**opts).fit(rng_images).predict(rng_images[:1])
        assert np.isfinite(preds[0].anomaly_map).all()


def test_k_larger_than_bank_fails_clearly(rng_images):
    with pytest.raises(Exception, match="larger than the memory bank"):
        tiny_model(k=1000).fit(rng_images[:1])


def test_threshold_gives_verdict_and_mask(rng_images):
    model = tiny_model().fit(rng_images[:2])
    model.threshold_ = 0.5
    p = model.predict(rng_images[2:3])[0]
    assert p.verdict in ("OK", "NG")
    assert p.mask.shape == p.anomaly_map.shape
    assert p.is_anomalous == (p.score >= 0.5)


def test_not_fitted():
    with pytest.raises(NotFittedError):
        tiny_model().predict([np.zeros((32, 32, 3), np.uint8)])


def test_bad_file_stop_and_skip(tmp_path, rng_images):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    good = tmp_path / "good.png"
    Image.fromarray(rng_images[0]).save(good)
    with pytest.raises(ImageError, match="bad.png"):
        tiny_model().fit([good, bad])
    model = tiny_model(on_error="skip").fit([good, bad])
    assert model.fit_info_["n_train_images"] == 1
    assert [s for s, _ in model.skipped_] == [str(bad)]
    preds = model.predict([bad, good])
    assert preds[0].error and preds[0].score is None
    assert preds[1].error is None and preds[1].score is not None


def test_repr_and_params():
    m = PatchKNN(k=3)
    assert "k=3" in repr(m)
    assert m.get_params()["k"] == 3
    assert PatchKNN.from_preset("paper", k=2).config.k == 2


# ------------------------------------------------------------------------ the estimator contract
def test_constructor_parameters_are_the_config_fields_with_the_same_defaults():
    """scikit-learn's contract: the parameters are the constructor's; here the config owns their
    defaults, and the constructor's signature must not drift from it."""
    import dataclasses
    import inspect

    from patchknn.config import PatchKNNConfig

    sig = inspect.signature(PatchKNN.__init__).parameters
    method = [p for p in sig.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]
    fields = dataclasses.fields(PatchKNNConfig)
    assert [p.name for p in method] == [f.name for f in fields]
    config = PatchKNNConfig()
    for p in method:
        default = p.default if p.name not in ("layers", "tta", "ensemble") else None
        if default is None:
            continue
        assert default == getattr(config, p.name), p.name
    assert PatchKNN().get_params() == {f.name: getattr(config, f.name) for f in fields}


def test_set_params_validates_changes_and_discards_the_fit(rng_images):
    model = tiny_model()
    model.fit(rng_images)
    assert model.is_fitted
    assert model.set_params(k=2, smoothing_sigma=0.5) is model
    assert model.get_params()["k"] == 2 and model.config.smoothing_sigma == 0.5
    assert not model.is_fitted and model.threshold_ is None
    with pytest.raises(ConfigError, match="unknown option"):
        model.set_params(kk=3)
    with pytest.raises(ConfigError):
        model.set_params(k=0)
    assert model.get_params()["k"] == 2  # a refused change leaves the options as they were
    clone = PatchKNN(**model.get_params(), weights="random", progress=False)
    assert clone.config == model.config


def test_auto_precision_is_bfloat16_only_where_it_is_native(monkeypatch):
    """The fast preset's precision="auto": bfloat16 where the CPU has it natively, float32 where
    oneDNN would emulate it (about 2x slower than float32)."""
    import torch

    from patchknn import execution

    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(execution, "native_bf16", lambda native=native: native)
        assert execution.resolve_precision("auto", torch.device("cpu")) == expected
        assert execution.resolve_precision("float32", torch.device("cpu")) == "float32"
        model = PatchKNN.from_preset("fast", backbone="resnet50", weights="random", image_size=64, grid_size=8)
        assert model.config.precision == "auto" and model.extractor.precision == expected
    assert execution.resolve_precision("auto", torch.device("cuda")) == "bfloat16"


def test_native_bf16_follows_the_cpu_flags():
    from pathlib import Path

    from patchknn.execution import native_bf16

    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = next(line for line in info.read_text().splitlines() if line.startswith("flags")).split()
    assert native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
