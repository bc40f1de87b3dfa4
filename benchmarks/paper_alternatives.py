"""Where the paper is silent: the measured effect of each alternative on a real category.

The paper (Keras ResNet-50, layers 1-3 at 28x28, PCA 95 %, 1-NN) does not say how images are
resized, nor at which resolution maps are compared with masks, and its network's stem pooling was
given wrongly by an earlier weights note. This script evaluates the ``paper`` preset and one
alternative at a time with ``patchknn evaluate`` (in this process, so a monkeypatch can reach the
image decoder) and prints one Markdown table row per variant:

* ``keras``            -- the project's resolution: ``resnet50-keras``, bilinear resize, masks at 224.
* ``caffe``            -- ``--backbone resnet50-caffe`` (Caffe's ceil-mode stem pool, same weights).
* ``nearest``          -- images resized with nearest neighbour, as Keras' ``load_img(target_size=...)``
  does by default (Pillow's ``resize`` patched to turn BILINEAR into NEAREST while images load).
* ``original``         -- ``--resolution original``: maps upsampled to each image's own size and
  compared with the full-size masks.
* ``caffe-nearest``    -- both of the first two alternatives.
* ``imagenet-std``     -- "normalized using ImageNet statistics" read literally: RGB ``x / 255``
  minus the ImageNet mean, over its standard deviation (torchvision's convention), fed to the Keras
  network instead of Keras' ``preprocess_input`` ("caffe" mode: BGR, 0..255 minus the mean).

Usage (weights through ``PATCHKNN_WEIGHTS_DIR``; time it under the shared lock so runs do not overlap):

    PATCHKNN_WEIGHTS_DIR=../shared/weights flock /tmp/patchknn-bench.lock \\
        python benchmarks/paper_alternatives.py --data-root ../shared/mvtec --category bottle \\
        --output-dir alt-results [--variants keras caffe nearest original]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

VARIANTS: dict[str, tuple[list[str], str]] = {
    # name: (extra `patchknn evaluate` arguments, patch applied while it runs)
    "keras": ([], ""),
    "caffe": (["--backbone", "resnet50-caffe"], ""),
    "nearest": ([], "nearest"),
    "original": (["--resolution", "original"], ""),
    "caffe-nearest": (["--backbone", "resnet50-caffe"], "nearest"),
    "imagenet-std": ([], "imagenet-std"),
}


@contextlib.contextmanager
def nearest_resize() -> Iterator[None]:
    """Make every Pillow BILINEAR resize a NEAREST one (images only: masks are already NEAREST)."""
    from PIL import Image

    original = Image.Image.resize

    def resize(self, size, resample=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        if resample == Image.Resampling.BILINEAR:
            resample = Image.Resampling.NEAREST
        return original(self, size, resample, *args, **kwargs)

    Image.Image.resize = resize  # type: ignore[method-assign]
    try:
        yield
    finally:
        Image.Image.resize = original  # type: ignore[method-assign]


@contextlib.contextmanager
def imagenet_std_normalization() -> Iterator[None]:
    """Feed the Keras/Caffe ResNet-50 torchvision-style input: RGB, ``(x / 255 - mean) / std``."""
    import torch

    from patchknn.backbones.resnet import IMAGENET_MEAN, IMAGENET_STD, CaffeResNet50

    original = CaffeResNet50.normalize

    def normalize(self, images):  # type: ignore[no-untyped-def]
        x = images.to(device=self.mean.device, dtype=torch.float32) / 255.0
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    CaffeResNet50.normalize = normalize  # type: ignore[method-assign]
    try:
        yield
    finally:
        CaffeResNet50.normalize = original  # type: ignore[method-assign]


PATCHES = {"": contextlib.nullcontext, "nearest": nearest_resize, "imagenet-std": imagenet_std_normalization}


def run(data_root: str, category: str, name: str, output_dir: Path, workers: str) -> dict:
    from typer.testing import CliRunner

    from patchknn.cli import app

    extra, patch = VARIANTS[name]
    out = output_dir / f"{category}-{name}.json"
    args = ["evaluate", "--data-root", data_root, "--category", category, "--output", str(out), "--quiet",
            "--workers", workers, *extra]
    t0 = time.perf_counter()
    with PATCHES[patch]():
        result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise SystemExit(f"{name}: patchknn {' '.join(args)} failed:\n{result.output}")
    doc = json.loads(out.read_text())
    row = doc["categories"][category]
    return {
        "variant": name,
        "backbone": doc["config"]["backbone"],
        "args": " ".join([*extra, *([f"(patched: {patch})"] if patch else [])]),
        "pixel_auprc": row["pixel_auprc"],
        "pixel_auroc": row["pixel_auroc"],
        "image_auroc": row["image_auroc"],
        "n_components": row["n_components"],
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--output-dir", default="paper-alternatives")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--workers", default="0", help="decoding workers (0: in this process, patch applies)")
    opts = parser.parse_args()
    output_dir = Path(opts.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    print("| variant | backbone | change | pixel AUPRC | pixel AUROC | image AUROC | PCA components | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in opts.variants:
        r = run(opts.data_root, opts.category, name, output_dir, opts.workers)
        rows.append(r)
        print(f"| {r['variant']} | {r['backbone']} | {r['args'] or '-'} | {r['pixel_auprc']:.4f} | "
              f"{r['pixel_auroc']:.4f} | {r['image_auroc']:.4f} | {r['n_components']} | {r['seconds']:.0f} |",
              flush=True)
    (output_dir / f"{opts.category}-summary.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
