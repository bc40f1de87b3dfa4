import pytest

from patchknn import ConfigError, PatchKNN, PatchKNNConfig, preset


def test_paper_preset_is_the_paper():
    c = preset("paper")
    assert c.backbone == "resnet50-keras"  # the paper ran Keras' ResNet50
    assert c.resolved_layers == ("layer1", "layer2", "layer3")
    assert (c.image_size, c.grid_size, c.pca_variance, c.k) == (224, 28, 0.95, 1)
    assert (c.aggregation, c.layer_norm, c.smoothing_sigma, c.image_score) == (1, False, 0.0, "max")


def test_keras_aliases_resolve():
    c = PatchKNNConfig(layers=("conv2_block3_out", "conv3_block4_out", "conv4_block6_out"))
    assert c.resolved_layers == ("layer1", "layer2", "layer3")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pca_variance": 0.0}, "pca_variance"),
        ({"pca_variance": 1.5}, "pca_variance"),
        ({"k": 0}, "k must be"),
        ({"grid_size": 64}, "grid_size"),
        ({"image_size": 100}, "multiple of 16"),
        ({"layers": ("layer9",)}, "unknown layer"),
        ({"backbone": "vgg"}, "unknown backbone"),
        ({"aggregation": 2}, "odd"),
        ({"image_score": "mean"}, "image_score"),
        ({"smoothing_sigma": -1}, "smoothing_sigma"),
    ],
)
def test_impossible_values_fail_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PatchKNN(**kwargs)


def test_unknown_preset_lists_names():
    with pytest.raises(ConfigError, match="paper"):
        preset("nope")


def test_round_trip_dict():
    c = PatchKNNConfig(k=3, layers=("layer2", "layer3"))
    assert PatchKNNConfig.from_dict(c.to_dict()) == c.replace(layers=("layer2", "layer3"))
    with pytest.raises(ConfigError, match="unknown option"):
        PatchKNNConfig.from_dict({"bogus": 1})


def test_runtime_options_validated():
    with pytest.raises(ConfigError, match="batch_size"):
        PatchKNN(batch_size=0)
    with pytest.raises(ConfigError, match="on_error"):
        PatchKNN(on_error="ignore")
    with pytest.raises(ConfigError, match="device"):
        PatchKNN(device="tpu")
