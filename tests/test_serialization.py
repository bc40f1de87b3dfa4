import json

import numpy as np
import pytest
from conftest import tiny_model

from patchknn import ModelFileError, PatchKNN
from patchknn.serialization import META_FILE


@pytest.fixture()
def fitted(rng_images):
    return tiny_model(k=2).fit(rng_images)


def test_round_trip_identical_predictions(tmp_path, fitted, rng_images):
    fitted.threshold_ = 1.25
    path = fitted.save(tmp_path / "m")
    loaded = PatchKNN.load(path, progress=False)
    assert loaded.config == fitted.config
    assert loaded.threshold_ == 1.25
    a = fitted.predict(rng_images[:2])
    b = loaded.predict(rng_images[:2])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.anomaly_map, y.anomaly_map)
    doc = json.loads((path / META_FILE).read_text())
    assert doc["format"] == "patchknn-model" and doc["format_version"] == 1
    assert doc["patchknn_version"]
    assert all(f["file"].endswith(".safetensors") for f in doc["files"].values())


def test_resave_replaces_and_cleans(tmp_path, fitted, rng_images):
    path = fitted.save(tmp_path / "m")
    tiny_model(k=1).fit(rng_images[:2]).save(path)
    assert PatchKNN.load(path).config.k == 1
    assert len(list(path.glob("*.safetensors"))) == 2


def test_tampered_tensor_file_refused(tmp_path, fitted):
    path = fitted.save(tmp_path / "m")
    f = next(path.glob("tensors-*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        PatchKNN.load(path)


def test_truncated_file_refused(tmp_path, fitted):
    path = fitted.save(tmp_path / "m")
    f = next(path.glob("backbone-*.safetensors"))
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="checksum"):
        PatchKNN.load(path)


def test_wrong_format_version_refused(tmp_path, fitted):
    path = fitted.save(tmp_path / "m")
    doc = json.loads((path / META_FILE).read_text())
    doc["format_version"] = 99
    (path / META_FILE).write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="format version"):
        PatchKNN.load(path)


def test_unknown_backbone_refused(tmp_path, fitted):
    path = fitted.save(tmp_path / "m")
    doc = json.loads((path / META_FILE).read_text())
    doc["config"]["backbone"] = "mystery-net"
    (path / META_FILE).write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="mystery-net"):
        PatchKNN.load(path)


def test_not_a_model(tmp_path):
    with pytest.raises(ModelFileError, match="no such model"):
        PatchKNN.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="not a patchknn model"):
        PatchKNN.load(tmp_path / "empty")
    (tmp_path / "empty" / META_FILE).write_text("{not json")
    with pytest.raises(ModelFileError, match="JSON"):
        PatchKNN.load(tmp_path / "empty")


def test_path_traversal_in_file_names_refused(tmp_path, fitted):
    path = fitted.save(tmp_path / "m")
    doc = json.loads((path / META_FILE).read_text())
    doc["files"]["tensors"]["file"] = "../../etc/passwd"
    (path / META_FILE).write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="plain name"):
        PatchKNN.load(path)
