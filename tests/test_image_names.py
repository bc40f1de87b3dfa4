"""One rule for which file names are images (data.is_image_name), used by every folder listing:
the datasets (list_images), the hot folder (patchknn watch) and the server's camera folders."""

from __future__ import annotations

import sys

import pytest

from patchknn.data import IMAGE_EXTENSIONS, is_image_name, list_images


@pytest.mark.parametrize(
    "name, expected",
    [
        ("000.png", True),
        ("IMG_1.JPG", True),
        ("scan.tiff", True),
        ("a.b.webp", True),
        (".DS_Store", False),
        ("._000.png", False),  # macOS resource fork
        (".hidden.png", False),
        ("notes.txt", False),
        ("png", False),
        ("a/b.png", False),
        ("a\\b.png", False),
        ("a\x00.png", False),
        ("", False),
    ],
)
def test_is_image_name(name, expected):
    assert is_image_name(name) is expected


def test_every_extension_counts_in_any_case():
    for ext in IMAGE_EXTENSIONS:
        assert is_image_name("x" + ext) and is_image_name("x" + ext.upper())


def test_folder_listings_agree(tmp_path):
    pytest.importorskip("fastapi")
    from patchknn.server.station import list_watch_folder

    names = ["a.png", "B.JPG", "c.tiff", ".hidden.png", "._a.png", "notes.txt", "d.PnG"]
    if sys.platform != "win32":
        names.append("back\\slash.png")
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()  # a folder, whatever its name
    expected = sorted(n for n in names if is_image_name(n))
    assert expected == ["B.JPG", "a.png", "c.tiff", "d.PnG"]
    assert [p.name for p in list_images(tmp_path)] == expected
    assert sorted(f["name"] for f in list_watch_folder(tmp_path, 100)) == expected
