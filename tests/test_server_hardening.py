"""The server on an open network (issue 18): one probe per hole, through real HTTP on 127.0.0.1 only.

* slow headers are closed within the header timeout; connections without headers are capped;
* a key in the query string is refused (401 saying where the key goes) and never logged;
* decoding memory stays within the budget: peak RSS of the server process while it decodes concurrent
  36-megapixel PNGs (RGBA 8-bit, RGB 16-bit) is measured from /proc and compared with the budget;
* malformed requests that the HTTP parser refuses are answered in JSON; no stray parser line in the log;
* two ``file`` fields -> 400; a world-readable key file -> one warning line.

Every request goes to 127.0.0.1, every test bounds its request count and time. The servers are the
real ``patchknn serve`` command in a subprocess (its log is the one an operator reads), or the app in
a thread of this process where the log does not matter.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _live import LiveServer  # noqa: E402
from conftest import tiny_model  # noqa: E402
from test_server import assert_error  # noqa: E402

from patchknn.errors import ImageError  # noqa: E402
from patchknn.server.auth import load_api_keys  # noqa: E402
from patchknn.server.memory import FIXED_BYTES, MemoryBudget, bytes_per_pixel, decode_cost  # noqa: E402
from patchknn.server.protocol import redact_target  # noqa: E402
from patchknn.server.settings import ServerSettings, load_models  # noqa: E402

KEY = "hardening-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEADER_TIMEOUT = 1.0


# ------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``patchknn serve`` in a subprocess on a free loopback port; stdout and stderr go to ``log``."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "patchknn.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        base = {k: v for k, v in os.environ.items() if k != "PATCHKNN_API_KEYS"}
        env = {**base, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self._fh = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while True:
                assert self.proc.poll() is None, self.text()
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "patchknn serve did not start: " + self.text()
                time.sleep(0.1)

    def text(self) -> str:
        self._fh.flush()
        return self.log.read_text(errors="replace")

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._fh.close()


def exchange(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send raw bytes on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # the server may answer and close before reading everything
            s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
    return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines and lines[0].startswith("HTTP/1.1 "), raw[:200]
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def assert_json_error(raw: bytes, status: int, code: str) -> dict:
    got, headers, body = parse_response(raw)
    assert got == status, raw[:300]
    assert headers["content-type"] == "application/json", headers
    doc = json.loads(body)
    assert set(doc) == {"error"} and doc["error"]["code"] == code, doc
    assert doc["error"]["message"]
    return doc


def png_header_only_size(width: int, height: int, color_type: int, bit_depth: int) -> bytes:
    """A valid PNG of ``width x height`` zero pixels, compressed row by row (no full raw buffer here)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = bytes(1 + width * channels * bit_depth // 8)
    comp = zlib.compressobj(6)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def png_bytes(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def proc_status(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, synthetic_root: Path) -> Path:
    train = sorted((synthetic_root / "synthetic" / "train" / "good").glob("*.png"))[:4]
    model = tiny_model().fit([str(p) for p in train])
    return model.save(tmp_path_factory.mktemp("hardening") / "tiny")


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    """The real command with keys from a world-readable key file, a 1 s header timeout, the access log on."""
    tmp = tmp_path_factory.mktemp("served")
    keys = tmp / "keys.txt"
    keys.write_text(KEY + "\n")
    keys.chmod(0o644)
    server = ServeProcess(
        [f"tiny={model_dir}", "--api-key-file", str(keys), "--header-timeout", str(HEADER_TIMEOUT),
         "--threads", "1"],
        tmp / "serve.log",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_image() -> bytes:
    return png_bytes(np.full((48, 40, 3), 90, np.uint8))


# ------------------------------------------------------------------------------------ 1. slow headers
def test_slow_headers_are_closed_within_the_header_timeout(served):
    """20 connections sending their headers one byte every 0.2 s: each gets 408 JSON and is closed
    about HEADER_TIMEOUT after it connected; a normal request is answered meanwhile."""
    head = b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
    n = 20
    socks, opened, closed, answers = [], [], [None] * n, [b""] * n
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", served.port), timeout=5)
        s.setblocking(False)
        socks.append(s)
        opened.append(time.monotonic())
    try:
        position = 0
        deadline = time.monotonic() + 10 * HEADER_TIMEOUT + 10
        during = None
        while any(c is None for c in closed) and time.monotonic() < deadline:
            for i, s in enumerate(socks):
                if closed[i] is not None:
                    continue
                try:
                    while chunk := s.recv(65536):
                        answers[i] += chunk
                    closed[i] = time.monotonic()  # EOF
                    continue
                except BlockingIOError:
                    pass
                except OSError:
                    closed[i] = time.monotonic()
                    continue
                try:
                    s.send(head[position % len(head): position % len(head) + 1])
                except OSError:
                    closed[i] = time.monotonic()
            position += 1
            if during is None:
                with served.client() as c:
                    during = c.get("/v1/models", headers=AUTH).status_code
            time.sleep(0.2)
    finally:
        for s in socks:
            s.close()
    assert all(c is not None for c in closed), "slow-header connections still open"
    held = [c - o for c, o in zip(closed, opened, strict=True)]
    assert min(held) >= HEADER_TIMEOUT * 0.8, held
    assert max(held) <= HEADER_TIMEOUT + 8.0, held  # generous: a loaded 2-core machine
    for raw in answers:
        doc = assert_json_error(raw, 408, "header_timeout")
        assert f"{HEADER_TIMEOUT:g} s" in doc["error"]["message"]
    assert during == 200


def test_slow_headers_on_a_kept_alive_connection_are_closed(served):
    """After a first answer, the next request's headers must also arrive within the timeout."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=15) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            chunk = s.recv(65536)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 200"), first
        start = time.monotonic()
        rest = b""
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            s.settimeout(0.3)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # reset: the server closed while this client was still sending
                break
            if not chunk:
                break
            rest += chunk
        held = time.monotonic() - start
    assert held < HEADER_TIMEOUT + 8.0, held
    if rest:
        assert_json_error(rest, 408, "header_timeout")


def test_connections_without_headers_are_capped(model_dir):
    """5 idle connections (the cap): one more is answered 503 JSON at once; once they are gone, all is well."""
    from patchknn.server.app import create_app

    settings = ServerSettings(max_pending_connections=5, header_timeout_s=60)  # no timing in this test
    app = create_app(load_models([f"tiny={model_dir}"], warmup=False), settings)
    with LiveServer(app) as live:
        with live.client() as c:  # a finished request does not count once its connection is closed
            assert c.get("/healthz").status_code == 200
        idle = [socket.create_connection(("127.0.0.1", live.port), timeout=5) for _ in range(5)]
        try:
            guard = live.server.config.patchknn_guard
            deadline = time.monotonic() + 30
            while guard.pending < 5 and time.monotonic() < deadline:
                time.sleep(0.02)
            raw = exchange(live.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)
            doc = assert_json_error(raw, 503, "too_many_connections")
            assert "at most 5" in doc["error"]["message"]
            assert parse_response(raw)[1]["retry-after"] == "1"
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 30
        while guard.pending > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        with live.client() as c:
            assert c.get("/v1/models").status_code == 200
            metrics = c.get("/metrics").text
    assert re.search(r'^patchknn_errors_total\{code="too_many_connections"\} 1\.0$', metrics, re.MULTILINE)


# ------------------------------------------------------------------------------------ 2. keys in URLs
def test_key_in_query_string_is_refused_and_not_logged(served, small_image):
    targets = [
        f"/v1/models?api_key={KEY}",
        f"/v1/models?token={KEY}",
        f"/v1/models/tiny?KEY={KEY}",
        f"/v1/models?{KEY}",  # a bare key, no parameter name
        f"/v1/models?q={KEY}",  # a configured key under any name
        f"/healthz?access_token={KEY}",  # even on the public endpoint
    ]
    with served.client() as c:
        for target in targets:
            body = assert_error(c.get(target), 401, "unauthorized")
            message = body["error"]["message"]
            assert "Authorization: Bearer <key>" in message and "URL" in message, message
            assert KEY not in message
        # with the right header too: a key in the URL is refused, whatever else comes with it
        assert_error(c.post(f"/v1/models/tiny/predict?map=png&key={KEY}", headers=AUTH, content=small_image),
                     401, "unauthorized")
        ok = c.post("/v1/models/tiny/predict?map=png", headers=AUTH, content=small_image)
        assert ok.status_code == 200 and ok.json()["anomaly_map"]["kind"] == "png"
        other = c.get("/v1/models", headers={"X-API-Key": KEY})
        assert "Authorization: Bearer" in assert_error(other, 401, "unauthorized")["error"]["message"]
    time.sleep(0.3)
    log = served.text()
    assert KEY not in log
    assert log.count("?[redacted]") >= len(targets)
    assert '"POST /v1/models/tiny/predict?map=png HTTP/1.1" 200' in log  # useful parameters stay


def test_redact_target():
    assert redact_target("/v1/models") == "/v1/models"
    assert redact_target("/v1/models?api_key=abc") == "/v1/models?[redacted]"
    assert redact_target("/p?map=png") == "/p?map=png"
    assert redact_target("/p?map=png&token=x") == "/p?map=png&[redacted]"
    assert redact_target("/p?map=secretvalue") == "/p?[redacted]"  # only known values are kept
    assert redact_target("/p?sk-live-abc") == "/p?[redacted]"
    assert redact_target("/p?") == "/p"


def test_key_parameter_refused_without_keys_too(model_dir):
    from patchknn.server.app import create_app

    app = create_app(load_models([f"tiny={model_dir}"], warmup=False), ServerSettings())
    with LiveServer(app) as live, live.client() as c:
        assert_error(c.get("/v1/models?api_key=whatever-it-is-0000"), 401, "unauthorized")
        assert c.get("/v1/models?map=png").status_code == 200  # an unknown harmless parameter is fine


# ------------------------------------------------------------------------------------ 4. parser errors
@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "bad_request"),
        (b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "bad_request"),
        ("GET /v1/mödels/ü HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400, "bad_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n", 431, "headers_too_large"),
        (b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
         "not_implemented"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n", 400, "bad_request"),  # TLS hello
    ],
    ids=["content-length-negative", "content-length-abc", "utf8-request-line", "bad-header-line", "1MiB-header",
         "transfer-encoding-gzip", "tls-on-plain-port"],
)
def test_malformed_requests_get_json(served, request_bytes, status, code):
    doc = assert_json_error(exchange(served.port, request_bytes), status, code)
    assert KEY not in doc["error"]["message"]


def test_malformed_header_line_is_not_echoed(served):
    """h11's own message quotes the bad line (here one holding the key); the answer does not."""
    raw = exchange(served.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization Bearer " + KEY.encode()
                   + b"\r\n\r\n")
    doc = assert_json_error(raw, 400, "bad_request")
    assert KEY not in json.dumps(doc)


def test_multipart_parser_warning_stays_out_of_the_log(served, small_image):
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"\r\nBad\rName: x\r\n\r\n".encode()
            + small_image + f"\r\n--{boundary}--\r\n".encode())
    with served.client() as c:
        content_type = f"multipart/form-data; boundary={boundary}"
        r = c.post("/v1/models/tiny/predict", headers={**AUTH, "Content-Type": content_type}, content=body)
    doc = assert_error(r, 400, "invalid_multipart")
    assert "invalid character" in doc["error"]["message"]
    time.sleep(0.3)
    assert "Found invalid character" not in served.text()


# ------------------------------------------------------------------------------------ 5. ambiguity
def test_two_file_fields_get_400(served, small_image):
    with served.client() as c:
        r = c.post("/v1/models/tiny/predict", headers=AUTH,
                   files=[("file", ("a.png", small_image, "image/png")), ("file", ("b.png", small_image, "image/png"))])
        doc = assert_error(r, 400, "invalid_multipart")
        assert "2 fields named 'file'" in doc["error"]["message"]
        one = c.post("/v1/models/tiny/predict", headers=AUTH, files={"file": ("a.png", small_image, "image/png")})
        assert one.status_code == 200


def test_world_readable_key_file_is_one_log_line(served, tmp_path, caplog):
    lines = [line for line in served.text().splitlines() if "keys.txt" in line]
    assert len(lines) == 1 and "chmod 600" in lines[0] and lines[0].startswith("WARNING"), lines
    assert "UserWarning" not in served.text() and "warnings.warn" not in served.text()
    f = tmp_path / "keys.txt"
    f.write_text(KEY + "\n")
    f.chmod(0o640)
    caplog.set_level(logging.WARNING, logger="patchknn.server")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Python warning at all
        assert load_api_keys(f, env={}) == [KEY]
    (record,) = [r for r in caplog.records if r.name == "patchknn.server"]
    assert record.levelno == logging.WARNING and "640" in record.getMessage() and KEY not in record.getMessage()


# ------------------------------------------------------------------------------------ 3. memory budget
def test_decode_cost_from_the_header():
    rgba = png_bytes(np.zeros((300, 200, 4), np.uint8), "RGBA")
    cost = decode_cost(rgba)
    assert (cost.width, cost.height, cost.mode, cost.format, cost.rotated) == (200, 300, "RGBA", "PNG", False)
    assert cost.bytes == int(np.ceil(200 * 300 * bytes_per_pixel("RGBA", "PNG"))) + FIXED_BYTES
    rgb16 = png_header_only_size(64, 32, 2, 16)
    assert decode_cost(rgb16).mode == "RGB"  # Pillow reads 16-bit RGB as RGB
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = png_bytes(np.zeros((10, 10, 3), np.uint8), exif=exif.tobytes())
    assert decode_cost(rotated).rotated  # a second copy for the rotation is counted
    with pytest.raises(ImageError, match="max_pixels"):
        decode_cost(rgb16, max_pixels=100)
    with pytest.raises(ImageError):
        decode_cost(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)


def test_memory_budget_waits_in_order_and_survives_cancellation():
    async def scenario() -> list[str]:
        budget = MemoryBudget(100)
        order: list[str] = []
        await budget.acquire(60)

        async def take(name: str, n: int) -> None:
            await budget.acquire(n)
            order.append(name)

        big = asyncio.create_task(take("big", 80))
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 10))  # fits, but waits behind "big" (first come first served)
        gone = asyncio.create_task(take("gone", 10))
        await asyncio.sleep(0.01)
        assert order == [] and budget.waiting == 3 and budget.waits == 3
        gone.cancel()
        await asyncio.sleep(0.01)
        assert budget.waiting == 2
        budget.release(60)
        await asyncio.gather(big, small)
        assert budget.used == 90 and budget.waiting == 0
        with pytest.raises(ValueError):
            await budget.acquire(101)
        return order

    assert asyncio.run(scenario()) == ["big", "small"]


def test_image_over_the_whole_budget_gets_413_and_a_full_budget_503(model_dir, small_image):
    from patchknn.server.app import create_app

    settings = ServerSettings(memory_budget_bytes=16 << 20, request_timeout_s=1.0, max_delay_ms=0)
    app = create_app(load_models([f"tiny={model_dir}"], warmup=False), settings)
    big = png_bytes(np.zeros((2000, 2000, 4), np.uint8), "RGBA")  # about 52 MB to decode
    with LiveServer(app) as live, live.client() as c:
        body = assert_error(c.post("/v1/models/tiny/predict", content=big), 413, "image_too_large")
        assert "memory budget" in body["error"]["message"] and "16 MiB" in body["error"]["message"]
        budget = app.state.patchknn.budget
        budget.used = budget.limit  # the budget is taken (as if by other images being decoded)
        r = c.post("/v1/models/tiny/predict", content=small_image)
        assert_error(r, 503, "server_busy")
        assert r.headers["retry-after"] == "1" and "memory budget" in r.json()["error"]["message"]
        budget.used = 0
        assert c.post("/v1/models/tiny/predict", content=small_image).status_code == 200


def test_peak_memory_of_concurrent_36mp_decodes_stays_within_the_budget(model_dir, tmp_path):
    """Four concurrent 36 MP PNGs (two RGBA 8-bit, two RGB 16-bit: 140-210 kB each) against a 600 MiB
    budget: the server process' peak RSS over its resident size before stays under the budget, and
    requests had to wait for it (two decode threads would otherwise hold two RGBA decodes, ~830 MB)."""
    budget_mb = 600
    side = 6000
    rgba = png_header_only_size(side, side, 6, 8)
    rgb16 = png_header_only_size(side, side, 2, 16)
    assert len(rgba) < 1 << 20 and len(rgb16) < 1 << 20
    costs = [decode_cost(rgba).bytes, decode_cost(rgb16).bytes]
    server = ServeProcess(
        [f"tiny={model_dir}", "--memory-budget-mb", str(budget_mb), "--decode-threads", "2", "--threads", "1",
         "--max-pixels", "40000000", "--timeout", "120", "--no-access-log"],
        tmp_path / "serve.log",
    )
    try:
        pid = server.proc.pid
        with server.client() as c:
            warm = c.post("/v1/models/tiny/predict", content=png_bytes(np.zeros((64, 64, 3), np.uint8)))
            assert warm.status_code == 200
        time.sleep(0.5)
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS (VmHWM) := current RSS
        before = proc_status(pid, "VmRSS")
        payloads = [rgba, rgb16, rgba, rgb16]

        def post(data: bytes) -> httpx.Response:
            with server.client() as c:
                return c.post("/v1/models/tiny/predict", content=data)

        with cf.ThreadPoolExecutor(len(payloads)) as pool:
            answers = list(pool.map(post, payloads))
        peak = proc_status(pid, "VmHWM") - before
        with server.client() as c:
            metrics = c.get("/metrics").text
    finally:
        server.stop()
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["image"] == {"width": side, "height": side}
    waits = float(re.search(r"^patchknn_decode_memory_waits (\S+)$", metrics, re.MULTILINE).group(1))
    print(f"peak RSS over the start: {peak / 2**20:.0f} MiB (budget {budget_mb} MiB; costs "
          f"{[round(c / 2**20) for c in costs]} MiB); {waits:g} requests waited for decode memory")
    assert waits >= 1  # the budget held requests back
    assert peak <= budget_mb * 2**20, f"peak {peak / 2**20:.0f} MiB over the {budget_mb} MiB budget"
    assert peak >= 0.5 * max(costs) * 0.8, f"peak {peak / 2**20:.0f} MiB: were the images decoded at all?"


_MEASURE = r"""
import ctypes, io, json, re, sys
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: big blocks go back to the system when freed
from PIL import Image
from patchknn.server.memory import decode_cost, prepare_image
def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
prepare_image(open(sys.argv[1], "rb").read(), 64, 10**9, "RGB")  # warm up the code paths
out = {}
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    cost = decode_cost(data)
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    prepare_image(data, 64, 10**9, cost.mode, jpeg_draft=None)  # a JPEG's full decode, the costliest
    out[path] = [status("VmHWM") - before, cost.bytes, cost.mode, cost.format]
print(json.dumps(out))
"""


def test_bytes_per_pixel_table_covers_the_real_decode(tmp_path):
    """Every decoding path the cost table names, measured (peak RSS) on 6-megapixel images: the
    table's cost is never below what the decode really takes."""
    h, w = 2000, 3000
    base = np.zeros((h, w), np.uint8)
    base[::7] = 200
    rgb = np.dstack([base] * 3)
    exif = Image.Exif()
    exif[0x0112] = 6
    images = {
        "rgb.png": lambda p: Image.fromarray(rgb).save(p),
        "rgba.png": lambda p: Image.fromarray(np.dstack([base] * 4), "RGBA").save(p),
        "l.png": lambda p: Image.fromarray(base).save(p),
        "la.png": lambda p: Image.fromarray(np.dstack([base] * 2), "LA").save(p),
        "i16.png": lambda p: Image.fromarray(base.astype(np.uint16) * 257).save(p),
        "p.png": lambda p: Image.fromarray(base).convert("P").save(p),
        "bilevel.png": lambda p: Image.fromarray(base > 0).save(p),
        "rgb16.png": lambda p: p.write_bytes(png_header_only_size(w, h, 2, 16)),
        "rotated.png": lambda p: Image.fromarray(rgb).save(p, exif=exif.tobytes()),
        "cmyk.jpg": lambda p: Image.fromarray(np.dstack([base] * 4), "RGBA").convert("CMYK").save(p, quality=50),
        "rgb.jpg": lambda p: Image.fromarray(rgb).save(p, quality=50),
        "float.tif": lambda p: Image.fromarray(base.astype(np.float32) / 255).save(p, compression="tiff_deflate"),
        "int32.tif": lambda p: Image.fromarray(base.astype(np.int32)).save(p, compression="tiff_deflate"),
        "rgb.webp": lambda p: Image.fromarray(rgb).save(p, quality=50),
        "rgba.webp": lambda p: Image.fromarray(np.dstack([base] * 4), "RGBA").save(p, quality=50),
    }
    paths = []
    for name, make in images.items():
        make(tmp_path / name)
        paths.append(str(tmp_path / name))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *paths], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout)
    for p, (peak, cost, mode, fmt) in measured.items():
        print(f"{Path(p).name:12s} {mode:5s} {fmt:5s} measured {peak / (h * w):5.2f} "
              f"counted {cost / (h * w):5.2f} B/px")
    too_low = {Path(p).name: (round(peak / (h * w), 2), round(cost / (h * w), 2), mode, fmt)
               for p, (peak, cost, mode, fmt) in measured.items() if peak > cost}
    assert not too_low, f"bytes per pixel measured > counted: {too_low}"
    modes = {mode for _, _, mode, _ in measured.values()}
    assert {"RGB", "RGBA", "L", "LA", "I;16", "P", "1", "CMYK", "F", "I"} <= modes


def test_upgrade_header_is_served_as_plain_http_without_log_noise(served):
    with served.client() as c:
        r = c.get("/healthz", headers={"Connection": "Upgrade", "Upgrade": "websocket"})
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    time.sleep(0.3)
    assert "Unsupported upgrade" not in served.text() and "WebSocket library" not in served.text()
