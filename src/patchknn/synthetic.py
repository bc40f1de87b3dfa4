"""A small synthetic dataset in the MVTec AD layout, for the offline demo and for tests.

The normal image is a machined metal washer on a brushed-steel plate: concentric turning marks on the
washer, horizontal brushing streaks on the plate, directional lighting, sensor noise, and small
natural variation between images (position, radii, brightness, lighting direction, texture phase).
Defective images add one of three defects on the washer's face, each with its pixel mask:

* ``scratch``: a thin bright or dark line (2-4 px wide, 50-110 px long at 256 px);
* ``spot``: an irregular rust-coloured blob of contamination (radius 8-18 px);
* ``hole``: a dark pit with a bright rim (radius 6-12 px).

Sizes scale with ``image_size``. Everything is drawn with one :class:`numpy.random.Generator` per
image, seeded from ``(seed, split, index)``, so the files are byte-identical for the same arguments.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from patchknn.errors import ConfigError, DatasetError

__all__ = ["DEFECT_TYPES", "make_synthetic_dataset"]

DEFECT_TYPES: tuple[str, ...] = ("scratch", "spot", "hole")
"""The defect folders written, in the order defective images are assigned to them (round robin)."""

_MARKER = ".patchknn-synthetic.json"
_SPLITS = {"train": 0, "test_good": 1, "test_defect": 2}
_REF = 256.0  # sizes below are given for 256 px images and scaled


class _Grid:
    """Pixel coordinates shared by every image of one size."""

    def __init__(self, size: int) -> None:
        coords = np.arange(size, dtype=np.float32) + 0.5
        self.size = size
        self.scale = size / _REF
        self.y, self.x = np.meshgrid(coords, coords, indexing="ij")


def _box_blur_rows(a: np.ndarray, width: int) -> np.ndarray:
    """Moving average along axis 1 (wrap-around), width in pixels."""
    width = max(1, int(width))
    padded = np.concatenate([a[:, -width:], a], axis=1)
    c = np.cumsum(padded, axis=1, dtype=np.float32)
    return (c[:, width:] - c[:, :-width]) / width


def _normal_image(rng: np.random.Generator, g: _Grid) -> tuple[np.ndarray, dict[str, float]]:
    """A defect-free image (float32, (S, S, 3), 0..255) and the washer geometry."""
    s, k = g.size, g.scale
    cx = s / 2 + rng.uniform(-4, 4) * k
    cy = s / 2 + rng.uniform(-4, 4) * k
    r_out = 0.40 * s * rng.uniform(0.98, 1.02)
    r_in = 0.16 * s * rng.uniform(0.97, 1.03)
    dx, dy = g.x - cx, g.y - cy
    r = np.hypot(dx, dy)

    # Brushed-steel plate: horizontal streaks (per-row offsets + noise smeared along x).
    brightness = rng.uniform(0.96, 1.04)
    rows = rng.normal(0, 1, (s, 1)).astype(np.float32)
    streaks = _box_blur_rows(rng.normal(0, 1, (s, s)).astype(np.float32), 24 * k)
    plate = 92 + 5 * rows + 14 * streaks

    # Washer: concentric turning marks, a chamfer highlight near both edges.
    period = 3.2 * k * rng.uniform(0.97, 1.03)
    turning = np.sin(2 * np.pi * r / period + rng.uniform(0, 2 * np.pi))
    chamfer = np.exp(-(((r - r_out + 3 * k) / (2 * k)) ** 2)) + np.exp(-(((r - r_in - 3 * k) / (2 * k)) ** 2))
    washer = 168 + 6 * turning + 30 * chamfer

    # Directional light across the whole scene.
    angle = rng.uniform(0, 2 * np.pi)
    light = 14 * (dx * np.cos(angle) + dy * np.sin(angle)) / r_out

    # Anti-aliased washer coverage.
    alpha = np.clip(r_out - r + 0.5, 0, 1) * np.clip(r - r_in + 0.5, 0, 1)
    gray = (plate * (1 - alpha) + washer * alpha + light) * brightness
    tint_plate = np.array([1.03, 1.0, 0.96], dtype=np.float32)
    tint_washer = np.array([0.98, 1.0, 1.04], dtype=np.float32)
    tint = tint_plate * (1 - alpha[..., None]) + tint_washer * alpha[..., None]
    img = gray[..., None] * tint + rng.normal(0, 3.0, (s, s, 3)).astype(np.float32)
    geometry = {"cx": cx, "cy": cy, "r_out": r_out, "r_in": r_in}
    return img, geometry


def _point_on_washer(rng: np.random.Generator, geo: dict[str, float], margin: float) -> tuple[float, float]:
    """A random point on the washer face at least ``margin`` px from both of its edges."""
    lo, hi = geo["r_in"] + margin, geo["r_out"] - margin
    radius = rng.uniform(lo, hi) if hi > lo else (geo["r_in"] + geo["r_out"]) / 2
    theta = rng.uniform(0, 2 * np.pi)
    return geo["cx"] + radius * np.cos(theta), geo["cy"] + radius * np.sin(theta)


def _on_washer(g: _Grid, geo: dict[str, float]) -> np.ndarray:
    r = np.hypot(g.x - geo["cx"], g.y - geo["cy"])
    return (r >= geo["r_in"] + 1) & (r <= geo["r_out"] - 1)


def _scratch(rng: np.random.Generator, img: np.ndarray, g: _Grid, geo: dict[str, float]) -> np.ndarray:
    k = g.scale
    px, py = _point_on_washer(rng, geo, 14 * k)
    theta = rng.uniform(0, np.pi)
    half = rng.uniform(25, 55) * k
    ux, uy = np.cos(theta), np.sin(theta)
    # Distance of every pixel to the segment centred on (px, py).
    rx, ry = g.x - px, g.y - py
    t = np.clip(rx * ux + ry * uy, -half, half)
    dist = np.hypot(rx - t * ux, ry - t * uy)
    width = rng.uniform(1.0, 2.0) * k
    inside = _on_washer(g, geo)
    profile = np.exp(-((dist / width) ** 2)) * inside
    contrast = rng.choice([-1.0, 1.0]) * rng.uniform(75, 95)
    img += (contrast * profile)[..., None]
    return (dist <= width + 0.75) & inside


def _spot(rng: np.random.Generator, img: np.ndarray, g: _Grid, geo: dict[str, float]) -> np.ndarray:
    k = g.scale
    radius = rng.uniform(8, 18) * k
    px, py = _point_on_washer(rng, geo, 0.6 * radius)
    dx, dy = g.x - px, g.y - py
    d = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    wobble = (
        1 + 0.22 * np.sin(3 * theta + rng.uniform(0, 6.3)) + 0.12 * np.sin(5 * theta + rng.uniform(0, 6.3))
    )
    edge = radius * wobble
    weight = np.clip((edge - d) / (1.5 * k), 0, 1) * _on_washer(g, geo)
    colour = np.array([150, 72, 28], dtype=np.float32) * rng.uniform(0.85, 1.15)
    mottle = 1 + 0.12 * rng.normal(0, 1, d.shape).astype(np.float32)
    stain = colour * mottle[..., None]
    w = (0.9 * weight)[..., None]
    img *= 1 - w
    img += w * stain
    return weight > 0.5


def _hole(rng: np.random.Generator, img: np.ndarray, g: _Grid, geo: dict[str, float]) -> np.ndarray:
    k = g.scale
    radius = rng.uniform(6, 12) * k
    px, py = _point_on_washer(rng, geo, radius + 3 * k)
    d = np.hypot(g.x - px, g.y - py)
    inner = np.clip(radius - d + 0.5, 0, 1)
    rim = np.exp(-(((d - radius - 0.8 * k) / (1.0 * k)) ** 2))
    depth = 18 + 20 * np.clip(d / radius, 0, 1)  # darkest at the centre
    img *= (1 - inner)[..., None]
    img += (inner * depth)[..., None]
    img += (70 * rim * (1 - inner))[..., None]
    return d <= radius + 1.5 * k


_DEFECTS: dict[str, Callable[[np.random.Generator, np.ndarray, _Grid, dict[str, float]], np.ndarray]] = {
    "scratch": _scratch,
    "spot": _spot,
    "hole": _hole,
}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split], index]))


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _prepare_folder(folder: Path) -> None:
    """Create ``folder``, or clear one this module wrote earlier; never touch anything else."""
    if folder.exists() and not folder.is_dir():
        raise DatasetError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not (folder / _MARKER).is_file():
            raise DatasetError(
                f"{folder} already exists and was not written by make_synthetic_dataset; "
                "choose another root or category"
            )
        for sub in ("train", "test", "ground_truth"):
            if (folder / sub).is_dir():
                shutil.rmtree(folder / sub)
    folder.mkdir(parents=True, exist_ok=True)


def make_synthetic_dataset(
    root: str | os.PathLike[str],
    category: str = "synthetic",
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defective: int = 20,
    image_size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a synthetic category in the MVTec AD layout and return its folder ``<root>/<category>``.

    Layout written::

        <root>/<category>/train/good/000.png ...
        <root>/<category>/test/good/000.png ...
        <root>/<category>/test/<defect>/000.png ...              (defect in scratch, spot, hole)
        <root>/<category>/ground_truth/<defect>/000_mask.png ... (0 / 255, one per defective image)

    Defective images are assigned to the defect types round robin, so each type gets about a third.
    The output is deterministic: the same arguments give byte-identical files. Calling it again on a
    folder it wrote replaces that folder's images; a non-empty folder it did not write is refused.

    Args:
        root: dataset root (created if needed).
        category: category folder name.
        n_train: defect-free training images (>= 1).
        n_test_good: defect-free test images (>= 0).
        n_test_defective: defective test images (>= 0); at least one test image in total.
        image_size: side of the square images in pixels (>= 64).
        seed: non-negative integer seed.

    Returns:
        The category folder; ``MVTecCategory(path.parent, path.name)`` reads it.

    Raises:
        ConfigError: a bad argument.
        DatasetError: the category folder exists with content this function did not write.

    Example:
        >>> path = make_synthetic_dataset("/tmp/demo-data", n_train=10)  # doctest: +SKIP
        >>> sorted(p.name for p in (path / "test").iterdir())  # doctest: +SKIP
        ['good', 'hole', 'scratch', 'spot']
    """
    n_train = _check_count("n_train", n_train, 1)
    n_test_good = _check_count("n_test_good", n_test_good, 0)
    n_test_defective = _check_count("n_test_defective", n_test_defective, 0)
    image_size = _check_count("image_size", image_size, 64)
    seed = _check_count("seed", seed, 0)
    if n_test_good + n_test_defective < 1:
        raise ConfigError("n_test_good + n_test_defective must be at least 1 (the test split can't be empty)")
    if not isinstance(category, str) or not category or category in (".", "..") or "/" in category:
        raise ConfigError(f"category must be a plain folder name, got {category!r}")

    folder = Path(root) / category
    _prepare_folder(folder)
    grid = _Grid(image_size)

    train_dir = folder / "train" / "good"
    train_dir.mkdir(parents=True)
    for i in range(n_train):
        img, _ = _normal_image(_rng(seed, "train", i), grid)
        _save_png(_to_uint8(img), train_dir / f"{i:03d}.png")

    if n_test_good:
        good_dir = folder / "test" / "good"
        good_dir.mkdir(parents=True)
        for i in range(n_test_good):
            img, _ = _normal_image(_rng(seed, "test_good", i), grid)
            _save_png(_to_uint8(img), good_dir / f"{i:03d}.png")

    counters = dict.fromkeys(DEFECT_TYPES, 0)
    for i in range(n_test_defective):
        defect = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        rng = _rng(seed, "test_defect", i)
        img, geometry = _normal_image(rng, grid)
        mask = _DEFECTS[defect](rng, img, grid, geometry)
        image_dir = folder / "test" / defect
        mask_dir = folder / "ground_truth" / defect
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{counters[defect]:03d}"
        counters[defect] += 1
        _save_png(_to_uint8(img), image_dir / f"{stem}.png")
        _save_png(mask.astype(np.uint8) * np.uint8(255), mask_dir / f"{stem}_mask.png")

    params = {
        "generator": "patchknn.synthetic.make_synthetic_dataset",
        "category": category,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defective": n_test_defective,
        "image_size": image_size,
        "seed": seed,
    }
    (folder / _MARKER).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
    return folder
