"""The inspection station's server side (issue 16): key roles, the page and its assets, recent results,
camera folders, the overlay map, corrections' access rules and the registry's hot swap, on a tiny
random-weight model over real HTTP (tests/_live.py). The real-data paths are in test_hot_swap.py
and test_station_browser.py."""

from __future__ import annotations

import asyncio
import base64
import io
import os

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("jinja2")

from _live import LiveServer  # noqa: E402
from conftest import tiny_model  # noqa: E402
from PIL import Image  # noqa: E402

from patchknn.errors import ConfigError  # noqa: E402
from patchknn.server.auth import KeyChecker, load_api_keys, load_keys  # noqa: E402
from patchknn.server.settings import ServerSettings, load_models, parse_watch_folder  # noqa: E402

PREDICT_KEY = "predict-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdefgh"


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def station(synthetic_root, tmp_path_factory):
    """A tiny model (plain folder) behind keys of both roles, with one camera folder."""
    from patchknn.server.app import create_app

    base = tmp_path_factory.mktemp("station")
    model = tiny_model().fit(synthetic_root / "synthetic" / "train" / "good")
    model.save(base / "tiny")
    camera = base / "camera"
    camera.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        (camera / f"part_{i}.png").write_bytes(png_bytes(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)))
        os.utime(camera / f"part_{i}.png", (1_000_000 + i, 1_000_000 + i))
    (camera / ".hidden.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    (camera / "notes.txt").write_text("not an image")
    (base / "secret.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    (camera / "link.png").symlink_to(base / "secret.png")
    settings = ServerSettings(
        api_keys=(PREDICT_KEY,),
        admin_keys=(ADMIN_KEY,),
        watch_folders=(parse_watch_folder(f"cam1={camera}"),),
        request_timeout_s=120,
    )
    app = create_app(load_models([f"tiny={base / 'tiny'}"]), settings)
    with LiveServer(app) as live:
        yield live, model, camera


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------------------------------ roles
def test_key_file_roles_and_backwards_compatible_plain_keys(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text(
        f"# keys\n{PREDICT_KEY}   # station 1\n{ADMIN_KEY} admin # engineer\nthird-key-0123456789abc predict, admin\n"
    )
    f.chmod(0o600)
    keys = load_keys(f, env={})
    assert keys.keys == (PREDICT_KEY, ADMIN_KEY, "third-key-0123456789abc")
    assert keys.admin == (ADMIN_KEY, "third-key-0123456789abc")
    assert load_api_keys(f, env={}) == list(keys.keys)  # the old function still lists every key
    env = {"PATCHKNN_API_KEYS": PREDICT_KEY, "PATCHKNN_ADMIN_KEYS": f" {ADMIN_KEY} ,"}
    assert load_keys(None, env=env).admin == (ADMIN_KEY,) and load_keys(None, env=env).keys == (PREDICT_KEY, ADMIN_KEY)
    (tmp_path / "bad.txt").write_text(f"{ADMIN_KEY} root\n")
    with pytest.raises(ConfigError, match="line 1.*unknown role 'root'") as exc:
        load_keys(tmp_path / "bad.txt", env={})
    assert ADMIN_KEY not in str(exc.value)
    assert ADMIN_KEY not in repr(load_keys(f, env={}))


def test_key_roles_are_checked_against_every_key(monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    checker = KeyChecker([PREDICT_KEY], admin_keys=[ADMIN_KEY])
    assert checker.roles(PREDICT_KEY) == {"predict"}
    assert checker.roles(ADMIN_KEY) == {"predict", "admin"}
    assert checker.roles("not-a-key-0000000000000") == frozenset() and not checker.check(None)
    assert len(calls) == 3 * 2  # no early exit, whichever key matched


def test_session_roles_and_401(station):
    live, _, _ = station
    with live.client() as c:
        assert c.get("/v1/session", headers=auth(PREDICT_KEY)).json() == {"roles": ["predict"]}
        assert c.get("/v1/session", headers=auth(ADMIN_KEY)).json() == {"roles": ["admin", "predict"]}
        for headers in ({}, auth("wrong-key-00000000000000")):
            for path in ("/v1/session", "/v1/results", "/v1/watch", "/v1/watch/cam1", "/v1/models/tiny/versions"):
                r = c.get(path, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", path


# ------------------------------------------------------------------------------------------ the page
def test_page_and_assets_are_public_bundled_and_hold_no_data(station):
    live, _, _ = station
    with live.client() as c:
        r = c.get("/", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/station"
        page = c.get("/station")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        html = page.text
        assert 'id="key"' in html and 'id="model"' in html and "tiny" not in html  # no model data without a key
        assert "http://" not in html and "https://" not in html  # nothing from a CDN
        for asset, kind in (("/static/station.js", "javascript"), ("/static/station.css", "text/css")):
            r = c.get(asset)
            assert r.status_code == 200 and kind in r.headers["content-type"], asset
            assert "https://" not in r.text and "http://" not in r.text
        for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py"):
            r = c.get(path)
            assert r.status_code in (401, 404) and "import" not in r.text, path  # no source file is served


def test_templates_escape_what_they_render():
    from patchknn.server.station import templates

    assert "<script>x" not in templates().get_template("station.html").render(version="<script>x")


# ------------------------------------------------------------------------------------------ predict, results
def test_overlay_map_results_list_and_filters(station):
    live, model, _ = station
    img = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    with live.client(headers=auth(PREDICT_KEY)) as c:
        after = max([r["id"] for r in c.get("/v1/results").json()["results"]], default=0)
        r = c.post("/v1/models/tiny/predict?map=overlay&source=part%201.png", files={"file": ("x.png", png_bytes(img))})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version_number"] == 1 and body["model_version"]  # a plain model folder is version 1
        assert body["score"] == pytest.approx(model.predict([img])[0].score, rel=1e-4)
        m = body["anomaly_map"]
        assert m["kind"] == "overlay" and (m["width"], m["height"]) == (64, 64)
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(m["data"]))))
        assert shown.shape == (64, 64, 3) and shown.std() > 0
        c.post("/v1/models/tiny/predict", content=png_bytes(img))
        recent = c.get("/v1/results", params={"after": after}).json()["results"]
        assert [x["source"] for x in recent] == ["", "part 1.png"]  # newest first
        assert recent[1]["score"] == body["score"] and recent[1]["model"] == "tiny"
        verdict = body["verdict"]
        other = "OK" if verdict == "NG" else "NG"
        assert len(c.get("/v1/results", params={"after": after, "verdict": verdict}).json()["results"]) == 2
        assert c.get("/v1/results", params={"after": after, "verdict": other}).json()["results"] == []
        assert c.get("/v1/results", params={"after": after, "model": "other"}).json()["results"] == []
        assert c.get("/v1/results", params={"after": after, "since": 4e9}).json()["results"] == []
        assert c.get("/v1/results", params={"verdict": "maybe"}).status_code == 422


# ------------------------------------------------------------------------------------------ camera folders
def test_watch_folder_lists_newest_images_and_nothing_else(station):
    live, _, camera = station
    with live.client(headers=auth(PREDICT_KEY)) as c:
        assert c.get("/v1/watch").json() == {"folders": ["cam1"]}
        listing = c.get("/v1/watch/cam1", params={"limit": 2}).json()["images"]
        assert [f["name"] for f in listing] == ["part_2.png", "part_1.png"]
        r = c.get("/v1/watch/cam1/part_0.png")
        assert r.status_code == 200 and r.content == (camera / "part_0.png").read_bytes()
        assert r.headers["content-type"] == "image/png"
        for name in ("link.png", ".hidden.png", "notes.txt", "%2e%2e", "%2e%2e%2fsecret.png", "..%2fsecret.png",
                     "missing.png"):
            r = c.get(f"/v1/watch/cam1/{name}")
            assert r.status_code == 404, name
        assert c.get("/v1/watch/cam1/../secret.png").status_code == 404
        r = c.get("/v1/watch/elsewhere")
        assert r.status_code == 404 and r.json()["error"]["code"] == "folder_not_found"
    with pytest.raises(ConfigError, match="NAME=DIR"):
        parse_watch_folder(str(camera))
    with pytest.raises(ConfigError, match="not a directory"):
        parse_watch_folder(f"x={camera / 'part_0.png'}")


# ------------------------------------------------------------------------------------------ corrections
def test_corrections_and_rollbacks_need_the_admin_role_and_swap_versions(station):
    """A plain model folder is version 1; an admin's correction makes version 2 and serves it."""
    live, model, _ = station
    normal = np.random.default_rng(7).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    img = png_bytes(normal)
    with live.client() as c:
        r = c.post("/v1/models/tiny/corrections", files={"file": ("a.png", img)})
        assert r.status_code == 401
        r = c.post("/v1/models/tiny/corrections", files={"file": ("a.png", img)}, headers=auth(PREDICT_KEY))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert "admin" in r.json()["error"]["message"]
        r = c.post("/v1/models/nope/corrections", files={"file": ("a.png", img)}, headers=auth(ADMIN_KEY))
        assert r.status_code == 404
        r = c.post("/v1/models/tiny/corrections", files={"file": ("a.txt", b"hello")}, headers=auth(ADMIN_KEY))
        assert r.status_code == 422 and "a.txt" in r.json()["error"]["message"]
        before = c.get("/v1/models/tiny/versions", headers=auth(PREDICT_KEY)).json()
        assert before["serving"] == 1 and [v["number"] for v in before["versions"]] == [1]
        r = c.post(
            "/v1/models/tiny/corrections",
            files=[("file", ("glare.png", img))],
            data={"note": "glare is normal", "author": "ana"},
            headers=auth(ADMIN_KEY),
        )
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["version_number"] == 2 and body["previous"]["version_number"] == 1
        assert body["version"]["added"] == ["glare.png"] and body["version"]["note"] == "glare is normal"
        assert "path" not in body["version"]
        after = c.get("/v1/models/tiny/versions", headers=auth(PREDICT_KEY)).json()
        assert after["serving"] == 2 and [v["number"] for v in after["versions"]] == [2, 1]
        got = c.post("/v1/models/tiny/predict", content=img, headers=auth(PREDICT_KEY)).json()
        assert got["version_number"] == 2 and got["model_version"] == body["model_version"]
        metrics = c.get("/metrics", headers=auth(PREDICT_KEY)).text
        assert "patchknn_model_swaps 1.0" in metrics and f'version="{body["model_version"]}"' in metrics
        # the image is now in the memory bank: its score is that of the new version, far below the old one
        assert got["score"] < 0.5 * model.predict([normal])[0].score
        # an admin may serve version 1 again (a predict key may not); it is swapped in the same way
        assert c.post("/v1/models/tiny/rollback?version=1", headers=auth(PREDICT_KEY)).status_code == 403
        r = c.post("/v1/models/tiny/rollback?version=9", headers=auth(ADMIN_KEY))
        assert r.status_code == 404 and "no version 9" in r.json()["error"]["message"]
        r = c.post("/v1/models/tiny/rollback?version=1", headers=auth(ADMIN_KEY))
        assert r.status_code == 200, r.text
        assert r.json()["version_number"] == 1 and r.json()["previous"]["version_number"] == 2
        got = c.post("/v1/models/tiny/predict", content=img, headers=auth(PREDICT_KEY)).json()
        assert got["version_number"] == 1
        assert got["score"] == pytest.approx(model.predict([normal])[0].score, rel=1e-4)
        assert c.get("/v1/models/tiny/versions", headers=auth(PREDICT_KEY)).json()["serving"] == 1


# ------------------------------------------------------------------------------------------ the registry
class _FakeBatcher:
    def __init__(self, live):
        self.live, self.started, self.stopped = live, False, False

    async def start(self):
        self.started = True

    async def stop(self):
        self.stopped = True

    @property
    def running(self):
        return self.started and not self.stopped

    queued = 0


def test_registry_swap_keeps_leased_versions_until_their_last_request():
    from patchknn.server.registry import ModelRegistry
    from patchknn.server.settings import ServedModel

    old, new = ServedModel("m", object(), "aaa", number=1), ServedModel("m", object(), "bbb", number=2)

    async def scenario():
        registry = ModelRegistry({"m": old}, _FakeBatcher)
        await registry.start()
        async with registry.lease("m") as first:
            assert first.served is old
            replaced = await registry.swap("m", new)
            assert replaced is old and registry.current("m").served is new
            assert first.batcher.running  # a request admitted before the swap still has its version
            async with registry.lease("m") as second:
                assert second.served is new
        assert first.batcher.stopped and not registry.current("m").batcher.stopped
        await registry.swap("m", old)  # nobody holds the current one: its batcher stops at once
        assert second.batcher.stopped and registry.running
        await registry.stop()
        assert not registry.running

    asyncio.run(scenario())


def test_a_server_without_keys_predicts_but_never_changes_a_model(synthetic_root, tmp_path):
    """No keys configured (loopback only): every client may predict, but corrections and rollbacks
    need an admin key, so a web page open on the station PC cannot post one to 127.0.0.1."""
    from patchknn.server.app import create_app

    tiny_model().fit(synthetic_root / "synthetic" / "train" / "good").save(tmp_path / "tiny")
    img = (synthetic_root / "synthetic" / "test" / "good").glob("*.png").__next__().read_bytes()
    app = create_app(load_models([f"tiny={tmp_path / 'tiny'}"]), ServerSettings(request_timeout_s=120))
    with LiveServer(app) as live, live.client() as c:
        assert c.post("/v1/models/tiny/predict", content=img).status_code == 200
        r = c.post("/v1/models/tiny/corrections", files={"files": ("glare.png", img)})
        assert r.status_code == 403 and "admin" in r.json()["error"]["message"], r.text
        assert c.post("/v1/models/tiny/rollback?version=1").status_code == 403
    assert not (tmp_path / "tiny" / "versions").exists()  # nothing was written


def test_a_named_pipe_in_a_camera_folder_is_not_an_image(tmp_path):
    """A FIFO called like an image is refused at once (404), never blocking a worker in open()."""
    from patchknn.server.errors import ApiError
    from patchknn.server.station import read_watch_file

    os.mkfifo(tmp_path / "x.png")
    with pytest.raises(ApiError) as err:
        read_watch_file(tmp_path, "x.png", 1 << 20)
    assert err.value.status == 404


def test_a_correction_builds_on_the_folders_current_version(synthetic_root, tmp_path):
    """A version made on the command line while the server serves an older one is not lost: the
    correction starts from the folder's current version, which is its recorded parent."""
    from patchknn import PatchKNN
    from patchknn.server.corrections import build_version
    from patchknn.server.settings import ServedModel
    from patchknn.versions import list_versions, save_version

    train = sorted((synthetic_root / "synthetic" / "train" / "good").glob("*.png"))
    model = tiny_model().fit(train[:6])
    model.save(tmp_path / "m")
    served = ServedModel("m", PatchKNN.load(tmp_path / "m", progress=False), "v1", "x", 1, tmp_path / "m")
    cli_model = PatchKNN.load(tmp_path / "m", progress=False).partial_fit([str(train[6])])
    assert save_version(cli_model, tmp_path / "m", note="from the CLI").number == 2
    new, info = build_version(served, [np.asarray(Image.open(train[7]).convert("RGB"))], ["t7.png"], None, "web")
    assert info.number == 3 and info.parent == 2
    assert new.model.index_.size == cli_model.index_.size + model.index_.size // 6  # one more image
    assert [v.number for v in list_versions(tmp_path / "m")] == [1, 2, 3]
