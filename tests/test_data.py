"""Tests for patchknn.data: image loading rules, masks, folder/MVTec readers, streaming batches."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from patchknn.data import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    Batch,
    ImageDataset,
    ImageFailure,
    MVTecCategory,
    Sample,
    expand_inputs,
    iter_batches,
    list_categories,
    list_images,
    load_image,
    load_mask,
    read_image_size,
    resize_image,
    resize_mask,
    source_name,
)
from patchknn.errors import ConfigError, DatasetError, ImageError, PatchKNNError


# -------------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------------
def noisy_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(img: Image.Image, path: Path, fmt: str | None = None, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR claims ``width x height`` (CRC fixed), i.e. a tiny 'bomb'."""
    data = bytearray(encode(Image.fromarray(noisy_rgb(8, 8)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def assert_rgb(arr: np.ndarray, hw: tuple[int, int] | None = None) -> None:
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.uint8
    assert arr.ndim == 3 and arr.shape[2] == 3
    assert arr.flags.c_contiguous
    if hw is not None:
        assert arr.shape[:2] == hw


def all_entry_points(path: Path) -> list[np.ndarray]:
    """load_image through a path, str, bytes and an opened PIL image."""
    with Image.open(path) as pil:
        from_pil = load_image(pil)
    return [load_image(path), load_image(str(path)), load_image(path.read_bytes()), from_pil]


def assert_same_everywhere(path: Path) -> np.ndarray:
    results = all_entry_points(path)
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)
    return results[0]


# -------------------------------------------------------------------------------------------------
# load_image: modes and value rules
# -------------------------------------------------------------------------------------------------
def test_rgb_png_roundtrip(tmp_path: Path) -> None:
    rgb = noisy_rgb(12, 17)
    out = assert_same_everywhere(save(Image.fromarray(rgb), tmp_path / "a.png"))
    assert_rgb(out, (12, 17))
    np.testing.assert_array_equal(out, rgb)


def test_16bit_png_scaled_by_type_range_not_minmax(tmp_path: Path) -> None:
    a = np.array([[0, 255, 256, 65535], [1000, 1500, 2000, 40000]], dtype=np.uint16)
    path = save(Image.fromarray(a), tmp_path / "g16.png")
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")
    out = assert_same_everywhere(path)
    expected = (a >> 8).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))
    # A narrow value range stays narrow (no stretching to the image's own min/max).
    narrow = np.full((4, 4), 1000, dtype=np.uint16)
    narrow[0, 0] = 2000
    out = load_image(save(Image.fromarray(narrow), tmp_path / "narrow.png"))
    assert out.max() == 2000 >> 8 and out.min() == 1000 >> 8


def test_uint16_array_matches_16bit_file(tmp_path: Path) -> None:
    a = np.random.default_rng(1).integers(0, 65536, (9, 7), dtype=np.uint16)
    from_file = load_image(save(Image.fromarray(a), tmp_path / "x.png"))
    np.testing.assert_array_equal(from_file, load_image(a))
    np.testing.assert_array_equal(load_image(a.astype(">u2")), load_image(a))


def test_mode_I_is_treated_as_16_bit() -> None:
    a = np.array([[-5, 0, 300], [65535, 70000, 512]], dtype=np.int32)
    pil = Image.fromarray(a)
    assert pil.mode == "I"
    out = load_image(pil)[..., 0]
    np.testing.assert_array_equal(out, [[0, 0, 1], [255, 255, 2]])


def test_grayscale(tmp_path: Path) -> None:
    g = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    out = assert_same_everywhere(save(Image.fromarray(g), tmp_path / "g.png"))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)
    np.testing.assert_array_equal(load_image(g), out)
    np.testing.assert_array_equal(load_image(g[..., None]), out)


def test_palette_uses_its_palette_and_drops_transparency(tmp_path: Path) -> None:
    pil = Image.new("P", (4, 3))
    palette = [0, 0, 0, 200, 10, 20, 5, 250, 100] + [0] * (256 * 3 - 9)
    pil.putpalette(palette)
    pil.putdata([0, 1, 2, 1] * 3)
    pil.info["transparency"] = 1
    path = save(pil, tmp_path / "p.png", "PNG", transparency=1)
    with Image.open(path) as im:
        assert im.mode == "P"
    out = assert_same_everywhere(path)
    assert tuple(out[0, 0]) == (0, 0, 0)
    assert tuple(out[0, 1]) == (200, 10, 20)  # transparent index keeps its colour (not composited)
    assert tuple(out[0, 2]) == (5, 250, 100)
    gif = assert_same_everywhere(save(pil, tmp_path / "p.gif", "GIF"))
    assert tuple(gif[0, 2]) == (5, 250, 100)


def test_rgba_alpha_dropped_not_composited(tmp_path: Path) -> None:
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    rgba[0, 0] = (200, 100, 50, 128)
    out = assert_same_everywhere(save(Image.fromarray(rgba), tmp_path / "rgba.png"))
    assert tuple(out[1, 1]) == (10, 20, 30)
    assert tuple(out[0, 0]) == (200, 100, 50)
    np.testing.assert_array_equal(load_image(rgba), out)


def test_la_alpha_dropped(tmp_path: Path) -> None:
    la = Image.new("LA", (3, 2), (100, 0))
    out = assert_same_everywhere(save(la, tmp_path / "la.png"))
    assert (out == 100).all()


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # red in CMYK
    path = save(cmyk, tmp_path / "cmyk.jpg", "JPEG", quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        reference = np.asarray(im.convert("RGB"))
    out = assert_same_everywhere(path)
    assert_rgb(out, (8, 16))
    np.testing.assert_array_equal(out, reference)
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_bilevel_and_bool(tmp_path: Path) -> None:
    bits = np.array([[True, False], [False, True]])
    out = assert_same_everywhere(save(Image.fromarray(bits), tmp_path / "one.png"))
    np.testing.assert_array_equal(out[..., 0], [[255, 0], [0, 255]])
    np.testing.assert_array_equal(load_image(bits), out)


def test_float_rules() -> None:
    a = np.array([[0.0, 0.5, 1.0], [1.5, -0.2, 0.25]], dtype=np.float64)
    out = load_image(a)[..., 0]
    np.testing.assert_array_equal(out, [[0, 128, 255], [255, 0, 64]])
    np.testing.assert_array_equal(load_image(a.astype(np.float32)), load_image(a))
    np.testing.assert_array_equal(load_image(a.astype(np.float16)), load_image(a))
    np.testing.assert_array_equal(load_image(Image.fromarray(a.astype(np.float32))), load_image(a))
    for bad in (np.nan, np.inf, -np.inf):
        b = a.copy()
        b[1, 1] = bad
        with pytest.raises(ImageError, match="NaN or infinite"):
            load_image(b)


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros((4, 4), np.int32),
        np.zeros((4, 4, 3), np.int8),
        np.zeros((4, 4), np.int64),
        np.zeros((4, 4), np.complex64),
        np.zeros((4, 4), object),
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((3, 4, 4, 3), np.uint8),
        np.zeros((4,), np.uint8),
        np.zeros((3, 8, 8), np.uint8),
        np.zeros((0, 5, 3), np.uint8),
        np.zeros((5, 0), np.uint8),
    ],
    ids=lambda a: f"{a.dtype}{a.shape}",
)
def test_bad_arrays(arr: np.ndarray) -> None:
    with pytest.raises(ImageError):
        load_image(arr)


def test_array_channels_and_no_aliasing() -> None:
    rgb = noisy_rgb(5, 6)
    out = load_image(rgb)
    np.testing.assert_array_equal(out, rgb)
    out[0, 0] = 7
    assert not np.shares_memory(out, rgb)
    rgba = np.concatenate([rgb, np.zeros((5, 6, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(load_image(rgba), rgb)
    np.testing.assert_array_equal(load_image(np.asfortranarray(rgb)), rgb)
    assert load_image(rgb[:, ::2]).flags.c_contiguous


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = (255, 0, 0)  # left half red
    img[:, 20:] = (0, 0, 255)  # right half blue
    pil = Image.fromarray(img)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = save(pil, tmp_path / "rot.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    out = assert_same_everywhere(path)
    assert out.shape == (40, 20, 3)
    top, bottom = out[:18].reshape(-1, 3).mean(0), out[22:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60  # left became top
    assert bottom[2] > 200 and bottom[0] < 60
    assert read_image_size(path) == (40, 20)


def test_non_ascii_and_space_path(tmp_path: Path) -> None:
    folder = tmp_path / "dossier données 画像"
    path = save(Image.fromarray(noisy_rgb(6, 5)), folder / "ïmage ü 1.PNG")
    assert_rgb(load_image(path), (6, 5))
    assert_rgb(load_image(str(path)), (6, 5))
    assert list_images(folder) == [path]
    assert load_mask(path).shape == (6, 5)


# -------------------------------------------------------------------------------------------------
# load_image: bad input
# -------------------------------------------------------------------------------------------------
def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="file not found") as info:
        load_image(tmp_path / "nope.png")
    assert "nope.png" in str(info.value) and info.value.source == str(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty") as info:
        load_image(path)
    assert "empty.png" in str(info.value)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="not a supported image format") as info:
        load_image(path)
    assert "notes.png" in str(info.value)
    with pytest.raises(ImageError):
        load_image(b"this is not an image")


def test_unsupported_formats_refused() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageError, match="not a supported image format"):
        load_image(eps)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "WEBP", "BMP"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    data = encode(Image.fromarray(noisy_rgb(64, 64)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert "cut." in str(info.value)
    with pytest.raises(ImageError):
        load_image(data[: len(data) // 2])


def test_truncated_rejected_even_if_pillow_global_relaxed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(Image.fromarray(noisy_rgb(64, 64)), "PNG")
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_corrupt_png_header_checksum() -> None:
    data = bytearray(encode(Image.fromarray(noisy_rgb(32, 32)), "PNG"))
    data[30] ^= 0xFF  # inside the IHDR CRC
    with pytest.raises(ImageError, match="corrupt"):
        load_image(bytes(data))


def test_corrupt_data_never_escapes_as_other_exception() -> None:
    data = encode(Image.fromarray(noisy_rgb(32, 32)), "PNG")
    for pos in range(33, len(data), max(1, len(data) // 40)):
        damaged = data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1 :]
        check_outcome(damaged)


def test_bomb_header_checked_before_decoding(tmp_path: Path) -> None:
    # 9000 x 9000 = 81 Mpx: over our default limit, under Pillow's own warning threshold. Only 8x8
    # pixels of data exist, so reaching the decoder would report truncation, not the pixel limit.
    assert DEFAULT_MAX_PIXELS < 81_000_000 < Image.MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_header_size(9000, 9000))
    with pytest.raises(ImageError, match="max_pixels") as info:
        load_image(path)
    assert "bomb.png" in str(info.value) and "81,000,000" in str(info.value)
    with pytest.raises(ImageError, match="max_pixels"):
        read_image_size(path)


def test_max_pixels_small_and_disabled(tmp_path: Path) -> None:
    path = save(Image.fromarray(noisy_rgb(10, 10)), tmp_path / "small.png")
    with pytest.raises(ImageError, match="over the limit of 50"):
        load_image(path, max_pixels=50)
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(noisy_rgb(10, 10), max_pixels=50)
    assert_rgb(load_image(path, max_pixels=100), (10, 10))
    assert_rgb(load_image(path, max_pixels=None), (10, 10))


def test_pillow_bomb_error_and_warning_become_image_errors(tmp_path: Path) -> None:
    # Over 2 x MAX_IMAGE_PIXELS: Pillow raises DecompressionBombError while opening.
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(png_with_header_size(20000, 20000), max_pixels=None)
    # Between 1x and 2x: Pillow only warns; that must still be an ImageError.
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(png_with_header_size(10000, 10000), max_pixels=None)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10", True])
def test_max_pixels_validated(bad: object) -> None:
    with pytest.raises(ConfigError):
        load_image(noisy_rgb(2, 2), max_pixels=bad)  # type: ignore[arg-type]


def test_unsupported_source_type() -> None:
    for bad in (5, None, [1, 2, 3], torch.zeros(3, 4, 4)):
        with pytest.raises(ImageError, match="cannot load an image"):
            load_image(bad)  # type: ignore[arg-type]


def test_zero_size_pil_image() -> None:
    with pytest.raises(ImageError, match="empty"):
        load_image(Image.new("RGB", (0, 5)))


def test_errors_are_value_errors_and_patchknn_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(PatchKNNError):
        load_image(b"junk")


# -------------------------------------------------------------------------------------------------
# load_image: property tests
# -------------------------------------------------------------------------------------------------
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV", "LAB", "I", "I;16", "F"]
FORMATS = ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM", "TGA", "ICO"]


def check_outcome(source: object, **kw: object) -> None:
    """load_image either returns a valid RGB array or raises ImageError; nothing else."""
    try:
        out = load_image(source, **kw)  # type: ignore[arg-type]
    except ImageError as exc:
        assert str(exc)
        return
    assert_rgb(out)
    assert out.shape[0] > 0 and out.shape[1] > 0


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_property_random_bytes(data: bytes) -> None:
    check_outcome(data)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM", b"II*\x00", b"GIF89a"]), st.binary()
)
def test_property_random_bytes_with_magic(magic: bytes, tail: bytes) -> None:
    check_outcome(magic + tail)


@st.composite
def encoded_images(draw: st.DrawFn) -> tuple[bytes, str, str, tuple[int, int]]:
    mode = draw(st.sampled_from(MODES))
    fmt = draw(st.sampled_from(FORMATS))
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    n_bytes = len(Image.new(mode, (w, h)).tobytes())
    seed = draw(st.integers(0, 2**32 - 1))
    raw = np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    img = Image.frombytes(mode, (w, h), raw)
    try:
        data = encode(img, fmt)
    except Exception:  # this mode can't be written in this format: use PNG of an RGB version
        data = encode(img.convert("RGB"), "PNG")
    damage = draw(st.sampled_from(["none", "cut", "flip"]))
    if damage == "cut" and len(data) > 1:
        data = data[: draw(st.integers(1, len(data) - 1))]
    elif damage == "flip":
        pos = draw(st.integers(0, len(data) - 1))
        data = data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1 :]
    return data, mode, fmt, (h, w)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoded_images())
def test_property_encoded_images(case: tuple[bytes, str, str, tuple[int, int]]) -> None:
    data, _mode, _fmt, _hw = case
    check_outcome(data)
    check_outcome(data, max_pixels=64)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(MODES), st.integers(0, 20), st.integers(0, 20), st.integers(0, 2**32 - 1))
def test_property_pil_images_in_memory(mode: str, w: int, h: int, seed: int) -> None:
    n_bytes = len(Image.new(mode, (w, h)).tobytes())
    raw = np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    img = Image.frombytes(mode, (w, h), raw) if n_bytes else Image.new(mode, (w, h))
    try:
        out = load_image(img)
    except ImageError:
        assert w == 0 or h == 0 or mode == "F"  # F: random bytes can be NaN/inf
        return
    assert_rgb(out, (h, w))


def test_entry_points_agree_across_formats(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for i, (mode, fmt) in enumerate(
        [("RGB", "PNG"), ("L", "JPEG"), ("RGBA", "WEBP"), ("P", "GIF"), ("I;16", "TIFF")]
    ):
        n_bytes = len(Image.new(mode, (9, 7)).tobytes())
        img = Image.frombytes(mode, (9, 7), rng.integers(0, 256, n_bytes, dtype=np.uint8).tobytes())
        path = save(img, tmp_path / f"f{i}.{fmt.lower()}", fmt)
        assert_same_everywhere(path)


_dtypes = st.sampled_from(
    [
        np.uint8,
        np.uint16,
        np.int8,
        np.int16,
        np.int32,
        np.float16,
        np.float32,
        np.float64,
        np.bool_,
        np.complex64,
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    _dtypes,
    st.lists(st.integers(0, 6), min_size=0, max_size=4),
    st.integers(0, 2**32 - 1),
)
def test_property_random_arrays(dtype: type, shape: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    arr = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape)
    check_outcome(arr)


# -------------------------------------------------------------------------------------------------
# resizing
# -------------------------------------------------------------------------------------------------
def test_resize_image_bilinear_like_pillow() -> None:
    img = noisy_rgb(90, 60)
    out = resize_image(img, 32)
    assert_rgb(out, (32, 32))
    ref = np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, ref)
    assert resize_image(img, (10, 20)).shape == (10, 20, 3)  # (height, width)
    same = resize_image(img, (90, 60))
    np.testing.assert_array_equal(same, img)
    assert not np.shares_memory(same, img)


def test_resize_image_constant_stays_constant() -> None:
    img = np.full((50, 70, 3), (10, 120, 240), np.uint8)
    out = resize_image(img, 224)
    assert (out == np.array([10, 120, 240], np.uint8)).all()


def test_resize_image_bad_input() -> None:
    with pytest.raises(ConfigError):
        resize_image(noisy_rgb(4, 4), 0)
    with pytest.raises(ConfigError):
        resize_image(noisy_rgb(4, 4), (4, 4, 4))  # type: ignore[arg-type]
    with pytest.raises(ImageError):
        resize_image(np.zeros((4, 4), np.uint8), 2)
    with pytest.raises(ImageError):
        resize_image(np.zeros((4, 4, 3), np.float32), 2)


def test_resize_mask_nearest() -> None:
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    out = resize_mask(mask, 8)
    assert out.dtype == np.bool_ and out.shape == (8, 8)
    assert out[:4, :4].all() and not out[4:].any() and not out[:, 4:].any()
    assert resize_mask(mask, (2, 6)).shape == (2, 6)
    np.testing.assert_array_equal(resize_mask(mask.astype(np.uint8) * 255, 4), mask)


# -------------------------------------------------------------------------------------------------
# masks
# -------------------------------------------------------------------------------------------------
def test_load_mask_binary(tmp_path: Path) -> None:
    m = np.zeros((6, 8), np.uint8)
    m[2:4, 3:6] = 255
    m[0, 0] = 1  # any value > 0 is a defect
    path = save(Image.fromarray(m), tmp_path / "m.png")
    out = load_mask(path, expected_size=(6, 8))
    assert out.dtype == np.bool_ and out.shape == (6, 8)
    np.testing.assert_array_equal(out, m > 0)


def test_load_mask_other_modes(tmp_path: Path) -> None:
    rgb = np.zeros((3, 3, 3), np.uint8)
    rgb[1, 1] = (0, 0, 9)
    np.testing.assert_array_equal(load_mask(save(Image.fromarray(rgb), tmp_path / "c.png"))[1], [0, 1, 0])
    m16 = np.zeros((3, 3), np.uint16)
    m16[0, 2] = 1  # raw value 1 of a 16-bit mask is still a defect
    assert load_mask(save(Image.fromarray(m16), tmp_path / "m16.png"))[0, 2]
    bits = np.eye(3, dtype=bool)
    np.testing.assert_array_equal(load_mask(save(Image.fromarray(bits), tmp_path / "b.png")), bits)


def test_load_mask_size_mismatch_names_both(tmp_path: Path) -> None:
    mpath = save(Image.fromarray(np.zeros((6, 8), np.uint8)), tmp_path / "000_mask.png")
    with pytest.raises(DatasetError) as info:
        load_mask(mpath, expected_size=(8, 6), image_path=tmp_path / "000.png")
    msg = str(info.value)
    assert "000_mask.png" in msg and "000.png" in msg and "(6, 8)" in msg and "(8, 6)" in msg
    with pytest.raises(DatasetError):
        load_mask(mpath, expected_size=(7, 8))


def test_load_mask_unreadable(tmp_path: Path) -> None:
    bad = tmp_path / "bad_mask.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(ImageError, match="bad_mask.png"):
        load_mask(bad)
    with pytest.raises(ImageError, match="not found"):
        load_mask(tmp_path / "missing_mask.png")


# -------------------------------------------------------------------------------------------------
# folders
# -------------------------------------------------------------------------------------------------
def tiny_png(path: Path, hw: tuple[int, int] = (8, 8), value: int = 128) -> Path:
    return save(Image.fromarray(np.full((*hw, 3), value, np.uint8)), path, "PNG")


def test_image_extensions() -> None:
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"} <= IMAGE_EXTENSIONS


def test_list_images(tmp_path: Path) -> None:
    for name in ["b.png", "a.JPG", "c.TiFF", "d.webp", "e.Jpeg", "f.bmp"]:
        tiny_png(tmp_path / name)
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    tiny_png(tmp_path / "._b.png")  # macOS resource fork, hidden
    tiny_png(tmp_path / "sub" / "z.png")
    tiny_png(tmp_path / ".hidden" / "y.png")
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.JPG", "b.png", "c.TiFF", "d.webp", "e.Jpeg", "f.bmp"]
    rec = list_images(tmp_path, recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in rec] == [*names, "sub/z.png"]


def test_list_images_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images") as info:
        list_images(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DatasetError, match="not found"):
        list_images(tmp_path / "missing")
    with pytest.raises(DatasetError, match="not a folder"):
        list_images(tmp_path / "notes.txt")


def test_expand_inputs(tmp_path: Path) -> None:
    one = tiny_png(tmp_path / "one.png")
    odd = tiny_png(tmp_path / "odd.dat")  # a file named explicitly is kept whatever its suffix
    folder = tmp_path / "more"
    a, b = tiny_png(folder / "a.png"), tiny_png(folder / "b.jpg")
    (folder / "skip.txt").write_text("x")
    assert expand_inputs([one, str(folder), odd]) == [one, a, b, odd]
    assert expand_inputs(str(one)) == [one]
    with pytest.raises(DatasetError, match="not found") as info:
        expand_inputs([one, tmp_path / "ghost.png"])
    assert "ghost.png" in str(info.value)
    with pytest.raises(DatasetError):
        expand_inputs([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        expand_inputs([tmp_path / "empty"])


# -------------------------------------------------------------------------------------------------
# MVTec layout
# -------------------------------------------------------------------------------------------------
def make_layout(
    root: Path,
    category: str = "widget",
    defects: dict[str, int] | None = None,
    n_train: int = 3,
    n_good: int = 2,
) -> Path:
    defects = {"crack": 2, "weird name": 1, "ünïcode-défaut": 1} if defects is None else defects
    cat = root / category
    for i in range(n_train):
        tiny_png(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        tiny_png(cat / "test" / "good" / f"{i:03d}.png")
    for defect, n in defects.items():
        for i in range(n):
            tiny_png(cat / "test" / defect / f"{i:03d}.png")
            mask = np.zeros((8, 8), np.uint8)
            mask[2:5, 2:5] = 255
            save(Image.fromarray(mask), cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    for folder in (cat / "train" / "good", cat / "test"):
        folder.mkdir(parents=True, exist_ok=True)
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    (cat / "test" / "readme.txt").write_text("hello")
    if "crack" in defects:
        (cat / "test" / "crack" / "Thumbs.db").write_bytes(b"\0")
    (cat / "license.txt").write_text("x")
    return cat


def test_mvtec_reader(tmp_path: Path) -> None:
    make_layout(tmp_path)
    cat = MVTecCategory(tmp_path, "widget")
    cat.validate()
    assert cat.path == tmp_path / "widget"
    assert [p.name for p in cat.train_paths()] == ["000.png", "001.png", "002.png"]
    samples = cat.test_samples()
    assert [(s.defect, s.path.name) for s in samples] == [
        ("crack", "000.png"),
        ("crack", "001.png"),
        ("good", "000.png"),
        ("good", "001.png"),
        ("weird name", "000.png"),
        ("ünïcode-défaut", "000.png"),
    ]
    assert cat.defects() == ["crack", "weird name", "ünïcode-défaut"]
    for s in samples:
        assert isinstance(s, Sample)
        if s.defect == "good":
            assert s.label == 0 and s.mask_path is None
        else:
            assert s.label == 1
            assert s.mask_path == tmp_path / "widget" / "ground_truth" / s.defect / f"{s.path.stem}_mask.png"
            assert load_mask(s.mask_path, expected_size=read_image_size(s.path)).any()


def test_mvtec_missing_mask_names_image_and_expected_path(tmp_path: Path) -> None:
    cat_dir = make_layout(tmp_path)
    (cat_dir / "ground_truth" / "crack" / "001_mask.png").unlink()
    cat = MVTecCategory(tmp_path, "widget")
    for call in (cat.validate, cat.test_samples):
        with pytest.raises(DatasetError) as info:
            call()
        msg = str(info.value)
        assert str(cat_dir / "test" / "crack" / "001.png") in msg
        assert str(cat_dir / "ground_truth" / "crack" / "001_mask.png") in msg


def test_mvtec_unknown_category_lists_available(tmp_path: Path) -> None:
    make_layout(tmp_path, "alpha")
    make_layout(tmp_path, "beta")
    (tmp_path / "not_a_category").mkdir()
    assert list_categories(tmp_path) == ["alpha", "beta"]
    with pytest.raises(DatasetError, match="available categories: alpha, beta"):
        MVTecCategory(tmp_path, "gamma").validate()
    with pytest.raises(DatasetError, match="gamma"):
        MVTecCategory(tmp_path, "gamma").train_paths()
    with pytest.raises(DatasetError, match="not found"):
        MVTecCategory(tmp_path / "nowhere", "alpha").validate()
    with pytest.raises(DatasetError):
        list_categories(tmp_path / "nowhere")


def test_mvtec_layout_problems(tmp_path: Path) -> None:
    cat_dir = make_layout(tmp_path)
    for p in (cat_dir / "train" / "good").glob("*.png"):
        p.unlink()
    with pytest.raises(DatasetError, match="no training images"):
        MVTecCategory(tmp_path, "widget").validate()

    cat_dir = make_layout(tmp_path / "r2")
    shutil.rmtree(cat_dir / "train")
    with pytest.raises(DatasetError, match="training folder not found"):
        MVTecCategory(tmp_path / "r2", "widget").validate()

    cat_dir = make_layout(tmp_path / "r3")
    shutil.rmtree(cat_dir / "test")
    with pytest.raises(DatasetError, match="test folder not found"):
        MVTecCategory(tmp_path / "r3", "widget").validate()

    cat_dir = make_layout(tmp_path / "r4", defects={}, n_good=0)
    with pytest.raises(DatasetError, match="no test images"):
        MVTecCategory(tmp_path / "r4", "widget").validate()


def test_mvtec_only_good_test_images_is_valid(tmp_path: Path) -> None:
    make_layout(tmp_path, defects={})
    cat = MVTecCategory(tmp_path, "widget")
    cat.validate()
    assert all(s.label == 0 for s in cat.test_samples())


def test_mvtec_mask_size_mismatch(tmp_path: Path) -> None:
    cat_dir = make_layout(tmp_path)
    save(Image.fromarray(np.zeros((8, 9), np.uint8)), cat_dir / "ground_truth" / "crack" / "000_mask.png")
    cat = MVTecCategory(tmp_path, "widget")
    with pytest.raises(DatasetError) as info:
        cat.validate()
    assert "000_mask.png" in str(info.value) and "(8, 9)" in str(info.value)
    cat.validate(check_mask_sizes=False)


# -------------------------------------------------------------------------------------------------
# streaming batches
# -------------------------------------------------------------------------------------------------
def constant(value: int, hw: tuple[int, int] = (10, 14)) -> np.ndarray:
    return np.full((*hw, 3), value, np.uint8)


def mixed_sources(tmp_path: Path) -> tuple[list[object], list[int]]:
    """Sources of every kind; image i is constant with value values[i]."""
    values = [10 * i + 5 for i in range(9)]
    sources: list[object] = []
    for i, v in enumerate(values):
        kind = i % 4
        if kind == 0:
            sources.append(tiny_png(tmp_path / f"img {i}.png", (10 + i, 12), v))
        elif kind == 1:
            sources.append(encode(Image.fromarray(constant(v)), "PNG"))
        elif kind == 2:
            sources.append(Image.fromarray(constant(v, (7, 5))))
        else:
            sources.append(constant(v, (3, 4)))
    return sources, values


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iter_batches_order_and_content(tmp_path: Path, num_workers: int) -> None:
    sources, values = mixed_sources(tmp_path)
    it = iter_batches(sources, 16, batch_size=4, num_workers=num_workers)
    batches = list(it)
    assert [len(b) for b in batches] == [4, 4, 1]
    assert [i for b in batches for i in b.indices] == list(range(len(sources)))
    images = torch.cat([b.images for b in batches])
    assert images.dtype == torch.uint8 and images.shape == (9, 3, 16, 16)
    for i, v in enumerate(values):
        assert (images[i] == v).all()
    sizes = [s for b in batches for s in b.sizes]
    assert sizes[0] == (10, 12) and sizes[1] == (10, 14) and sizes[2] == (7, 5) and sizes[3] == (3, 4)
    names = [s for b in batches for s in b.sources]
    assert names[0] == str(tmp_path / "img 0.png") and names[1] == "<bytes #1>" and names[3] == "<array #3>"
    assert it.errors == []
    assert all(isinstance(b, Batch) for b in batches)


def bad_sources(tmp_path: Path) -> tuple[list[object], set[int]]:
    empty = tmp_path / "zero.png"
    empty.write_bytes(b"")
    sources: list[object] = [constant(v) for v in range(0, 100, 10)]
    bad = {1: b"not an image", 4: tmp_path / "missing.png", 5: empty, 9: np.full((4, 4), np.nan)}
    for i, s in bad.items():
        sources[i] = s
    return sources, set(bad)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iter_batches_skip(tmp_path: Path, num_workers: int) -> None:
    sources, bad = bad_sources(tmp_path)
    seen: list[ImageFailure] = []
    it = iter_batches(sources, 8, batch_size=3, num_workers=num_workers, on_error="skip", on_skip=seen.append)
    batches = list(it)
    good = [i for i in range(len(sources)) if i not in bad]
    assert [i for b in batches for i in b.indices] == good
    assert [len(b) for b in batches] == [2, 1, 3]  # [0,1,2] [3,4,5] [6,7,8] [9] minus bad ones
    for b in batches:
        assert b.images.shape == (len(b), 3, 8, 8)
        for row, i in enumerate(b.indices):
            assert (b.images[row] == sources[i][0, 0, 0]).all()  # type: ignore[index]
    assert [e.index for e in it.errors] == sorted(bad)
    assert seen == it.errors
    by_index = {e.index: e for e in it.errors}
    assert by_index[4].source == str(tmp_path / "missing.png") and "not found" in by_index[4].reason
    assert by_index[5].source.endswith("zero.png") and "empty" in by_index[5].reason
    assert by_index[1].source == "<bytes #1>"
    assert "NaN" in by_index[9].reason


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iter_batches_stop(tmp_path: Path, num_workers: int) -> None:
    sources, _ = bad_sources(tmp_path)
    sources[1] = constant(10)  # first bad one is now index 4 (missing file), in the 2nd batch
    got: list[int] = []
    with pytest.raises(ImageError, match="file not found") as info:
        for batch in iter_batches(sources, 8, batch_size=3, num_workers=num_workers, on_error="stop"):
            got.extend(batch.indices)
    assert info.value.source == str(tmp_path / "missing.png")
    assert got == [0, 1, 2]


def test_iter_batches_all_bad_and_empty(tmp_path: Path) -> None:
    it = iter_batches([b"x", b"y"], 8, on_error="skip")
    assert list(it) == []
    assert [e.index for e in it.errors] == [0, 1]
    assert list(iter_batches([], 8)) == []


def test_iter_batches_close_early(tmp_path: Path) -> None:
    sources = [constant(i) for i in range(12)]
    with iter_batches(sources, 8, batch_size=2, num_workers=2) as it:
        first = next(it)
        assert first.indices == [0, 1]
    with pytest.raises(StopIteration):
        next(it)


def test_iter_batches_options_checked_up_front() -> None:
    with pytest.raises(ConfigError):
        iter_batches([constant(1)], 8, on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        iter_batches([constant(1)], 8, batch_size=0)
    with pytest.raises(ConfigError):
        iter_batches([constant(1)], 8, num_workers=-1)
    with pytest.raises(ConfigError):
        iter_batches([constant(1)], 0)
    with pytest.raises(ConfigError):
        iter_batches([constant(1)], 8, max_pixels=0)
    with pytest.raises(ConfigError):
        iter_batches("a.png", 8)  # type: ignore[arg-type]


def test_image_dataset_never_raises(tmp_path: Path) -> None:
    ds = ImageDataset([constant(200), b"junk", tmp_path / "missing.png"], (6, 4))
    assert len(ds) == 3
    ok = ds[0]
    assert ok.index == 0 and ok.error is None and ok.size == (10, 14)
    assert ok.image.shape == (3, 6, 4) and ok.image.dtype == torch.uint8 and (ok.image == 200).all()
    for i in (1, 2):
        rec = ds[i]
        assert rec.index == i and rec.error and rec.size == (0, 0)
        assert rec.image.shape == (3, 6, 4) and not rec.image.any()


def test_source_name() -> None:
    assert source_name(Path("a") / "b.png") == os.path.join("a", "b.png")
    assert source_name(b"x", 2) == "<bytes #2>"
    assert source_name(np.zeros(1), 0) == "<array #0>"
    assert source_name(Image.new("RGB", (1, 1)), 4) == "<PIL image #4>"


# -------------------------------------------------------------------------------------------------
# the real MVTec bottle category (optional)
# -------------------------------------------------------------------------------------------------
@pytest.mark.mvtec
def test_real_bottle(mvtec_root: Path) -> None:
    assert "bottle" in list_categories(mvtec_root)
    cat = MVTecCategory(mvtec_root, "bottle")
    cat.validate()
    train = cat.train_paths()
    samples = cat.test_samples()
    assert len(train) == 209
    assert len(samples) == 83
    defective = [s for s in samples if s.mask_path is not None]
    assert len(defective) == 63
    assert {s.defect for s in defective} == {"broken_large", "broken_small", "contamination"}
    assert all(s.label == 1 for s in defective) and sum(s.label == 0 for s in samples) == 20
    for s in defective:
        mask = load_mask(s.mask_path, expected_size=read_image_size(s.path), image_path=s.path)
        assert mask.any()
    first = load_image(train[0])
    assert_rgb(first, (900, 900))
    with iter_batches(train[:4], 224, batch_size=4, num_workers=2) as batches:
        batch = next(batches)
    assert batch.images.shape == (4, 3, 224, 224) and batch.sizes == [(900, 900)] * 4
