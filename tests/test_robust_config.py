"""Impossible options fail at construction with a message that says what is allowed (issue #7,
"Configuration input"); the one check that needs the data (k against the bank) fails clearly at fit.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys

import numpy as np
import pytest
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from patchknn import ConfigError, PatchKNN, PatchKNNConfig, preset
from patchknn.backbones import available_backbones

FAST = {"layers": ["layer1"], "image_size": 32, "grid_size": 8, "threshold_method": "none"}

IMPOSSIBLE = [
    # pca_variance outside (0, 1]
    ({"pca_variance": 0.0}, r"pca_variance must be in \(0, 1\] or None"),
    ({"pca_variance": -0.5}, r"pca_variance must be in \(0, 1\]"),
    ({"pca_variance": 1.0000001}, r"pca_variance must be in \(0, 1\]"),
    ({"pca_variance": 95}, r"pca_variance must be in \(0, 1\]"),
    ({"pca_variance": math.nan}, r"pca_variance must be in \(0, 1\]"),
    ({"pca_variance": math.inf}, r"pca_variance must be in \(0, 1\]"),
    ({"pca_variance": "0.9"}, r"pca_variance must be in \(0, 1\]"),
    ({"pca_variance": [0.9]}, r"pca_variance must be in \(0, 1\]"),
    ({"pca_variance": True}, "pca_variance must be a number"),
    # k < 1 (and absurd)
    ({"k": 0}, r"k must be an integer in \[1, 10000\]"),
    ({"k": -3}, r"k must be an integer in \[1, 10000\]"),
    ({"k": 1.0}, r"k must be an integer in \[1, 10000\]"),
    ({"k": True}, r"k must be an integer in \[1, 10000\]"),
    ({"k": "3"}, r"k must be an integer in \[1, 10000\]"),
    ({"k": 10**9}, r"k must be an integer in \[1, 10000\]"),
    # grid larger than the feature map
    (
        {"grid_size": 29, "image_size": 224, "layers": ["layer2", "layer3"]},
        "grid_size 29 is larger than the finest feature map .* use at most 28",
    ),
    ({"grid_size": 57, "image_size": 224, "layers": ["layer1"]}, "use at most 56"),
    ({"grid_size": 0}, r"grid_size must be an integer in \[1, 1024\]"),
    # unknown layer or backbone names: the message lists the choices
    ({"layers": ["layer9"]}, "unknown layer 'layer9' for backbone 'resnet50-(keras|caffe)'; choose from: layer1"),
    ({"layers": ["layer4"]}, "unknown layer 'layer4' .* choose from: layer1 .* layer3"),  # the Caffe net stops at 3
    ({"backbone": "resnet50", "layers": ["stage2"]}, "choose from: layer1"),
    ({"backbone": "efficientnet-lite2", "layers": ["layer1"]}, "choose from: stage2"),
    ({"layers": []}, "at least one layer"),
    ({"layers": ["layer1", "conv2_block3_out"]}, "distinct"),  # an alias of the same layer
    ({"layers": "layer1"}, r"layers must be a list of names, e\.g\."),
    ({"layers": 3}, "layers must be a list of names"),
    ({"backbone": "vgg16"}, "unknown backbone 'vgg16'; choose from: " + ", ".join(available_backbones())),
    ({"backbone": None}, "unknown backbone None; choose from"),
    # an image size the backbone cannot use
    ({"image_size": 100}, "image_size must be a multiple of 16 .*deepest layer"),
    ({"image_size": 100, "layers": ["layer1", "layer2"], "grid_size": 8}, "multiple of 8"),
    ({"image_size": 226, "layers": ["layer1"], "grid_size": 8}, "multiple of 4"),
    ({"backbone": "efficientnet-lite2", "layers": ["stage5"], "image_size": 240, "grid_size": 7}, "multiple of 32"),
    ({"image_size": 16, "grid_size": 1}, r"image_size must be an integer in \[32, 4096\]"),
    ({"image_size": 10**6}, r"image_size must be an integer in \[32, 4096\]"),
    ({"image_size": 224.0}, r"image_size must be an integer"),
    # the others
    ({"aggregation": 2}, "odd"),
    ({"smoothing_sigma": -1}, r"smoothing_sigma must be in \[0, 32\]"),
    ({"smoothing_sigma": True}, "smoothing_sigma must be a number"),
    ({"image_score": "mean"}, "image_score must be one of"),
    ({"index": "annoy"}, "index must be one of"),
    ({"coreset_ratio": 0}, r"coreset_ratio must be in \(0, 1\]"),
    ({"threshold_method": "otsu"}, "threshold_method must be one of"),
    ({"threshold_quantile": 1.5}, r"threshold_quantile must be in \(0, 1\]"),
    ({"tta": ["rot90"]}, "tta must be distinct values from"),
    ({"tta": "hflip"}, "tta must be a list of names"),
    ({"seed": -1}, "seed must be an integer in"),
]


@pytest.mark.parametrize("kwargs, message", IMPOSSIBLE, ids=[repr(k)[:50] for k, _ in IMPOSSIBLE])
def test_impossible_values_fail_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PatchKNN(**kwargs)
    with pytest.raises(ConfigError, match=message):
        PatchKNNConfig(**kwargs)


def test_construction_reads_nothing():
    """Validation happens without building the backbone or touching weights (fast, offline)."""
    model = PatchKNN(backbone="resnet50-caffe", weights="/nonexistent/weights.h5")
    assert model._extractor is None and not model.is_fitted


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer"),
        ({"num_workers": -1}, "num_workers must be"),
        ({"on_error": "ignore"}, "on_error must be 'stop' or 'skip'"),
        ({"device": "tpu"}, "device must be"),
        ({"max_pixels": 0}, "max_pixels must be a positive integer or None"),
        ({"max_pixels": -5}, "max_pixels must be a positive integer or None"),
        ({"max_pixels": 1e9}, "max_pixels must be a positive integer or None"),
    ],
)
def test_runtime_options_fail_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PatchKNN(**kwargs)


def test_k_larger_than_the_bank_fails_clearly_at_fit():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    model = tiny_model(k=129, **FAST)  # 2 images x 8x8 grid = 128 patches
    with pytest.raises(ConfigError, match=r"k=129 is larger than the memory bank \(128 patches\)"):
        model.fit(images)
    assert not model.is_fitted
    exact = tiny_model(k=128, **FAST)
    exact._extractor = model.extractor  # the same backbone: no need to build it twice
    exact.fit(images)
    assert exact.index_.size == 128


def test_preset_and_dict_errors():
    with pytest.raises(ConfigError, match="unknown preset .no-such-preset.; choose from: paper"):
        preset("no-such-preset")
    with pytest.raises(ConfigError, match="unknown option"):
        preset("paper", kk=3)
    with pytest.raises(ConfigError, match="unknown option.*known:"):
        PatchKNNConfig.from_dict({"K": 3})
    for bad in ([], "k=3", None, 5, {1: 2}):
        with pytest.raises(ConfigError, match="mapping of option names"):
            PatchKNNConfig.from_dict(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="k must be"):
        PatchKNNConfig().replace(k=0)


# -------------------------------------------------------------------------------------------------
# property: any value for any option -> a valid configuration or a ConfigError, nothing else
# -------------------------------------------------------------------------------------------------
FIELDS = [f.name for f in dataclasses.fields(PatchKNNConfig)]
anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.sampled_from([0, 1, 2, 3, 7, 8, 16, 28, 32, 64, 224, 4096])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
    | st.sampled_from(["layer1", "layer2", "layer3", "stage2", "resnet50", "efficientnet-lite2", "hflip", "max"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.tuples(inner) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=5,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), anything, min_size=1, max_size=3))
def test_property_any_values(values):
    try:
        config = PatchKNNConfig(**values)
    except ConfigError as e:
        message = str(e)
        assert message and "Traceback" not in message
        # the message names the option it is about (or the backbone/layer choices)
        assert any(name in message for name in (*values, "backbone", "layer", "layers")), message
        return
    # accepted: the documented constraints hold
    assert isinstance(config.k, int) and config.k >= 1
    assert config.pca_variance is None or 0 < config.pca_variance <= 1
    assert config.image_size % 4 == 0 and config.grid_size <= config.image_size // 4
    assert isinstance(config.layers, tuple) and all(isinstance(n, str) for n in config.layers)
    assert PatchKNNConfig.from_dict(config.to_dict()) == config  # what is saved loads back


# -------------------------------------------------------------------------------------------------
# the command line: one clear line, exit code 2
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--pca-variance", "1.5"], r"pca_variance must be in \(0, 1\]"),
        (["--k", "0"], "k must be an integer"),
        (["--layers", "layer1,layer9"], "unknown layer 'layer9'.*choose from"),
        (["--backbone", "vgg"], "unknown backbone 'vgg'; choose from"),
        (["--image-size", "100"], "multiple of 16"),
        (["--grid-size", "99"], "use at most"),
        (["--set", "k=abc"], "--set k: 'abc' is not a valid int"),
        (["--set", "nope=1"], "--set expects NAME=VALUE"),
        (["--set", "layer_norm=maybe"], "--set layer_norm= expects true or false, got 'maybe'"),
        (["--set", "precision=float16"], "precision must be one of"),
        (["--on-error", "ignore"], "on_error must be 'stop' or 'skip'"),
    ],
)
def test_cli_bad_options_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    from patchknn import cli

    (tmp_path / "a.png").write_bytes(b"")  # never read: options are checked first
    monkeypatch.setattr(sys, "argv", ["patchknn", "fit", str(tmp_path), "-o", str(tmp_path / "m"), *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err), err
    assert err.count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "m").exists()
