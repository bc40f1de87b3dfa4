"""What the hot folder costs on top of ``predict``: images/s of `patchknn watch --once` vs ``PatchKNN.predict``.

Run from the repository root (see docs/watch.md)::

    flock /tmp/patchknn-bench.lock python benchmarks/watch.py --test-images 24

Fits the paper's method on ``--train-images`` bottle training images, copies ``--test-images`` test
images into a folder, then times, in this one process and interleaved round by round (``--rounds``,
the best round of each kept, so a burst of load from other processes hurts all alike):

* ``predict``: :meth:`PatchKNN.predict` on the files (decoded in this process, no files written);
* ``watch``: :class:`patchknn.watch.HotFolder` ``run(once=True)`` into a fresh results folder with
  ``--no-overlays`` (read, hash, decode check, score, one fsynced line per image);
* ``watch+overlays``: the same with the overlays written (the default of ``patchknn watch``).

Each is printed as images/s and as seconds per image relative to the backbone network's forward
alone (timed by hooks during the ``predict`` run of the same round), and the scores of both watch
runs are checked equal to ``predict``'s. ``--settle`` is set to 0.01 s so the figure is the
processing, not the waiting. Data root: ``--data-root`` or ``PATCHKNN_MVTEC_ROOT``; the paper's
weights: ``--weights`` or ``PATCHKNN_WEIGHTS_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


class BackboneTimer:
    """Seconds spent in a module's forward (forward pre/post hooks)."""

    def __init__(self, module) -> None:
        self.seconds, self._t0 = 0.0, 0.0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, *_):
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self.seconds += time.perf_counter() - self._t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=os.environ.get("PATCHKNN_MVTEC_ROOT"))
    ap.add_argument("--weights", default=None, help="paper weights file (default: the backbone's lookup)")
    ap.add_argument("--train-images", type=int, default=20)
    ap.add_argument("--test-images", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not args.data_root:
        sys.exit("give --data-root or set PATCHKNN_MVTEC_ROOT")
    import torch

    from patchknn.model import PatchKNN
    from patchknn.watch import HotFolder

    torch.set_num_threads(args.threads)
    bottle = Path(args.data_root) / "bottle"
    train = sorted((bottle / "train" / "good").glob("*.png"))[: args.train_images]
    test = sorted((bottle / "test").rglob("*.png"))[:: max(1, 83 // args.test_images)][: args.test_images]
    model = PatchKNN(weights=args.weights, batch_size=args.batch_size, num_workers=0, progress=False).fit(train)
    timer = BackboneTimer(model.extractor.backbone)
    best: dict[str, float] = {}
    backbone = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "in"
        inp.mkdir()
        for src in test:
            shutil.copy(src, inp / f"{src.parent.name}_{src.name}")
        files = sorted(str(p) for p in inp.iterdir())
        for r in range(args.rounds):
            timer.seconds = 0.0
            t0 = time.perf_counter()
            expected = {Path(p.source).name: p.score for p in model.predict(files)}
            best["predict"] = min(best.get("predict", float("inf")), time.perf_counter() - t0)
            backbone = min(backbone, timer.seconds)
            for name, overlays in (("watch", False), ("watch+overlays", True)):
                out = Path(tmp) / f"out-{name}-{r}"
                t0 = time.perf_counter()
                summary = HotFolder(inp, out, model, settle=0.01, batch_size=args.batch_size,
                                    overlays=overlays).run(once=True)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
                lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
                assert summary.scored == len(files) == len(lines)
                assert all(abs(x["score"] - expected[x["image"]]) <= 1e-6 * abs(expected[x["image"]]) for x in lines)
    n = len(files)
    print(f"bottle, {n} test images, paper method ({len(train)} training images), batch {args.batch_size}, "
          f"{args.threads} threads, best of {args.rounds} rounds; scores of both watch runs == predict's")
    print(f"  backbone alone: {n / backbone:6.2f} images/s")
    for name, seconds in best.items():
        print(f"  {name:15s} {n / seconds:6.2f} images/s   {seconds / backbone:5.2f}x the backbone's time   "
              f"{best['predict'] / seconds:5.2f}x predict's speed")


if __name__ == "__main__":
    main()
