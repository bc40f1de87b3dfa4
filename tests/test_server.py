"""The inspection server through real HTTP: uvicorn on a free loopback port, httpx as the client.

Every test talks to 127.0.0.1 only. Servers run in a thread of this process (so a test can give the
app a deliberately slow model), and once as a subprocess through the real ``patchknn serve`` command.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _live import LiveServer  # noqa: E402
from conftest import tiny_model  # noqa: E402

from patchknn import PatchKNN  # noqa: E402
from patchknn.errors import ConfigError  # noqa: E402
from patchknn.server.auth import KeyChecker, bearer_token, check_bind, is_loopback, load_api_keys  # noqa: E402
from patchknn.server.settings import ServedModel, ServerSettings, load_models, parse_model_spec  # noqa: E402

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "another-key-fedcba9876543210"
AUTH = {"Authorization": f"Bearer {KEY}"}
REL = 1e-5  # float32: a convolution's result changes in the last bits with the batch size


# ------------------------------------------------------------------------------------ helpers
def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def gauge(client: httpx.Client, name: str, headers: dict | None = None) -> float:
    text = client.get("/metrics", headers=headers or {}).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def error_count(client: httpx.Client, code: str, headers: dict | None = None) -> int:
    text = client.get("/metrics", headers=headers or {}).text
    match = re.search(rf'^patchknn_errors_total{{code="{code}"}} (\S+)$', text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


def assert_matches(answer: dict, expected, name: str = "tiny") -> None:
    assert answer["model"] == name
    assert answer["score"] == pytest.approx(expected.score, rel=REL, abs=1e-6)
    assert answer["threshold"] == pytest.approx(expected.threshold)
    assert answer["verdict"] == expected.verdict


class SlowModel:
    """A model whose backbone call sleeps while ``slow`` is set (timeouts), or gives NaN (``nan``)."""

    def __init__(self, inner: PatchKNN, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.slow = threading.Event()
        self.nan = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def predict_batch(self, images, **kwargs):
        return type(self.inner).predict_batch(self, images, **kwargs)  # through score_batch below

    def score_batch(self, images):
        if self.slow.is_set():
            time.sleep(self.delay)
        grids, weights = self.inner.score_batch(images)
        return (grids * np.nan if self.nan.is_set() else grids), weights


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory, synthetic_root: Path) -> dict:
    """A tiny fitted model saved to disk (with a threshold), test images, offline predictions."""
    tmp = tmp_path_factory.mktemp("server")
    category = synthetic_root / "synthetic"
    train = sorted((category / "train" / "good").glob("*.png"))[:4]
    tests = sorted((category / "test").rglob("*.png"))
    model = tiny_model().fit([str(p) for p in train])
    scores = [p.score for p in model.predict([str(p) for p in tests])]
    model.threshold_ = float(np.median(scores))  # verdicts on both sides
    model_dir = model.save(tmp / "tiny")

    # Odd images: grayscale, 16-bit, RGBA (alpha dropped), other sizes.
    base = np.asarray(Image.open(tests[-1]).convert("RGB"))
    extra = tmp / "extra"
    extra.mkdir()
    gray = np.asarray(Image.fromarray(base).convert("L"))
    Image.fromarray(gray).save(extra / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(extra / "gray16.png")  # mode I;16
    rgba = np.dstack([base, np.linspace(0, 255, base.size // 3).reshape(base.shape[:2]).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(extra / "rgba.png")
    Image.fromarray(base[5:77, :60]).save(extra / "small.png")
    Image.fromarray(base).save(extra / "photo.jpg", quality=90)
    images = [*tests[:6], *sorted(extra.iterdir())]

    offline = PatchKNN.load(model_dir, progress=False)
    expected = {str(p): pred for p, pred in zip(images, offline.predict([str(p) for p in images]), strict=True)}
    return {"dir": model_dir, "images": images, "expected": expected, "tmp": tmp, "offline": offline}


@pytest.fixture(scope="module")
def server(data):
    """The main server: API keys, small limits, a batching delay long enough to form batches."""
    from patchknn.server.app import create_app

    settings = ServerSettings(
        api_keys=(KEY, OTHER_KEY),
        max_upload_bytes=256 * 1024,
        max_pixels=1_000_000,
        max_batch=8,
        max_delay_ms=50,
        max_concurrency=32,
        request_timeout_s=60,
    )
    app = create_app(load_models([f"tiny={data['dir']}"]), settings)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


# ------------------------------------------------------------------------------------ unit parts
def test_keys_from_file_and_env(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text(f"# station keys\n{KEY}\n\n  {OTHER_KEY}  \n")
    f.chmod(0o600)
    assert load_api_keys(f, env={}) == [KEY, OTHER_KEY]
    assert load_api_keys(None, env={"PATCHKNN_API_KEYS": f" {KEY} ,{OTHER_KEY},"}) == [KEY, OTHER_KEY]
    assert load_api_keys(None, env={}) == []
    (tmp_path / "short.txt").write_text("short\n")
    with pytest.raises(ConfigError, match="line 1") as exc:
        load_api_keys(tmp_path / "short.txt", env={})
    assert "short\n" not in str(exc.value) and "'short'" not in str(exc.value)  # never echo a key
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no key"):
        load_api_keys(tmp_path / "empty.txt", env={})
    with pytest.raises(ConfigError, match="not found"):
        load_api_keys(tmp_path / "missing.txt", env={})


def test_key_checker_compares_every_key_in_constant_time(monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    checker = KeyChecker([KEY, OTHER_KEY, "third-key-aaaaaaaaaaaaaa"])
    assert checker.check(KEY) and checker.check(OTHER_KEY.encode())
    assert not checker.check("nope") and not checker.check(None) and not checker.check("")
    assert len(calls) == 4 * 3  # every configured key, whether the first matched or none did
    assert KEY not in repr(checker)
    assert bearer_token(f"Bearer {KEY}") == KEY and bearer_token(f"bearer  {KEY} ") == KEY
    assert bearer_token(f"Basic {KEY}") is None and bearer_token(None) is None and bearer_token("Bearer") is None


def test_loopback_rule():
    for host in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
        check_bind(host, KeyChecker())
    for host in ("0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "example.com", ""):
        assert not is_loopback(host), host
        with pytest.raises(ConfigError, match="refusing to listen"):
            check_bind(host, KeyChecker())
        check_bind(host, KeyChecker([KEY]))  # with keys it may listen anywhere


def test_model_specs_and_settings(tmp_path):
    assert parse_model_spec("bottle=models/b") == ("bottle", Path("models/b"))
    assert parse_model_spec("models/screw/") == ("screw", Path("models/screw"))
    with pytest.raises(ConfigError, match="not usable in a URL"):
        parse_model_spec("a b=models/x")
    with pytest.raises(ConfigError, match="twice"):
        load_models(["m=a", "m=b"])
    with pytest.raises(ConfigError, match="max_batch"):
        ServerSettings(max_batch=0)
    with pytest.raises(ConfigError, match="request_timeout_s"):
        ServerSettings(request_timeout_s=0)
    assert KEY not in repr(ServerSettings(api_keys=(KEY,)))


# ------------------------------------------------------------------------------------ auth
def test_auth_missing_wrong_right(server, client):
    assert client.get("/healthz").json() == {"status": "ok"}  # the one public endpoint
    png = data_png(server)
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/tiny"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("POST", "/v1/models/tiny/predict"),
        ("GET", "/no/such/path"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong-key-000000000000"}, {"Authorization": f"Basic {KEY}"}):
            r = client.request(method, path, headers=headers, content=png if method == "POST" else None)
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer")
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert r.status_code == 200
    assert client.get("/readyz", headers=AUTH).json() == {"status": "ready", "models": ["tiny"]}
    assert client.get("/openapi.json", headers=AUTH).status_code == 200
    assert client.get("/docs", headers=AUTH).status_code == 200


def data_png(server) -> bytes:
    return png_bytes(np.full((64, 64, 3), 128, np.uint8))


def test_two_models_and_keys_never_logged(data, caplog):
    """Models by NAME=PATH and by directory name; refused and accepted keys appear in no log record."""
    import logging
    import shutil

    from patchknn.server.app import create_app

    caplog.set_level(logging.DEBUG)
    second = shutil.copytree(data["dir"], data["tmp"] / "line2")
    settings = ServerSettings(api_keys=(KEY,), public_docs=True)
    app = create_app(load_models([f"tiny={data['dir']}", str(second)], warmup=False), settings)
    good = Path(data["images"][2]).read_bytes()
    with LiveServer(app) as live, live.client() as c:
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200  # --public-docs
        assert_error(c.get("/v1/models"), 401, "unauthorized")
        c.get("/v1/models", headers={"Authorization": "Bearer wrong-secret-0123456789"})
        assert [m["name"] for m in c.get("/v1/models", headers=AUTH).json()["models"]] == ["tiny", "line2"]
        for name in ("tiny", "line2"):
            r = c.post(f"/v1/models/{name}/predict", headers=AUTH, content=good)
            assert_matches(r.json(), data["expected"][str(data["images"][2])], name=name)
        c.post("/v1/models/tiny/predict", headers=AUTH, content=b"not an image")
    assert caplog.records  # uvicorn and the app did log something
    assert KEY not in caplog.text and "wrong-secret-0123456789" not in caplog.text


# ------------------------------------------------------------------------------------ predictions
def test_predict_equals_offline_predict(data, client):
    for path in data["images"]:
        raw = Path(path).read_bytes()
        multipart = client.post(
            "/v1/models/tiny/predict", headers=AUTH, files={"file": (Path(path).name, raw, "image/png")}
        )
        assert multipart.status_code == 200, multipart.text
        body = client.post("/v1/models/tiny/predict", headers={**AUTH, "Content-Type": "image/png"}, content=raw)
        assert body.status_code == 200, body.text
        expected = data["expected"][str(path)]
        for answer in (multipart.json(), body.json()):
            assert_matches(answer, expected)
            assert len(answer["model_version"]) == 12
            assert set(answer["timing_ms"]) == {"read", "decode", "queue", "inference", "total"}
            assert "anomaly_map" not in answer
    verdicts = {data["expected"][str(p)].verdict for p in data["images"]}
    assert verdicts == {"OK", "NG"}  # both verdicts were exercised


def test_odd_image_types_are_accepted(data, client):
    """Grayscale, 16-bit, RGBA and JPEG uploads answer like predict() on the same files."""
    names = {"gray.png", "gray16.png", "rgba.png", "photo.jpg", "small.png"}
    paths = [p for p in data["images"] if Path(p).name in names]
    assert len(paths) == len(names)
    assert Image.open(next(p for p in paths if p.name == "gray16.png")).mode.startswith("I")
    for path in paths:
        r = client.post("/v1/models/tiny/predict", headers=AUTH, content=Path(path).read_bytes())
        assert r.status_code == 200, (path, r.text)
        assert_matches(r.json(), data["expected"][str(path)])
        w, h = Image.open(path).size
        assert r.json()["image"] == {"width": w, "height": h}


def test_anomaly_map_png_and_heatmap(data, client):
    path = data["images"][0]
    expected = data["expected"][str(path)]
    r = client.post("/v1/models/tiny/predict?map=png", headers=AUTH, content=Path(path).read_bytes())
    assert r.status_code == 200, r.text
    amap = r.json()["anomaly_map"]
    assert amap["kind"] == "png" and amap["media_type"] == "image/png" and amap["encoding"] == "base64"
    img = Image.open(io.BytesIO(base64.b64decode(amap["data"])))
    assert img.format == "PNG" and img.size == (amap["width"], amap["height"]) == (64, 64)
    pixels = np.asarray(img).astype(np.float64)
    decoded = pixels / 65535.0 * amap["vmax"]
    assert decoded.shape == expected.anomaly_map.shape
    step = amap["vmax"] / 65535.0
    assert np.abs(decoded - expected.anomaly_map).max() <= step + 1e-4 * amap["vmax"]
    r = client.post("/v1/models/tiny/predict?map=heatmap", headers=AUTH, content=Path(path).read_bytes())
    heat = Image.open(io.BytesIO(base64.b64decode(r.json()["anomaly_map"]["data"])))
    assert heat.mode == "RGB" and heat.size == (64, 64)


def test_concurrent_requests_are_batched_and_equal(data, server):
    paths = (data["images"] * 3)[:16]
    payloads = [Path(p).read_bytes() for p in paths]
    barrier = threading.Barrier(16)

    def call(i: int) -> dict:
        with server.client() as c:
            barrier.wait()
            r = c.post("/v1/models/tiny/predict", headers=AUTH, content=payloads[i])
            assert r.status_code == 200, r.text
            return r.json()

    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, range(16)))
    for path, answer in zip(paths, answers, strict=True):
        assert_matches(answer, data["expected"][str(path)])
    assert max(a["batch_size"] for a in answers) > 1  # shared backbone calls happened
    with server.client() as c:
        text = c.get("/metrics", headers=AUTH).text
    assert 'patchknn_batch_size_count{model="tiny"}' in text
    assert gauge_from(text, "patchknn_requests_in_progress") == 0


def gauge_from(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


# ------------------------------------------------------------------------------------ bad requests
def test_bad_requests_get_json_errors_and_change_nothing(data, client):
    good = Path(data["images"][0]).read_bytes()
    predict = "/v1/models/tiny/predict"
    # oversize, declared by Content-Length: refused before the body is read
    big = b"\x89PNG\r\n\x1a\n" + os.urandom(300 * 1024)
    body = assert_error(client.post(predict, headers=AUTH, content=big), 413, "payload_too_large")
    assert "262,144" in body["error"]["message"]

    # oversize, no Content-Length (chunked): refused while streaming
    def chunks():
        for _ in range(20):
            yield b"\x89PNG\r\n\x1a\n" + b"\0" * (16 * 1024)

    assert_error(client.post(predict, headers=AUTH, content=chunks()), 413, "payload_too_large")
    # not an image, whatever the name or content type says
    assert_error(
        client.post(predict, headers=AUTH, files={"file": ("photo.png", b"GIF? no, plain text", "image/png")}),
        415, "unsupported_media_type",
    )
    assert_error(client.post(predict, headers=AUTH, content=b"%PDF-1.4 not an image"), 415, "unsupported_media_type")
    # the right magic bytes but truncated / corrupt data
    assert_error(client.post(predict, headers=AUTH, content=good[: len(good) // 2]), 422, "invalid_image")
    assert_error(client.post(predict, headers=AUTH, content=good[:40]), 422, "invalid_image")
    # decompression bomb: few bytes, too many pixels (2000x2000 > max_pixels=1,000,000)
    bomb = png_bytes(np.zeros((2000, 2000), np.uint8))
    assert len(bomb) < 256 * 1024
    assert_error(client.post(predict, headers=AUTH, content=bomb), 413, "image_too_large")
    # request shape problems
    assert_error(client.post(predict, headers=AUTH, content=b""), 400, "empty_body")
    assert_error(client.post(predict, headers=AUTH, files={"image": ("a.png", good)}), 422, "missing_file")
    assert_error(
        client.post(predict, headers={**AUTH, "Content-Type": "multipart/form-data"}, content=good),
        400, "invalid_multipart",
    )
    assert_error(client.post(predict + "?map=jpeg", headers=AUTH, content=good), 422, "validation_error")
    body = assert_error(client.post("/v1/models/nope/predict", headers=AUTH, content=good), 404, "model_not_found")
    assert "tiny" in body["error"]["message"]
    assert_error(client.get("/v1/models/nope", headers=AUTH), 404, "model_not_found")
    assert_error(client.get(predict, headers=AUTH), 405, "method_not_allowed")
    assert_error(client.get("/v2/whatever", headers=AUTH), 404, "not_found")
    # ... and the server still answers the same for a good image, with nothing left in flight
    r = client.post(predict, headers=AUTH, content=good)
    assert r.status_code == 200
    assert_matches(r.json(), data["expected"][str(data["images"][0])])
    assert gauge(client, "patchknn_requests_in_progress", AUTH) == 0
    assert gauge(client, "patchknn_requests_queued", AUTH) == 0
    assert client.get("/readyz", headers=AUTH).status_code == 200


def test_models_and_metrics_endpoints(data, client):
    listing = client.get("/v1/models", headers=AUTH).json()
    (entry,) = listing["models"]
    assert entry["name"] == "tiny" and entry["backbone"] == "resnet50" and entry["image_size"] == 64
    assert entry["threshold"] == pytest.approx(data["offline"].threshold_)
    assert entry["config"]["grid_size"] == 8
    assert str(data["dir"]) not in str(listing)  # no server paths
    assert listing["limits"]["max_upload_bytes"] == 256 * 1024 and listing["limits"]["auth"] == "bearer"
    assert client.get("/v1/models/tiny", headers=AUTH).json()["version"] == entry["version"]
    r = client.get("/metrics", headers=AUTH)
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    route = "/v1/models/{name}/predict"
    for name, labels in (
        ("patchknn_requests_total", {"route": route, "method": "POST", "status": "200"}),
        ("patchknn_request_duration_seconds_bucket", {"route": route, "le": "+Inf"}),
        ("patchknn_errors_total", {"code": "unauthorized"}),
        ("patchknn_predictions_total", {"model": "tiny", "verdict": "OK"}),
        ("patchknn_inference_seconds_count", {"model": "tiny"}),
    ):
        assert samples.get((name, frozenset(labels.items())), 0) >= 1, (name, labels)
    info = {"model": "tiny", "version": entry["version"], "backbone": "resnet50"}
    assert samples[("patchknn_model_info", frozenset(info.items()))] == 1
    assert "# TYPE patchknn_request_duration_seconds histogram" in text
    spec = client.get("/openapi.json", headers=AUTH).json()
    body = spec["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


# ------------------------------------------------------------------------------------ load control
def test_queue_full_gives_503_with_retry_after(data):
    """One processing slot, one queue place: the third request at once is refused, the others finish."""
    from patchknn.server.app import create_app

    settings = ServerSettings(max_concurrency=1, max_queue=1, max_batch=1, max_delay_ms=0, request_timeout_s=60)
    app = create_app(load_models([f"tiny={data['dir']}"], warmup=False), settings)
    good = Path(data["images"][0]).read_bytes()
    release = threading.Event()

    def slow_body():
        yield good[:100]  # holds the only slot while the rest of the body is "on its way"
        release.wait(30)
        yield good[100:]

    with LiveServer(app) as live, cf.ThreadPoolExecutor(2) as pool, live.client() as c:
        first = pool.submit(lambda: live.client().post("/v1/models/tiny/predict", content=slow_body()))
        wait_until(lambda: gauge(c, "patchknn_requests_in_progress") == 1)
        second = pool.submit(lambda: live.client().post("/v1/models/tiny/predict", content=good))
        wait_until(lambda: gauge(c, "patchknn_requests_queued") == 1)
        refused = c.post("/v1/models/tiny/predict", content=good)
        assert_error(refused, 503, "server_busy")
        assert refused.headers["retry-after"] == "1"
        release.set()
        expected = data["expected"][str(data["images"][0])]
        for fut in (first, second):
            r = fut.result(timeout=60)
            assert r.status_code == 200, r.text
            assert_matches(r.json(), expected)
        assert c.post("/v1/models/tiny/predict", content=good).status_code == 200  # capacity is back
        assert gauge(c, "patchknn_requests_in_progress") == 0


def test_timeouts_504_and_408(data):
    from patchknn.server.app import create_app

    slow = SlowModel(PatchKNN.load(data["dir"], progress=False), delay=1.5)
    served = {"tiny": ServedModel("tiny", slow, "slow-test")}
    settings = ServerSettings(request_timeout_s=0.5, max_delay_ms=0)
    good = Path(data["images"][0]).read_bytes()
    with LiveServer(create_app(served, settings)) as live, live.client() as c:
        slow.slow.set()
        body = assert_error(c.post("/v1/models/tiny/predict", content=good), 504, "timeout")
        assert "0.5 s" in body["error"]["message"]
        slow.slow.clear()
        time.sleep(1.6)  # the abandoned backbone call finishes
        r = c.post("/v1/models/tiny/predict", content=good)
        assert r.status_code == 200, r.text
        assert_matches(r.json(), data["expected"][str(data["images"][0])])

        def stalled_body():
            yield good[:100]
            time.sleep(1.5)
            yield good[100:]

        try:
            r = live.client().post("/v1/models/tiny/predict", content=stalled_body())
            assert_error(r, 408, "request_timeout")
        except httpx.TransportError:
            pass  # the server may close the connection while the client still writes
        assert error_count(c, "request_timeout") == 1
        assert c.post("/v1/models/tiny/predict", content=good).status_code == 200
        slow.nan.set()  # a numerical failure is reported, never a silent NaN score
        assert_error(c.post("/v1/models/tiny/predict", content=good), 422, "unscorable_image")
        slow.nan.clear()
        assert c.post("/v1/models/tiny/predict", content=good).status_code == 200


# ------------------------------------------------------------------------------------ the command
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_refuses_public_address_without_keys(data):
    env = {k: v for k, v in os.environ.items() if k != "PATCHKNN_API_KEYS"}
    proc = subprocess.run(
        [sys.executable, "-m", "patchknn.cli", "serve", str(data["dir"]), "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2
    assert "refusing to listen on '0.0.0.0' without API keys" in proc.stderr


def test_serve_without_server_extra_says_how_to_install(monkeypatch, data):
    from typer.testing import CliRunner

    from patchknn.cli import app

    monkeypatch.setitem(sys.modules, "fastapi", None)  # importlib.util.find_spec -> None
    result = CliRunner().invoke(app, ["serve", str(data["dir"])])
    assert result.exit_code == 2
    assert "pip install 'patchknn[server]'" in result.output


def test_serve_command_end_to_end(data):
    """`patchknn serve NAME=PATH` in a subprocess, keys from the environment, real HTTP."""
    port = _free_port()
    env = {**os.environ, "PATCHKNN_API_KEYS": f"{KEY},{OTHER_KEY}", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "patchknn.cli", "serve", f"line1={data['dir']}",
        "--host", "127.0.0.1", "--port", str(port), "--max-batch", "4", "--max-delay-ms", "2", "--threads", "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:

            def up() -> bool:
                assert proc.poll() is None, proc.stderr.read()
                try:
                    return c.get("/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(up, timeout=120)
            assert_error(c.get("/readyz"), 401, "unauthorized")
            assert c.get("/readyz", headers=AUTH).json()["models"] == ["line1"]
            path = data["images"][1]
            r = c.post("/v1/models/line1/predict", headers=AUTH, files={"file": ("x.png", Path(path).read_bytes())})
            assert r.status_code == 200, r.text
            assert_matches(r.json(), data["expected"][str(path)], name="line1")
            c.get("/v1/models", headers={"Authorization": "Bearer guessed-key-000000000000"})
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert KEY not in out + err and OTHER_KEY not in out + err and "guessed-key" not in out + err
    assert "POST /v1/models/line1/predict" in out + err  # the access log is on, without credentials
