"""Exact k-NN search speed against the hardware limit (issue 13).

For each memory bank: queries/s of a brute-force faiss ``IndexFlatL2``, the cluster-pruned
``PrunedFlatIndex`` and the screened ``ScreenedFlatIndex`` with each screen, int8 (the default) and
float32 (build time, re-checked pairs, agreement with the brute force and with each other), and,
measured in the same run, the GEMM rates of this CPU in float32,
bfloat16 and int8 (``torch._int_mm``) at the search's shape: the "fp32 limit" is the queries/s a
full scan would reach at the float32 GEMM rate (``rate / (2 N d)``), the "scan-equivalent" rate of
an index is the GEMM rate a full scan would need to match it.

Banks: synthetic clustered banks of the sizes of MVTec bottle and magnetic_tile with the ``paper``
preset (163,856 x 201 and 597,408 x 711, the dimensions measured on the real data) by default,
or real features saved by ``--save-features`` (the ``paper`` preset fitted on a category's
``train/good``; the queries are the searched rows of some of its test images, recorded through
the model's index)::

    python benchmarks/search.py --save-features /tmp/feats --data-root "$PATCHKNN_MTD_ROOT" \\
        --category magnetic_tile --weights "$PATCHKNN_WEIGHTS_DIR"/resnet50-caffe-msra-stem-layer3.safetensors
    flock /tmp/patchknn-bench.lock python benchmarks/search.py --features /tmp/feats/magnetic_tile

Run timings under ``flock /tmp/patchknn-bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import faiss
import numpy as np
import torch


def gemm_rates(d: int, threads: int, m: int = 784, n: int = 8192) -> dict[str, float]:
    """GFLOP/s (GOP/s for int8) of ``(m x d) @ (d x n)`` on ``threads`` threads."""
    torch.set_num_threads(threads)
    out = {}
    a32, b32 = torch.randn(m, d), torch.randn(n, d)
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = a32.to(dt), b32.to(dt)
        torch.mm(a, b.T)
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < 1.0:
            torch.mm(a, b.T)
            reps += 1
        out[name] = 2 * m * n * d * reps / (time.perf_counter() - t) / 1e9
    d8 = (d + 7) // 8 * 8
    a8 = torch.randint(-127, 128, (m, d8), dtype=torch.int8)
    b8 = torch.randint(-127, 128, (d8, n), dtype=torch.int8)
    try:
        torch._int_mm(a8, b8)
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < 1.0:
            torch._int_mm(a8, b8)
            reps += 1
        out["int8"] = 2 * m * n * d8 * reps / (time.perf_counter() - t) / 1e9
    except RuntimeError:  # pragma: no cover - builds without the int8 kernel
        out["int8"] = float("nan")
    try:  # oneDNN's int8 linear layer (the screen's kernel where it is faster: AMX), same shape
        from patchknn.index.quantized import _onednn_product

        packed = torch.ops.onednn.qlinear_prepack(b8.t().contiguous(), [m, d8])
        ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.int64)
        _onednn_product(a8, packed, ones, zeros)
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < 1.0:
            _onednn_product(a8, packed, ones, zeros)
            reps += 1
        out["int8_onednn"] = 2 * m * n * d8 * reps / (time.perf_counter() - t) / 1e9
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without it
        out["int8_onednn"] = float("nan")
    return out


def synthetic(n: int, d: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered vectors with a decaying spectrum (like PCA output); 5 % of the queries far away."""
    rng = np.random.default_rng(seed)
    scale = (np.linspace(2.0, 0.15, d) ** 1.5).astype(np.float32)
    centres = rng.normal(size=(max(16, n // 500), d)).astype(np.float32) * scale
    bank = np.empty((n, d), dtype=np.float32)
    step = 50_000
    for a in range(0, n, step):
        rows = min(step, n - a)
        bank[a : a + rows] = centres[rng.integers(len(centres), size=rows)]
        bank[a : a + rows] += rng.standard_normal((rows, d), dtype=np.float32) * (0.7 * scale)
    q = centres[rng.integers(len(centres), size=n_queries)] + rng.standard_normal((n_queries, d), dtype=np.float32) * (
        0.7 * scale
    )
    far = max(1, n_queries // 20)
    q[:far] = rng.normal(scale=3.0, size=(far, d)).astype(np.float32) * scale
    return bank, q.astype(np.float32)


def save_features(out: Path, data_root: Path, category: str, weights: str | None, n_test: int) -> None:
    from patchknn import PatchKNN

    rows: list[np.ndarray] = []

    class Recorder:  # records what the model searches, answers with the real index
        def __init__(self, inner):
            self.inner, self.bank, self.size = inner, inner.bank, inner.size

        def search(self, queries, k=1):
            rows.append(np.array(queries, dtype=np.float32, copy=True))
            return self.inner.search(queries, k)

    train = sorted(p for p in (data_root / category / "train" / "good").iterdir() if p.is_file())
    tests = sorted(p for p in (data_root / category / "test").glob("*/*") if p.is_file())
    rng = np.random.default_rng(0)
    pick = [tests[i] for i in sorted(rng.choice(len(tests), min(n_test, len(tests)), replace=False))]
    model = PatchKNN(threshold_method="none", **({"weights": weights} if weights else {}))
    model.fit(train)
    bank = model.index_.bank
    model.index_ = Recorder(model.index_)
    model.predict(pick)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "bank.npy", bank)
    np.save(out / "queries.npy", np.concatenate(rows))
    print(f"saved {bank.shape} bank and {sum(len(r) for r in rows)} queries to {out}")


def bench_bank(name: str, bank: np.ndarray, q: np.ndarray, threads: int, args: argparse.Namespace) -> dict:
    from patchknn.index import PrunedFlatIndex, quantized
    from patchknn.index.screened import ScreenedFlatIndex

    n, d = bank.shape
    res: dict = {"bank": name, "rows": n, "dim": d, "threads": threads}
    rates = gemm_rates(d, threads)
    res["gemm_gflops"] = {k: round(v, 1) for k, v in rates.items()}
    res["fp32_limit_qps"] = round(rates["fp32"] * 1e9 / (2 * n * d), 1)
    flop_q = 2.0 * n * d
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)

    nb = min(len(q), args.brute_queries)
    flat = faiss.IndexFlatL2(d)
    flat.add(bank)
    flat.search(q[:8], 1)
    t = time.perf_counter()
    sq, _ = flat.search(q[:nb], 1)
    res["faiss_flat_qps"] = round(nb / (time.perf_counter() - t), 1)
    ref = np.sqrt(np.maximum(sq[:, 0], 0))
    del flat
    gc.collect()

    if n <= args.pruned_max_rows:
        t = time.perf_counter()
        pr = PrunedFlatIndex(seed=0, threads=threads).build(bank)
        res["pruned_build_s"] = round(time.perf_counter() - t, 1)
        pr.search(q[:8], 1)
        pr.stats["pairs"] = 0
        t = time.perf_counter()
        got = pr.search(q, 1)
        res["pruned_qps"] = round(len(q) / (time.perf_counter() - t), 1)
        res["pruned_pair_fraction"] = round(pr.stats["pairs"] / (len(q) * n), 4)
        res["pruned_max_rel_diff_vs_faiss"] = float(np.max(np.abs(got[:nb, 0] - ref) / np.maximum(ref, 1e-6)))
        del pr
        gc.collect()

    # the same answers; the int8 one is the default, on the faster of its two kernels (int8_backend),
    # and, where that is oneDNN's, also on torch._int_mm for comparison ("int8_int_mm")
    screens = ["int8", "float32"] + (["int8_int_mm"] if quantized.int8_backend() == "onednn" else [])
    chosen = quantized.int8_backend
    for screen in screens:
        key = f"screened_{screen}"
        quantized.int8_backend = (lambda: "int_mm") if screen == "int8_int_mm" else chosen
        t = time.perf_counter()
        sc = ScreenedFlatIndex(threads=threads, screen="float32" if screen == "float32" else "int8").build(bank)
        quantized.int8_backend = chosen
        res[f"{key}_build_s"] = round(time.perf_counter() - t, 1)
        res[f"{key}_head_dim"] = sc._index.head_dim
        sc.search(q[:8], 1)
        sc.stats.clear()
        t = time.perf_counter()
        got = sc.search(q, 1)
        res[f"{key}_qps"] = round(len(q) / (time.perf_counter() - t), 1)
        res[f"{key}_recheck_fraction"] = round(sc.stats["rechecked"] / sc.stats["screened"], 5)
        res[f"{key}_max_rel_diff_vs_faiss"] = float(np.max(np.abs(got[:nb, 0] - ref) / np.maximum(ref, 1e-6)))
        res[f"{key}_scan_equivalent_gflops"] = round(res[f"{key}_qps"] * flop_q / 1e9, 1)
        res[f"{key}_vs_fp32_limit"] = round(res[f"{key}_qps"] / res["fp32_limit_qps"], 2)
        if screen == "int8":
            answers = got
            res["int8_kernel"] = sc._index.backend
        else:
            res["screens_identical"] = bool(res.get("screens_identical", True) and np.array_equal(answers, got))
        del sc
        gc.collect()
    res["int8_vs_float32_screen"] = round(res["screened_int8_qps"] / res["screened_float32_qps"], 2)
    if "screened_int8_int_mm_qps" in res:
        res["onednn_vs_int_mm_kernel"] = round(res["screened_int8_qps"] / res["screened_int8_int_mm_qps"], 2)
    res["speedup_vs_faiss_flat"] = round(res["screened_int8_qps"] / res["faiss_flat_qps"], 2)
    res["fraction_of_fp32_limit_faiss"] = round(res["faiss_flat_qps"] / res["fp32_limit_qps"], 2)
    if "pruned_qps" in res:
        res["speedup_vs_pruned"] = round(res["screened_int8_qps"] / res["pruned_qps"], 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, action="append", default=[], help="folder with bank.npy, queries.npy")
    ap.add_argument("--synthetic", action="append", default=None, help="N,D (default: bottle and magnetic_tile sizes)")
    ap.add_argument("--queries", type=int, default=784, help="queries per index timing (784 = one image)")
    ap.add_argument("--brute-queries", type=int, default=196, help="queries for the faiss brute force")
    ap.add_argument(
        "--pruned-max-rows", type=int, default=200_000, help="skip PrunedFlatIndex above (minutes of k-means)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-features", type=Path, default=None)
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--test-images", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.save_features is not None:
        if args.data_root is None:
            ap.error("--save-features needs --data-root")
        save_features(args.save_features / args.category, args.data_root, args.category, args.weights, args.test_images)
        return
    results = []
    for folder in args.features:
        bank = np.load(folder / "bank.npy")
        q = np.load(folder / "queries.npy")
        q = q[np.random.default_rng(0).permutation(len(q))[: args.queries]]
        results.append(bench_bank(folder.name, bank, q, args.threads, args))
        print(json.dumps(results[-1]), flush=True)
        del bank
        gc.collect()
    specs = args.synthetic if args.synthetic is not None else ([] if args.features else ["163856,201", "597408,711"])
    for spec in specs:
        n, d = (int(x) for x in spec.split(","))
        bank, q = synthetic(n, d, args.queries)
        results.append(bench_bank(f"synthetic {n}x{d}", bank, q, args.threads, args))
        print(json.dumps(results[-1]), flush=True)
        del bank
        gc.collect()
    cols = ["bank", "rows", "dim", "faiss_flat_qps", "pruned_qps", "screened_int8_qps", "screened_float32_qps",
            "screens_identical", "fp32_limit_qps", "screened_int8_vs_fp32_limit", "screened_int8_recheck_fraction",
            "int8_kernel", "screened_int8_int_mm_qps"]
    print("\n| " + " | ".join(cols) + " | GEMM GFLOP/s fp32 / bf16 / int8 / int8 oneDNN |")
    print("|" + "---|" * (len(cols) + 1))
    for r in results:
        g = r["gemm_gflops"]
        gemm = f"{g['fp32']} / {g['bf16']} / {g['int8']} / {g['int8_onednn']}"
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + f" | {gemm} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
