"""Load test of the inspection server: latency percentiles and throughput at 1, 4 and 16 clients.

Talks to 127.0.0.1 only. Either starts its own ``patchknn serve`` (a subprocess on a free loopback
port, with a random API key) for each ``--max-batch`` value, or targets a running server with
``--url`` (which must be a loopback address). Every answer is checked against the offline
``PatchKNN.predict`` result for the same image (score to relative 1e-5, verdict equal); the script
exits with status 1 if any request failed or any answer differed.

The offline ``predict`` of the same images is timed before the servers start and again after they stop
(``--offline-rounds``), and each level's throughput is printed as a ratio to it, with the CPU time per image
of both (the server process's from /proc, own server only), which does not depend on other load.

Bounded: at most ``--requests`` requests per concurrency level and ``--max-seconds`` per level.

Examples:
    # a model of the synthetic category, then the load test (own server, batched vs one-at-a-time)
    python -c "from patchknn.synthetic import make_synthetic_dataset as m; m('/tmp/syn')"
    patchknn fit /tmp/syn/synthetic/train/good -o /tmp/syn-model --backbone efficientnet-lite2
    python benchmarks/load.py --model /tmp/syn-model --max-batch 1,8 --concurrency 1,4,16 --requests 96

    # a server that is already running
    python benchmarks/load.py --url http://127.0.0.1:8000 --name bottle --model models/bottle --api-key KEY
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np


@dataclass
class Level:
    max_batch: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    server_ms: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    wall: float = 0.0
    server_cpu: float = float("nan")  # CPU seconds of the server process during the level (own server only)

    @property
    def done(self) -> int:
        return len(self.latencies)

    def row(self) -> dict:
        lat = np.asarray(self.latencies) * 1000.0 if self.latencies else np.asarray([np.nan])
        return {
            "max_batch": self.max_batch,
            "concurrency": self.concurrency,
            "requests": self.done + len(self.failures),
            "failed": len(self.failures),
            "mismatched": len(self.mismatches),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "throughput_rps": round(self.done / self.wall, 2) if self.wall > 0 else 0.0,
            "server_cpu_ms_per_image": round(self.server_cpu / self.done * 1000, 1) if self.done else float("nan"),
            "mean_batch": round(float(np.mean(self.batch_sizes)), 2) if self.batch_sizes else 0.0,
            **{
                f"{part}_ms": round(float(np.mean([t[part] for t in self.server_ms])), 1) if self.server_ms else 0.0
                for part in ("decode", "queue", "inference")
            },
        }


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its threads so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (``predict``'s decoding workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def is_loopback(host: str) -> bool:
    import ipaddress

    name = host.strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_images(folder: str | None, limit: int, workdir: Path) -> list[Path]:
    """Image files: from ``folder`` (recursively) or the test split of a generated synthetic category."""
    from patchknn.data import list_images

    if folder is None:
        from patchknn.synthetic import make_synthetic_dataset

        root = make_synthetic_dataset(workdir / "data", n_train=1, n_test_good=6, n_test_defective=10, seed=1)
        folder = str(root / "test")
    paths = list_images(folder, recursive=True)
    step = max(1, len(paths) // limit)  # spread over the folders (good and defective)
    return paths[::step][:limit]


def start_server(model: str, name: str, max_batch: str, args: argparse.Namespace, key: str) -> tuple:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "patchknn.cli",
        "serve",
        f"{name}={model}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch",
        max_batch,
        "--max-delay-ms",
        str(args.max_delay_ms),
        "--max-concurrency",
        str(max(32, int(max_batch))),
        "--timeout",
        str(args.timeout),
        "--no-access-log",
        "--log-level",
        "warning",
        "--device",
        args.device,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PATCHKNN_API_KEYS": key}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, key, proc)
    return proc, url


def wait_ready(url: str, key: str | None, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=10) as c:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                if c.get("/readyz", headers=headers).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"{url} did not become ready in {timeout:.0f} s")


def run_level(
    url: str,
    name: str,
    key: str | None,
    payloads: list[bytes],
    expected: list,
    level: Level,
    n_requests: int,
    max_seconds: float,
) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    path = f"/v1/models/{name}/predict"
    counter = iter(range(n_requests))
    lock = threading.Lock()
    stop_at = time.monotonic() + max_seconds

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=max(60.0, max_seconds), headers=headers) as client:
            while time.monotonic() < stop_at:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                j = i % len(payloads)
                t0 = time.perf_counter()
                try:
                    r = client.post(path, content=payloads[j])
                except httpx.HTTPError as exc:
                    with lock:
                        level.failures.append(f"request {i}: {type(exc).__name__}: {exc}")
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        level.failures.append(f"request {i}: HTTP {r.status_code} {r.text[:200]}")
                        continue
                    level.latencies.append(dt)
                    answer = r.json()
                    level.batch_sizes.append(int(answer.get("batch_size", 1)))
                    level.server_ms.append(answer.get("timing_ms", {}))
                    if expected:
                        want = expected[j]
                        ok = abs(answer["score"] - want.score) <= 1e-5 * abs(want.score) + 1e-6
                        if not ok or answer["verdict"] != want.verdict:
                            level.mismatches.append(
                                f"image {j}: server {answer['score']!r}/{answer['verdict']} vs offline "
                                f"{want.score!r}/{want.verdict}"
                            )

    threads = [threading.Thread(target=worker) for _ in range(level.concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    level.wall = time.perf_counter() - t0


OFFLINE_CPU_MS: list[float] = []
"""CPU milliseconds per image of each timed offline ``predict`` (this process and its decoding workers)."""


def offline_predict(args: argparse.Namespace, images: list[Path], before: bool) -> tuple[list, list[float]]:
    """Offline ``PatchKNN.predict`` of ``images`` in this process: the answers to check the server's
    against (one untimed call, which also warms the model up) and ``--offline-rounds`` timed calls'
    images/s, with the runtime ``predict`` has by default (batch size, decoding workers, threads).
    Run before the servers start and again after they stop, so that the ratio compares figures taken
    on the same machine state; the model is dropped afterwards so that it holds no memory meanwhile."""
    from patchknn import PatchKNN

    t0 = time.perf_counter()
    offline = PatchKNN.load(args.model, progress=False, device=args.device)
    files = [str(x) for x in images]
    expected = offline.predict(files) if before else []
    # as many images as a level's requests (the list repeated), so that both figures cover as much work
    # (a short predict call is dominated by decoding its first batch before the backbone can start)
    n_timed = max(len(files), min(args.requests, 100 * len(files)))
    timed = [files[i % len(files)] for i in range(n_timed)]
    rates = []
    for _ in range(args.offline_rounds):
        t, cpu = time.perf_counter(), own_cpu_seconds()
        offline.predict(timed)
        rates.append(round(n_timed / (time.perf_counter() - t), 2))
        OFFLINE_CPU_MS.append(round((own_cpu_seconds() - cpu) / n_timed * 1000, 1))
    del offline
    when = "before" if before else "after"
    print(f"offline predict of {n_timed} images ({when} the server runs): {rates} images/s "
          f"({time.perf_counter() - t0:.1f} s with loading)", file=sys.stderr)
    return expected, rates


def ratio_lines(rows: list[dict], offline_rates: list[float]) -> str:
    """The server's throughput at each concurrency as a ratio to offline ``predict`` of the same images."""
    offline = float(np.mean(offline_rates))
    cpu = float(np.mean(OFFLINE_CPU_MS)) if OFFLINE_CPU_MS else float("nan")
    lines = [f"\noffline predict: {offline:.2f} images/s (mean of {offline_rates}); "
             f"CPU {cpu:.1f} ms/image (main process + decoding workers)"]
    for r in rows:
        lines.append(
            f"server max_batch {r['max_batch']}, {r['concurrency']} clients: {r['throughput_rps']:.2f} images/s "
            f"= {r['throughput_rps'] / offline:.2f}x offline predict; server CPU {r['server_cpu_ms_per_image']} "
            f"ms/image = {r['server_cpu_ms_per_image'] / cpu:.2f}x offline's"
        )
    return "\n".join(lines)


def warm(url: str, name: str, key: str | None, payloads: list[bytes], n: int) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url, timeout=120, headers=headers) as c:
        for i in range(n):
            c.post(f"/v1/models/{name}/predict", content=payloads[i % len(payloads)]).raise_for_status()


def table(rows: list[dict]) -> str:
    cols = [
        "max_batch",
        "concurrency",
        "requests",
        "failed",
        "mismatched",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "throughput_rps",
        "mean_batch",
        "decode_ms",
        "queue_ms",
        "inference_ms",
        "server_cpu_ms_per_image",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="saved model directory (offline check; and the server to start without --url)")
    p.add_argument("--name", default="model", help="model name in the URL (default: model)")
    p.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (loopback only)")
    p.add_argument("--api-key", help="key for --url (default: first of $PATCHKNN_API_KEYS)")
    p.add_argument("--images", help="folder of test images (default: a generated synthetic test set)")
    p.add_argument("--n-images", type=int, default=16, help="distinct images used (default 16)")
    p.add_argument("--concurrency", default="1,4,16", help="client counts (default 1,4,16)")
    p.add_argument("--requests", type=int, default=64, help="requests per level (default 64, at most 10000)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="time cap per level (default 120)")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests before each server's levels")
    p.add_argument("--max-batch", default="8", help="server --max-batch values, e.g. 1,8 (own server only)")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="server --max-delay-ms (own server only)")
    p.add_argument("--timeout", type=float, default=60.0, help="server --timeout (own server only)")
    p.add_argument("--threads", type=int, default=0, help="server --threads (own server only; 0 = torch default)")
    p.add_argument("--device", default="cpu", help="server --device (own server only)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with offline predict")
    p.add_argument(
        "--offline-rounds",
        type=int,
        default=2,
        help="timed offline predict calls before and again after the servers (default 2; 0 = none); "
        "the server's images/s is printed as a ratio to their mean",
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not 1 <= args.requests <= 10_000 or not levels or min(levels) < 1 or max(levels) > 256:
        p.error("--requests must be in [1, 10000] and --concurrency values in [1, 256]")
    if args.url:
        host = urlsplit(args.url).hostname or ""
        if not is_loopback(host):
            p.error(f"--url must point at a loopback address (127.0.0.1, ::1, localhost), not {host!r}")
    elif not args.model:
        p.error("give --model (to start a server) or --url")
    if not args.model and not args.no_check:
        p.error("the offline check needs --model (or pass --no-check)")

    workdir = Path(tempfile.mkdtemp(prefix="patchknn-load-"))
    images = load_images(args.images, args.n_images, workdir)
    payloads = [path.read_bytes() for path in images]
    expected: list = []
    offline_rates: list[float] = []
    if not args.no_check:
        expected, offline_rates = offline_predict(args, images, before=True)

    rows: list[dict] = []
    failed = False
    targets = [None] if args.url else [b.strip() for b in args.max_batch.split(",") if b.strip()]
    for max_batch in targets:
        proc = None
        if args.url:
            url = args.url.rstrip("/")
            key = args.api_key or (os.environ.get("PATCHKNN_API_KEYS", "").split(",")[0].strip() or None)
            wait_ready(url, key, timeout=30)
            label = "remote"
        else:
            key = secrets.token_urlsafe(24)
            proc, url = start_server(args.model, args.name, max_batch, args, key)
            label = max_batch
        try:
            warm(url, args.name, key, payloads, args.warmup)
            for c in levels:
                level = Level(label, c)
                cpu0 = process_cpu_seconds(proc.pid) if proc is not None else float("nan")
                run_level(url, args.name, key, payloads, expected, level, args.requests, args.max_seconds)
                if proc is not None:
                    level.server_cpu = process_cpu_seconds(proc.pid) - cpu0
                row = level.row()
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
                for msg in (level.failures + level.mismatches)[:5]:
                    print(f"  {msg}", file=sys.stderr)
                failed |= bool(level.failures or level.mismatches)
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    if offline_rates and args.offline_rounds > 0:
        offline_rates += offline_predict(args, images, before=False)[1]
    print(table(rows))
    if offline_rates:
        print(ratio_lines(rows, offline_rates))
    checked = "every answer equal to offline predict" if expected else "answers not checked"
    print(f"\n{len(images)} distinct images; {checked}; {'FAILED' if failed else 'no request failed'}")
    if args.json:
        summary = {"rows": rows, "failed": failed, "offline_images_per_s": offline_rates,
                   "offline_cpu_ms_per_image": OFFLINE_CPU_MS, "argv": sys.argv[1:]}
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
