"""JPEG draft decoding (``load_resized(..., jpeg_draft=R)``): how far the model's input moves, and the time saved.

For each JPEG and each draft ratio ``R`` the script decodes the file with ``load_resized`` at the
model's input size and compares the result with the full decode (``jpeg_draft=None``): max and mean
absolute difference in grey levels (0-255) and the decode+resize time of both (best of
``--repeats``, one core). Inputs:

* every JPEG under ``--folder`` (e.g. ``$PATCHKNN_MTD_ROOT/magnetic_tile``), if given;
* ``--from-pngs FOLDER``: PNGs re-encoded as JPEG (quality ``--quality``) at their own size and
  upscaled ``--upscale`` times (a large camera image of the same scene), written to a temporary folder.

With ``--model DIR --test-root ROOT --category NAME`` it also scores the category's test images,
re-encoded as JPEG when they are PNGs, with and without draft decoding and prints the pixel AUPRC of
both (masks resized with nearest neighbour, as ``patchknn evaluate``).

Examples::

    python benchmarks/jpeg_draft.py --folder $PATCHKNN_MTD_ROOT/magnetic_tile --sizes 224,320
    python benchmarks/jpeg_draft.py --from-pngs $PATCHKNN_MVTEC_ROOT/bottle/test/good --upscale 4 --sizes 224,320
    python benchmarks/jpeg_draft.py --model models/bottle-fast --test-root $PATCHKNN_MVTEC_ROOT --category bottle
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def reencode(pngs: list[Path], out: Path, quality: int, upscale: float) -> list[Path]:
    """``pngs`` saved as JPEG (``upscale`` times their size, bicubic) under ``out``."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, png in enumerate(pngs):
        img = Image.open(png).convert("RGB")
        if upscale != 1:
            img = img.resize((round(img.width * upscale), round(img.height * upscale)), Image.Resampling.BICUBIC)
        path = out / f"{i:04d}-{png.parent.name}-{png.stem}.jpg"
        img.save(path, quality=quality)
        paths.append(path)
    return paths


def best_time(fn, repeats: int) -> float:  # noqa: ANN001 - a callable without arguments
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def compare(paths: list[Path], sizes: list[int], ratios: list[float], repeats: int) -> None:
    """Print, per input size and ratio: images drafted, max/mean abs difference, decode ms full vs draft."""
    from PIL import Image

    from patchknn.data import load_resized
    from patchknn.data.decode import apply_draft

    for size in sizes:
        full = {p: load_resized(p, size, jpeg_draft=None)[0].astype(np.int16) for p in paths}
        t_full = sum(best_time(lambda p=p, size=size: load_resized(p, size, jpeg_draft=None), repeats) for p in paths)
        for ratio in ratios:
            drafted, diffs, means = 0, [], []
            for p in paths:
                with Image.open(p) as img:
                    scaled = apply_draft(img, (size, size), ratio) > 1
                drafted += scaled
                got = load_resized(p, size, jpeg_draft=ratio)[0].astype(np.int16)
                d = np.abs(got - full[p])
                diffs.append(int(d.max()))
                means.append(float(d.mean()))
            t_draft = sum(
                best_time(lambda p=p, size=size, ratio=ratio: load_resized(p, size, jpeg_draft=ratio), repeats)
                for p in paths
            )
            print(
                f"size {size:4d}  ratio {ratio:4.1f}: drafted {drafted:4d}/{len(paths)}  "
                f"max abs diff {max(diffs):3d}  mean abs diff {np.mean(means):.3f} (worst image {max(means):.3f})  "
                f"decode+resize {t_full / len(paths) * 1000:6.1f} -> {t_draft / len(paths) * 1000:6.1f} ms/image",
                flush=True,
            )


def auprc(model_dir: str, root: str, category: str, ratio: float, quality: int) -> None:
    """Pixel AUPRC of ``model_dir`` on the category's test set (as JPEG), full decode vs draft."""
    import patchknn.data.resize as resize_module
    from patchknn import PatchKNN, metrics
    from patchknn.data import MVTecCategory, load_mask, resize_mask

    samples = MVTecCategory(root, category).test_samples()
    model = PatchKNN.load(model_dir, progress=False)
    size = model.config.image_size
    with tempfile.TemporaryDirectory() as tmp:
        pngs = [Path(s.path) for s in samples]
        paths = pngs if pngs[0].suffix.lower() in (".jpg", ".jpeg") else reencode(pngs, Path(tmp), quality, 1)
        masks = np.stack(
            [resize_mask(load_mask(s.mask_path), (size, size)) if s.mask_path else np.zeros((size, size), bool)
             for s in samples]
        )
        default = resize_module.load_resized.__kwdefaults__["jpeg_draft"]
        for label, value in (("full decode", None), (f"draft ratio {ratio}", ratio)):
            resize_module.load_resized.__kwdefaults__["jpeg_draft"] = value
            try:
                maps = np.stack([p.anomaly_map for p in model.predict([str(p) for p in paths])])
            finally:
                resize_module.load_resized.__kwdefaults__["jpeg_draft"] = default
            print(f"{category} ({len(paths)} test images as JPEG): {label}: pixel AUPRC "
                  f"{metrics.pixel_auprc(maps, masks):.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", help="compare every JPEG under this folder")
    ap.add_argument("--from-pngs", help="re-encode the PNGs under this folder as JPEG and compare those")
    ap.add_argument("--upscale", type=float, default=1.0, help="with --from-pngs: enlarge the images first")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of the re-encoded images")
    ap.add_argument("--limit", type=int, default=64, help="at most this many images (spread over the list)")
    ap.add_argument("--sizes", default="224,320", help="model input sizes")
    ap.add_argument("--ratios", default="1,2", help="draft ratios to compare with the full decode")
    ap.add_argument("--repeats", type=int, default=3, help="timed decodes per image (best is kept)")
    ap.add_argument("--model", help="a saved model: also compare pixel AUPRC with and without draft")
    ap.add_argument("--test-root", help="with --model: the MVTec-layout root")
    ap.add_argument("--category", help="with --model: the category")
    ap.add_argument("--ratio", type=float, default=2.0, help="with --model: the draft ratio to score with")
    args = ap.parse_args()

    sizes = [int(x) for x in args.sizes.split(",") if x]
    ratios = [float(x) for x in args.ratios.split(",") if x]
    with tempfile.TemporaryDirectory() as tmp:
        paths: list[Path] = []
        if args.folder:
            paths = sorted(p for p in Path(args.folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        elif args.from_pngs:
            pngs = sorted(Path(args.from_pngs).rglob("*.png"))
            pngs = pngs[:: max(1, len(pngs) // args.limit)][: args.limit]
            paths = reencode(pngs, Path(tmp), args.quality, args.upscale)
        if paths:
            paths = paths[:: max(1, len(paths) // args.limit)][: args.limit]
            from PIL import Image

            shapes = np.array([Image.open(p).size for p in paths])
            print(f"{len(paths)} JPEGs, sizes {shapes.min(0).tolist()} .. {shapes.max(0).tolist()} (w, h)")
            compare(paths, sizes, ratios, args.repeats)
    if args.model:
        auprc(args.model, args.test_root, args.category, args.ratio, args.quality)


if __name__ == "__main__":
    main()
