"""Synthetic defects on real normal images, each with the pixel mask of exactly what changed.

``patchknn tune`` scores candidate configurations on held-out normal images of the product and on
defective versions of them made here (the product's own texture, colours and shape, so a config
is judged on this product, not on a generic test). Five kinds, drawn with sizes relative to the
image so that the same settings suit a 224 px crop and a 900 px photograph:

* ``cutpaste``: a patch of the image itself, colour-jittered, rotated (-45..45 degrees) and scaled
  (0.8..1.25), pasted elsewhere (CutPaste, Li et al. 2021): a misplaced part of the product;
* ``scratch``: a thin bright or dark polyline (1-3 segments, 15-40 % of the short side long, 0.5-1 %
  of it wide), darker on bright surfaces and brighter on dark ones;
* ``colour``: an irregular blob whose brightness (and, in a colour image, tint) changes: a stain,
  discolouration or burn;
* ``texture``: an irregular blob whose texture changes: noise, a stripe pattern or a blur;
* ``missing``: an irregular blob of the product replaced by the background's colour (the median of
  the image border) or by a shifted neighbouring region: a chip or a missing part;
* ``large`` (in :data:`TUNE_KINDS`, not in :data:`DEFECT_KINDS`): a colour, texture or missing blob
  of 5-25 % of the image: real defects reach that size (bottle's broken_large: median 12 % of the
  image; magnetic_tile's uneven and fray: 24 % and 15 %), the other kinds stay under 6 %.

Locations favour the product (pixels that differ from the border's colour) when there is one.
A defect covers :data:`MIN_AREA`..:data:`MAX_AREA` of the image (``large``: :data:`LARGE_AREA`); an
attempt outside the range (a cut-paste of a flat region changes nothing, say) is drawn again. The
mask is exactly the set of pixels whose value changed. Everything is drawn from
``numpy.random.default_rng((seed, index))``, so a defect is the same for the same image, seed and
index.

Images are uint8 arrays of any size, grayscale ``(H, W)`` or ``(H, W, 1|3|4)`` (an alpha channel
is kept), or PIL images; a colour image whose channels are equal is treated as grayscale and stays
so.

Example:
    >>> import numpy as np
    >>> img = np.random.default_rng(0).integers(90, 160, (120, 200), dtype=np.uint8)
    >>> d = add_defect(img, "scratch", seed=3)
    >>> d.image.shape, d.mask.shape, bool(((d.image != img) == d.mask).all())
    ((120, 200), (120, 200), True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from patchknn.errors import ConfigError

__all__ = [
    "DEFECT_KINDS", "LARGE_AREA", "MAX_AREA", "MIN_AREA", "TUNE_KINDS", "SyntheticDefect", "add_defect", "defect_set",
]

#: the kinds of the threshold's calibration (:mod:`patchknn.calibration_defects`) and the default set
DEFECT_KINDS: tuple[str, ...] = ("cutpaste", "scratch", "colour", "texture", "missing")
#: the kinds ``patchknn tune`` scores candidates on: the same and large blobs
TUNE_KINDS: tuple[str, ...] = (*DEFECT_KINDS, "large")
#: the smallest and largest share of the image a defect's mask covers
MIN_AREA, MAX_AREA = 0.0003, 0.06
#: the same for the ``large`` kind
LARGE_AREA = (0.03, 0.3)
_ATTEMPTS = 8


@dataclass(frozen=True)
class SyntheticDefect:
    """A defective version of an image.

    Attributes:
        image: the defective image, same shape and dtype as the input.
        mask: ``(H, W)`` bool, True exactly where a pixel changed.
        kind: one of :data:`TUNE_KINDS`.
        source: the index of the normal image it was made from (in :func:`defect_set`), else 0.
    """

    image: np.ndarray
    mask: np.ndarray
    kind: str
    source: int = 0

    @property
    def area(self) -> float:
        """The share of the image the defect covers."""
        return float(self.mask.mean())


def add_defect(image: Any, kind: str | None = None, *, seed: int = 0, index: int = 0) -> SyntheticDefect:
    """One synthetic defect on ``image`` (a uint8 array or a PIL image).

    Args:
        image: the normal image.
        kind: one of :data:`TUNE_KINDS`; ``None`` = drawn at random from :data:`DEFECT_KINDS`.
        seed, index: the defect is drawn from ``default_rng((seed, index))``.
    """
    arr = _as_array(image)
    rng = np.random.default_rng((int(seed), int(index)))
    if kind is None:
        kind = str(rng.choice(DEFECT_KINDS))
    if kind not in _KINDS:
        raise ConfigError(f"unknown defect kind {kind!r}; choose from {TUNE_KINDS}")
    low, high = LARGE_AREA if kind == "large" else (MIN_AREA, MAX_AREA)
    work, restore = _working_copy(arr)
    h, w = work.shape[:2]
    out, mask = work, np.zeros((h, w), dtype=bool)
    for attempt in range(_ATTEMPTS):
        # the last attempt is a colour change: it always changes its blob (the shift moves away
        # from the clipped end), so every image gets a defect of a size in range
        draw = _KINDS[kind] if attempt < _ATTEMPTS - 1 else _FALLBACK.get(kind, _colour)
        out = np.clip(np.rint(draw(rng, work)), 0, 255)
        mask = _any_channel(out != work)
        if low <= mask.mean() <= high:
            break
    result = restore(out.astype(np.uint8))
    return SyntheticDefect(result, _any_channel((result != arr).reshape(h, w, -1)), kind)


def defect_set(
    images: Sequence[Any], per_image: int = 2, *, seed: int = 0, kinds: Sequence[str] = DEFECT_KINDS
) -> list[SyntheticDefect]:
    """``per_image`` defects on each image, the kinds taken in turn (so every kind is represented
    about equally), each from its own generator ``(seed, k)``."""
    if per_image < 1:
        raise ConfigError(f"per_image must be at least 1, got {per_image}")
    bad = [k for k in kinds if k not in _KINDS]
    if bad or not kinds:
        raise ConfigError(f"kinds must be a non-empty subset of {TUNE_KINDS}, got {list(kinds)}")
    out = []
    for i, img in enumerate(images):
        for j in range(per_image):
            n = i * per_image + j
            d = add_defect(img, kinds[n % len(kinds)], seed=seed, index=n)
            out.append(SyntheticDefect(d.image, d.mask, d.kind, source=i))
    return out


# ----------------------------------------------------------------------------------- input/output
def _as_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB", "RGBA") else image)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ConfigError(f"a defect needs a uint8 (H, W) or (H, W, 1|3|4) image, got {arr.dtype} {arr.shape}")
    if min(arr.shape[:2]) < 16:
        raise ConfigError(f"a defect needs an image of at least 16x16 pixels, got {arr.shape[:2]}")
    return arr


def _working_copy(arr: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """float32 ``(H, W, C)`` with C = 1 (grayscale) or 3, and the function that gives the result
    the input's layout back."""
    if arr.ndim == 2:
        return arr[..., None].astype(np.float32), lambda out: out[..., 0]
    colour = arr[..., :3] if arr.shape[2] >= 3 else arr
    gray = colour.shape[2] == 1 or bool((colour == colour[..., :1]).all())
    work = (colour[..., :1] if gray else colour).astype(np.float32)

    def restore(out: np.ndarray) -> np.ndarray:
        full = arr.copy()
        full[..., : colour.shape[2]] = out if not gray else np.repeat(out, colour.shape[2], axis=2)
        return full

    return work, restore


# ------------------------------------------------------------------------------------- geometry
def _background(img: np.ndarray) -> np.ndarray:
    """The median colour of the image border (the background of a centred product)."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return np.median(border, axis=0)


def _centre(rng: np.random.Generator, img: np.ndarray, margin: float) -> tuple[float, float]:
    """A defect centre: on the product (pixels far from the border colour) when it is a clear
    part of the image, else anywhere; ``margin`` pixels from the edges."""
    h, w = img.shape[:2]
    m = min(margin, h / 2 - 1, w / 2 - 1)
    bg = _background(img)
    far = np.abs(img[..., 0] - bg[0]) > 30  # any channel far from the border's colour
    for i in range(1, img.shape[2]):
        far |= np.abs(img[..., i] - bg[i]) > 30
    far[: int(m)], far[h - int(m) :], far[:, : int(m)], far[:, w - int(m) :] = False, False, False, False
    if far.mean() > 0.05 and rng.random() < 0.85:
        flat = np.flatnonzero(far)
        y, x = divmod(int(flat[int(rng.integers(len(flat)))]), w)
        return float(y), float(x)
    return float(rng.uniform(m, h - m)), float(rng.uniform(m, w - m))


def _blob(rng: np.random.Generator, shape: tuple[int, int], cy: float, cx: float, area: float) -> np.ndarray:
    """An irregular blob of about ``area`` pixels (an ellipse with a wavy rim) centred at (cy, cx)."""
    h, w = shape
    r = np.sqrt(area / np.pi)
    aspect = rng.uniform(0.5, 2.0)
    ry, rx = r * np.sqrt(aspect), r / np.sqrt(aspect)
    theta0 = rng.uniform(0, np.pi)
    phases = [(rng.uniform(0.0, 0.12), rng.uniform(0, 2 * np.pi)) for _ in range(3)]
    # the rim is at most 1.36 radii out: only the pixels within that box are computed (each
    # pixel's value is the same as over the whole image; the rest are outside)
    reach = 1.36 * float(np.hypot(rx, ry)) + 2
    y0, y1 = max(0, int(np.floor(cy - reach))), min(h, int(np.ceil(cy + reach)) + 1)
    x0, x1 = max(0, int(np.floor(cx - reach))), min(w, int(np.ceil(cx + reach)) + 1)
    blob = np.zeros((h, w), dtype=bool)
    if y0 >= y1 or x0 >= x1:
        return blob
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = y - cy, x - cx
    u = dx * np.cos(theta0) + dy * np.sin(theta0)
    v = -dx * np.sin(theta0) + dy * np.cos(theta0)
    angle = np.arctan2(v / ry, u / rx)
    rim = np.ones_like(angle)
    for k, (amp, phase) in zip((2, 3, 5), phases):
        rim += amp * np.cos(k * angle + phase)
    blob[y0:y1, x0:x1] = (u / rx) ** 2 + (v / ry) ** 2 <= rim**2
    return blob


def _blob_area(rng: np.random.Generator, img: np.ndarray) -> float:
    return float(np.exp(rng.uniform(np.log(0.003), np.log(0.025))) * img.shape[0] * img.shape[1])


def _any_channel(a: np.ndarray) -> np.ndarray:
    """``a.any(axis=2)`` of a bool ``(H, W, C)`` array, channel by channel (numpy's reduction over a
    short last axis is ~10x slower)."""
    out = a[..., 0].copy()
    for i in range(1, a.shape[2]):
        out |= a[..., i]
    return out


def _local_mean(img: np.ndarray, region: np.ndarray) -> float:
    return float(img[region].mean()) if region.any() else float(img.mean())


# ---------------------------------------------------------------------------------------- kinds
def _cutpaste(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    h, w, c = img.shape
    area = np.exp(rng.uniform(np.log(0.004), np.log(0.025))) * h * w
    aspect = rng.uniform(0.5, 2.0)
    ph = int(np.clip(np.sqrt(area * aspect), 4, h - 2))
    pw = int(np.clip(np.sqrt(area / aspect), 4, w - 2))
    fy, fx = _centre(rng, img, max(ph, pw) / 2)  # a piece of the product, not of the background
    sy, sx = int(np.clip(round(fy - ph / 2), 0, h - ph)), int(np.clip(round(fx - pw / 2), 0, w - pw))
    patch = img[sy : sy + ph, sx : sx + pw] * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15)
    angle, scale = float(rng.uniform(-45, 45)), float(rng.uniform(0.8, 1.25))
    size = (max(2, round(pw * scale)), max(2, round(ph * scale)))

    def warp(a: np.ndarray, resample: Image.Resampling) -> np.ndarray:
        im = Image.fromarray(a).resize(size, resample)
        return np.asarray(im.rotate(angle, resample=resample, expand=True), dtype=np.float32)

    alpha = warp(np.full((ph, pw), 255, dtype=np.uint8), Image.Resampling.NEAREST) > 127
    layers = [warp(np.clip(patch[..., i], 0, 255).astype(np.uint8), Image.Resampling.BILINEAR) for i in range(c)]
    warped = np.stack(layers, axis=2)
    qh, qw = alpha.shape
    cy, cx = _centre(rng, img, max(qh, qw) / 2)
    top, left = int(round(cy - qh / 2)), int(round(cx - qw / 2))
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(h, top + qh), min(w, left + qw)
    out = img.copy()
    sub = alpha[y0 - top : y1 - top, x0 - left : x1 - left]
    out[y0:y1, x0:x1][sub] = warped[y0 - top : y1 - top, x0 - left : x1 - left][sub]
    return out


def _scratch(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    h, w, _ = img.shape
    short = min(h, w)
    length = rng.uniform(0.15, 0.4) * short
    width = max(1, int(round(rng.uniform(0.005, 0.01) * short)))
    cy, cx = _centre(rng, img, 0.1 * short)
    n = int(rng.integers(1, 4))
    heading = rng.uniform(0, 2 * np.pi)
    points = [(cx, cy)]
    for _ in range(n):
        heading += rng.uniform(-0.5, 0.5)
        step = length / n
        x, y = points[-1]
        points.append((float(np.clip(x + step * np.cos(heading), 0, w - 1)),
                       float(np.clip(y + step * np.sin(heading), 0, h - 1))))
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line(points, fill=255, width=width, joint="curve")
    line = np.asarray(canvas) > 0
    delta = rng.uniform(60, 120) * (-1 if _local_mean(img, line) > 128 else 1)
    out = img.copy()
    out[line] += delta
    return out


def _colour(rng: np.random.Generator, img: np.ndarray, area: float | None = None) -> np.ndarray:
    h, w, c = img.shape
    cy, cx = _centre(rng, img, 0.1 * min(h, w))
    region = _blob(rng, (h, w), cy, cx, _blob_area(rng, img) if area is None else area)
    shift = rng.uniform(35, 80) * (-1 if _local_mean(img, region) > 128 else 1)
    tint = rng.uniform(0.75, 1.25, size=c) if c == 3 else np.ones(c)
    out = img.copy()
    out[region] = img[region] * tint + shift
    return out


def _texture(rng: np.random.Generator, img: np.ndarray, area: float | None = None) -> np.ndarray:
    h, w, c = img.shape
    cy, cx = _centre(rng, img, 0.1 * min(h, w))
    region = _blob(rng, (h, w), cy, cx, _blob_area(rng, img) if area is None else area)
    style = rng.choice(("noise", "stripes", "blur"))
    out = img.copy()
    if style == "noise":
        noise = rng.normal(0, rng.uniform(18, 40), size=(h, w, 1)).astype(np.float32)
        out[region] = img[region] + noise[region]
    elif style == "stripes":
        period, angle = rng.uniform(3, 9) * max(1.0, min(h, w) / 256), rng.uniform(0, np.pi)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        wave = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period) * rng.uniform(25, 45)
        out[region] = img[region] + wave[region][:, None]
    else:
        radius = rng.uniform(2, 5) * max(1.0, min(h, w) / 256)
        blurred = np.stack(
            [np.asarray(Image.fromarray(img[..., i].astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius)))
             for i in range(c)], axis=2,
        ).astype(np.float32)
        out[region] = blurred[region]
    return out


def _missing(rng: np.random.Generator, img: np.ndarray, area: float | None = None) -> np.ndarray:
    h, w, _ = img.shape
    cy, cx = _centre(rng, img, 0.1 * min(h, w))
    area = _blob_area(rng, img) if area is None else area
    region = _blob(rng, (h, w), cy, cx, area)
    out = img.copy()
    if rng.random() < 0.5:  # the background shows through
        fill = _background(img)[None, :] + rng.normal(0, 3, size=(int(region.sum()), 1))
        out[region] = fill
    else:  # a neighbouring region shifted over it
        r = np.sqrt(area / np.pi)
        dy, dx = (int(round(v)) for v in rng.uniform(1.2, 2.0, 2) * r * rng.choice((-1, 1), 2))
        shifted = np.roll(img, (dy, dx), axis=(0, 1))
        out[region] = shifted[region]
    return out


def _large_area(rng: np.random.Generator, img: np.ndarray) -> float:
    return float(np.exp(rng.uniform(np.log(0.05), np.log(0.25))) * img.shape[0] * img.shape[1])


def _large(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A colour, texture or missing blob of 5-25 % of the image."""
    draw = (_colour, _texture, _missing)[int(rng.integers(3))]
    return draw(rng, img, area=_large_area(rng, img))


def _large_colour(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    return _colour(rng, img, area=_large_area(rng, img))


_KINDS: dict[str, Callable[[np.random.Generator, np.ndarray], np.ndarray]] = {
    "cutpaste": _cutpaste, "scratch": _scratch, "colour": _colour, "texture": _texture, "missing": _missing,
    "large": _large,
}
#: the last attempt's draw, which always changes its blob (default: :func:`_colour`)
_FALLBACK = {"large": _large_colour}
