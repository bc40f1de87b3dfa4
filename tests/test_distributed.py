"""patchknn.distributed on a local Ray instance (2 CPUs, 127.0.0.1 only, one for the whole module).

Exactness: torch's CPU kernels sum in an order that depends on the thread count, so the references
computed here run with 1 torch thread, like the Ray tasks/actors (1 CPU each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from patchknn import PatchKNN  # noqa: E402
from patchknn.index import MemoryBankIndex  # noqa: E402
from patchknn.presets import preset  # noqa: E402

TINY_CFG = {"backbone": "resnet50", "image_size": 64, "grid_size": 8}
ray_test = pytest.mark.slow  # every test on the Ray instance takes more than a few seconds


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def one_thread():
    """This process computes as a Ray task does (one torch thread, and one BLAS / OpenMP thread, as
    Ray sets OMP_NUM_THREADS=1 for its workers): float32 sums split over other thread counts can
    round differently (numpy's BLAS on a 2-core AMD EPYC: bank values 1e-5 apart)."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def variants_root(tmp_path_factory) -> Path:
    """Three small MVTec-layout categories and one whose train/good holds only corrupt files."""
    from patchknn.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("variants")
    for i, name in enumerate(("alpha", "beta", "gamma")):
        make_synthetic_dataset(root, category=name, n_train=5, n_test_good=2, n_test_defective=2,
                               image_size=64, seed=10 + i)
    broken = root / "broken"
    (broken / "train" / "good").mkdir(parents=True)
    (broken / "test" / "good").mkdir(parents=True)
    for j in range(3):
        (broken / "train" / "good" / f"{j:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A model with a 1280-row bank (2 shards of 1024 + 256 rows) and an archive of 13 files.

    Returns (model dir, archive dir, sorted absolute paths; the last one is corrupt)."""
    from patchknn.synthetic import make_synthetic_dataset

    base = tmp_path_factory.mktemp("archive")
    cat = make_synthetic_dataset(base / "data", category="widget", n_train=20, n_test_good=4,
                                 n_test_defective=8, image_size=64, seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = PatchKNN(**TINY_CFG, weights="random", progress=False).fit(cat / "train" / "good")
    finally:
        torch.set_num_threads(before)
    assert model.index_.size == 1280
    model_dir = model.save(base / "model")
    (cat / "test" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    from patchknn.distributed.archive import list_archive

    paths, _ = list_archive([cat / "test"])
    assert len(paths) == 13
    return model_dir, cat / "test", sorted(paths)


def _reference(model_dir: Path, paths: list[str], threshold: float | None = None) -> dict:
    """model.predict, one thread, on every path (errors skipped): {path: Prediction}."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = PatchKNN.load(model_dir, on_error="skip", progress=False)
        if threshold is not None:
            model.threshold_ = threshold
        return {p: pred for p, pred in zip(paths, model.predict(paths), strict=True)}
    finally:
        torch.set_num_threads(before)


def _check_equal_to_predict(out: Path, ref: dict, maps: bool) -> None:
    table = pq.read_table(out / "parts")
    rows = table.to_pylist()
    assert sorted(r["image"] for r in rows) == sorted(ref)  # every file once
    for r in rows:
        pred = ref[r["image"]]
        if pred.error is not None:
            assert r["error"] and r["score"] is None and r["verdict"] is None
            continue
        assert r["error"] is None
        assert r["score"] == pred.score  # exact
        assert r["threshold"] == pred.threshold and r["verdict"] == pred.verdict
        if maps:
            np.testing.assert_array_equal(np.load(out / r["map"]), pred.anomaly_map)


# --------------------------------------------------------------------------------- no Ray needed
def test_core_does_not_import_ray():
    code = (
        "import sys, patchknn, patchknn.cli, patchknn.distributed, patchknn.distributed.commands\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
        "assert 'ray.data' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_commands_registered():
    from typer.testing import CliRunner

    from patchknn.cli import app

    runner = CliRunner()
    for cmd in ("fit-many", "score-archive"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0, r.output
        assert "--address" in r.output
    assert "--shards" in runner.invoke(app, ["score-archive", "--help"]).output


def test_shard_bounds_and_merge():
    from patchknn.distributed.sharded import merge_topk, shard_bounds

    assert shard_bounds(5000, 3, align=1024) == [(0, 2048), (2048, 4096), (4096, 5000)]
    assert shard_bounds(1000, 4, align=1024) == [(0, 1000)]
    assert shard_bounds(10, 3, align=1) == [(0, 4), (4, 7), (7, 10)]
    a = np.array([[1.0, 5.0], [0.5, 0.7]], np.float32)
    b = np.array([[2.0, 3.0], [0.1, 9.0]], np.float32)
    np.testing.assert_array_equal(merge_topk([a, b], 2), np.array([[1.0, 2.0], [0.1, 0.5]], np.float32))
    np.testing.assert_array_equal(merge_topk([a, b], 1), np.array([[1.0], [0.1]], np.float32))


def test_aligned_shards_search_exactly_like_one_index():
    """The arithmetic behind ShardedIndex, in this process, on both faiss code paths (BLAS or not)."""
    import faiss

    from patchknn.distributed.sharded import merge_topk, shard_bounds

    rng = np.random.default_rng(1)
    bank = rng.normal(size=(5000, 40)).astype(np.float32)
    queries = rng.normal(size=(300, 40)).astype(np.float32)
    before = faiss.cvar.distance_compute_blas_threshold
    try:
        for threshold in (1, 1 << 30):
            faiss.cvar.distance_compute_blas_threshold = threshold
            single = MemoryBankIndex().build(bank)
            for n_shards in (2, 3, 5):
                shards = [MemoryBankIndex().build(bank[a:b]) for a, b in shard_bounds(len(bank), n_shards)]
                for k in (1, 3):
                    merged = merge_topk([sh.search(queries, min(k, sh.size)) for sh in shards], k)
                    np.testing.assert_array_equal(merged, single.search(queries, k))
    finally:
        faiss.cvar.distance_compute_blas_threshold = before


def test_fingerprint_changes_with_files_and_config(tmp_path):
    from patchknn.distributed.variants import training_fingerprint

    files = []
    for i in range(2):
        f = tmp_path / f"{i}.png"
        f.write_bytes(b"x" * (i + 1))
        files.append(f)
    cfg = preset("paper", **TINY_CFG)
    fp = training_fingerprint(cfg, files, weights="random")
    assert fp == training_fingerprint(cfg, files, weights="random")
    assert fp != training_fingerprint(cfg.replace(k=2), files, weights="random")
    assert fp != training_fingerprint(cfg, files[:1], weights="random")
    assert fp != training_fingerprint(cfg, files, weights="random", on_error="skip")
    os.utime(files[0], ns=(1, 1))
    assert fp != training_fingerprint(cfg, files, weights="random")


# ------------------------------------------------------------------------------------- sharding
@ray_test
def test_sharded_search_equals_single(ray_instance):
    from patchknn.distributed import ShardedIndex

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(5000, 24)).astype(np.float32)
    single = MemoryBankIndex().build(bank)
    with ShardedIndex.from_bank(bank, 3) as sharded:
        assert sharded.n_shards == 3 and sharded.size == 5000
        for n_queries in (7, 700):
            q = rng.normal(size=(n_queries, 24)).astype(np.float32)
            for k in (1, 4):
                np.testing.assert_array_equal(sharded.search(q, k), single.search(q, k))
        np.testing.assert_array_equal(sharded.search(torch.from_numpy(bank[:5]), 1), single.search(bank[:5], 1))
        np.testing.assert_array_equal(sharded.bank, bank)
        with pytest.raises(ValueError):
            sharded.search(q, 5001)


@ray_test
def test_sharded_index_in_place_of_model_index(ray_instance, archive, one_thread):
    from patchknn.distributed import ShardedIndex, load_sharded

    model_dir, _, paths = archive
    good = paths[:4]
    ref = PatchKNN.load(model_dir, progress=False)
    expected = ref.predict(good)
    model = PatchKNN.load(model_dir, progress=False)
    with ShardedIndex.from_bank(model.index_.bank, 2) as index:
        assert index.bounds == [(0, 1024), (1024, 1280)]
        model.index_ = index
        for a, b in zip(model.predict(good), expected, strict=True):
            assert a.score == b.score
            np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    lazy = load_sharded(model_dir, 2, progress=False)  # the bank never enters this process
    try:
        assert lazy.index_.n_shards == 2 and lazy.threshold_ == ref.threshold_
        for a, b in zip(lazy.predict(good), expected, strict=True):
            assert a.score == b.score and a.verdict == b.verdict
            np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    finally:
        lazy.index_.close()


# ------------------------------------------------------------------------------------- fit-many
@ray_test
def test_fit_many_equals_fitting_one_by_one(ray_instance, variants_root, tmp_path, one_thread):
    from patchknn.data import MVTecCategory
    from patchknn.distributed import discover_variants, fit_many

    out = tmp_path / "models"
    cfg = preset("paper", **TINY_CFG)
    variants = discover_variants([variants_root])
    assert [v.name for v in variants] == ["alpha", "beta", "broken", "gamma"]
    seen = []
    report = fit_many(variants, out, cfg, weights="random", on_result=seen.append)
    status = {r["name"]: r["status"] for r in report.results}
    assert status == {"alpha": "fitted", "beta": "fitted", "gamma": "fitted", "broken": "failed"}
    assert len(seen) == 4
    broken = next(r for r in report.results if r["name"] == "broken")
    assert "ImageError" in broken["error"] and "000.png" in broken["error"]
    on_disk = json.loads((out / "fit-many-report.json").read_text())
    assert on_disk["counts"] == {"fitted": 3, "up-to-date": 0, "failed": 1}
    assert any(v["name"] == "broken" and "ImageError" in v["error"] for v in on_disk["variants"])
    assert not (out / "broken" / "patchknn.json").exists()

    for name in ("alpha", "beta", "gamma"):
        cat = MVTecCategory(variants_root, name)
        alone = PatchKNN.from_config(cfg, weights="random", progress=False).fit(cat.train_paths())
        many = PatchKNN.load(out / name, progress=False)
        np.testing.assert_array_equal(many.index_.bank, alone.index_.bank)
        np.testing.assert_array_equal(many.pca_.components, alone.pca_.components)
        assert many.threshold_ == alone.threshold_
        tests = [s.path for s in cat.test_samples()]
        for a, b in zip(many.predict(tests), alone.predict(tests), strict=True):
            assert a.score == b.score
            np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        assert many.fit_info_["training_fingerprint"]["n_files"] == len(cat.train_paths())


@ray_test
def test_fit_many_cli_skips_up_to_date(ray_instance, variants_root, tmp_path):
    from typer.testing import CliRunner

    from patchknn.cli import app

    runner = CliRunner()
    out = tmp_path / "models"
    args = ["fit-many", str(variants_root / "alpha"), str(variants_root / "beta" / "train" / "good"),
            "--output", str(out), "--backbone", "resnet50", "--weights", "random", "--set", "image_size=64",
            "--grid-size", "8", "--threshold-method", "none"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "2 fitted, 0 up to date, 0 failed" in r.output
    assert PatchKNN.load(out / "beta").config.image_size == 64
    mtime = (out / "alpha" / "patchknn.json").stat().st_mtime_ns

    r = runner.invoke(app, args)  # nothing changed: nothing fitted
    assert r.exit_code == 0, r.output
    assert "0 fitted, 2 up to date, 0 failed" in r.output
    assert (out / "alpha" / "patchknn.json").stat().st_mtime_ns == mtime

    touched = sorted((variants_root / "beta" / "train" / "good").iterdir())[0]
    os.utime(touched)  # a training file changed: only beta is fitted again
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "1 fitted, 1 up to date, 0 failed" in r.output
    assert (out / "alpha" / "patchknn.json").stat().st_mtime_ns == mtime

    r = runner.invoke(app, [*args, "--k", "2"])  # another config: both fitted again
    assert "2 fitted, 0 up to date" in r.output

    r = runner.invoke(app, [*args[:1], str(variants_root / "broken"), *args[3:]])  # a failure: exit code 1
    assert r.exit_code == 1
    assert "failed" in r.output and "ImageError" in r.output


# -------------------------------------------------------------------------------- score-archive
@ray_test
def test_score_archive_equals_predict(ray_instance, archive, tmp_path):
    from patchknn.distributed import score_archive

    model_dir, test_dir, paths = archive
    out = tmp_path / "scores"
    summary = score_archive(model_dir, [test_dir], out, concurrency=2, batch_size=4, part_rows=5, maps=True,
                            progress=False)
    assert summary.n_images == 13 and summary.n_scored == 13 and summary.n_done_before == 0
    assert summary.n_errors == 1 and summary.n_parts == 3
    _check_equal_to_predict(out, _reference(model_dir, paths), maps=True)
    assert json.loads((out / "summary.json").read_text())["n_scored"] == 13

    again = score_archive(model_dir, [test_dir], out, concurrency=2, batch_size=4, part_rows=5, maps=True,
                          progress=False)  # everything done already
    assert again.n_scored == 0 and again.n_done_before == 13 and again.n_parts == 3

    with pytest.raises(ValueError, match="other options"):  # another threshold into the same folder
        score_archive(model_dir, [test_dir], out, threshold=1.0, maps=True, progress=False)


@ray_test
def test_score_archive_resumes_after_interruption(ray_instance, archive, tmp_path):
    from patchknn.distributed import score_archive

    model_dir, test_dir, paths = archive
    out = tmp_path / "scores"
    threshold = 3.5

    class Interrupted(Exception):
        pass

    def interrupt(index, path):
        raise Interrupted(f"simulated crash after part {index}")

    with pytest.raises(Interrupted):
        score_archive(model_dir, [test_dir], out, concurrency=1, batch_size=2, part_rows=4, threshold=threshold,
                      progress=False, _on_part=interrupt)
    first = sorted((out / "parts").glob("part-*.parquet"))
    assert len(first) == 1
    done_before = set(pq.read_table(first[0]).column("image").to_pylist())
    assert len(done_before) == 4
    stamp = first[0].stat().st_mtime_ns
    (out / "parts" / ".part-00001.junk.tmp").write_bytes(b"half-written part of a killed run")

    written = []
    summary = score_archive(model_dir, [test_dir], out, concurrency=2, batch_size=2, part_rows=4,
                            threshold=threshold, progress=False, _on_part=lambda i, p: written.append(p))
    assert summary.n_done_before == 4 and summary.n_scored == 9
    assert first[0].stat().st_mtime_ns == stamp  # the finished part was not rewritten
    rescored = set()
    for p in written:
        rescored |= set(pq.read_table(p).column("image").to_pylist())
    assert not rescored & done_before  # nothing scored twice
    assert not list((out / "parts").glob(".part-*"))
    _check_equal_to_predict(out, _reference(model_dir, paths, threshold=threshold), maps=False)


def _kill_descendants(marker: str) -> list[int]:
    """SIGKILL the processes under this one (the local Ray instance's workers are) whose command line
    contains ``marker``; found through Linux's /proc."""
    import signal

    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # "pid (name) state ppid ...": the name may hold spaces, so split after its ")"
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    mine, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, ppid in parent.items() if ppid in mine} - mine
        mine |= new
        grew = bool(new)
    killed = []
    for pid in sorted(mine - {os.getpid()}):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


@ray_test
@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="finds Ray's actor process through /proc")
def test_score_archive_survives_a_killed_actor_process(ray_instance, archive, tmp_path):
    """A scoring actor's process dies (SIGKILL, as with the OOM killer or a lost machine) after the
    first part is written: Ray restarts the actor and retries its batch, the run completes, and
    every file is in the output once, equal to predict."""
    from patchknn.distributed import score_archive

    model_dir, test_dir, paths = archive
    killed: list[int] = []

    def kill_the_scorer(index, path):
        if index == 0:
            killed.extend(_kill_descendants("MapBatches(ArchiveScorer)"))

    summary = score_archive(model_dir, [test_dir], tmp_path / "scores", concurrency=1, batch_size=2, part_rows=4,
                            progress=False, _on_part=kill_the_scorer)
    assert killed, "no ArchiveScorer actor process was found to kill"
    assert summary.n_images == summary.n_scored == 13 and summary.n_done_before == 0
    _check_equal_to_predict(tmp_path / "scores", _reference(model_dir, paths), maps=False)


@ray_test
def test_score_archive_resumes_after_the_driver_is_killed(ray_instance, archive, tmp_path):
    """`patchknn score-archive` (joined to a running cluster) is SIGKILLed once a part is on disk:
    the same command again scores only the files that are not in a part, and the output is whole."""
    import signal
    import time

    model_dir, _, paths = archive
    address = ray_instance.get_runtime_context().gcs_address
    listing = tmp_path / "all.txt"
    listing.write_text("\n".join(paths) + "\n")
    out = tmp_path / "scores"
    command = [sys.executable, "-m", "patchknn.cli", "score-archive", str(model_dir), str(listing), "--output",
               str(out), "--address", address, "--batch-size", "2", "--part-rows", "2", "-q"]
    p = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("parts/part-*.parquet")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = {r for part in out.glob("parts/part-*.parquet") for r in pq.read_table(part).column("image").to_pylist()}
    assert 2 <= len(done) < 13 and not (out / "summary.json").exists()

    r = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_done_before"] == len(done) and summary["n_scored"] == 13 - len(done)
    _check_equal_to_predict(out, _reference(model_dir, paths), maps=False)


@ray_test
def test_score_archive_cli_sharded(ray_instance, archive, tmp_path):
    from typer.testing import CliRunner

    from patchknn.cli import app

    model_dir, test_dir, paths = archive
    out = tmp_path / "scores"
    listing = tmp_path / "list.txt"
    listing.write_text("# archive\n" + "\n".join(paths) + "\n")
    r = CliRunner().invoke(app, ["score-archive", str(model_dir), str(listing), "--output", str(out),
                                 "--shards", "2", "--concurrency", "1", "--batch-size", "4", "--maps", "-q"])
    assert r.exit_code == 0, r.output
    _check_equal_to_predict(out, _reference(model_dir, paths), maps=True)


@ray_test
def test_score_archive_cli_joins_a_running_cluster(ray_instance, archive, tmp_path):
    """--address: a separate driver process joins this module's Ray instance instead of starting one."""
    model_dir, _, paths = archive
    address = ray_instance.get_runtime_context().gcs_address
    listing = tmp_path / "three.txt"
    listing.write_text("\n".join(paths[:3]) + "\n")
    out = tmp_path / "scores"
    r = subprocess.run(
        [sys.executable, "-m", "patchknn.cli", "score-archive", str(model_dir), str(listing), "--output", str(out),
         "--address", address],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Started a local Ray instance" not in r.stderr
    assert "Connecting to existing Ray cluster" in r.stderr
    _check_equal_to_predict(out, _reference(model_dir, paths[:3]), maps=False)


@ray_test
def test_a_crash_after_a_ray_session_still_prints_its_traceback(tmp_path):
    """Ray replaces Python's fault handler while it runs and leaves none after ``ray.shutdown()``
    (a crash then prints nothing: CI once ended in a bare "Segmentation fault"); leaving
    ``ray_session`` enables it again, and collects garbage before Ray stops."""
    script = (
        "import ctypes\n"
        "from patchknn.distributed._ray import ray_session\n"
        "with ray_session(num_cpus=1, object_store_memory=80 * 1024**2, quiet=True):\n"
        "    pass\n"
        "ctypes.string_at(0)\n"
    )
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == -11, r.stdout + r.stderr
    assert "Fatal Python error: Segmentation fault" in r.stderr and "string_at" in r.stderr, r.stderr[-2000:]


def test_lazy_names_stay_functions_after_their_modules_load():
    """The package loads its submodules on first use; a submodule named like one of the package's
    functions would replace the function by the module once imported (``score_archive`` did)."""
    import importlib

    import patchknn.distributed as dist

    for module in ("archive", "variants", "sharded", "_ray"):
        importlib.import_module(f"patchknn.distributed.{module}")
    for name in ("fit_many", "score_archive", "load_sharded", "shard_model", "ray_session"):
        assert callable(getattr(dist, name)) and not isinstance(getattr(dist, name), type(dist)), name
