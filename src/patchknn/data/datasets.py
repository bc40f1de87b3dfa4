"""Files and folders of images, and the MVTec AD layout of a category."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from patchknn.data.decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, read_image_size
from patchknn.errors import DatasetError


# -------------------------------------------------------------------------------------------------
# folders
# -------------------------------------------------------------------------------------------------
def is_image_name(name: str) -> bool:
    """Whether ``name`` is the plain file name of an image: not hidden (no leading ``.``, e.g.
    ``.DS_Store``, ``._x.png``), no path separator (``/``, ``\\``) or NUL, and a suffix in
    :data:`IMAGE_EXTENSIONS` (any case). The one rule of every folder listing (datasets, the hot
    folder, the server's camera folders).

    Example:
        >>> is_image_name("000.PNG"), is_image_name("._000.png"), is_image_name("a/b.png")
        (True, False, False)
    """
    return (
        not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
    )


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (hidden files and other suffixes ignored), sorted."""
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise DatasetError(f"cannot list {folder}: {exc.strerror or exc}") from None
    return sorted(folder / e.name for e in entries if is_image_name(e.name) and e.is_file())


def list_images(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """Image files in a folder of user data, sorted by path.

    Only files whose suffix is in :data:`IMAGE_EXTENSIONS` count; hidden files and folders (names
    starting with ``.``, e.g. ``.DS_Store``, ``._x.png``) are skipped.

    Args:
        folder: the folder.
        recursive: also look in subfolders (results sorted by path relative to ``folder``).

    Raises:
        DatasetError: the folder does not exist, is not a folder, or holds no image.

    Example:
        >>> list_images("data/good")  # doctest: +SKIP
        [PosixPath('data/good/000.png'), PosixPath('data/good/001.png')]
    """
    root = Path(folder)
    if not root.exists():
        raise DatasetError(f"folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"not a folder: {root}")
    if not recursive:
        found = _images_in(root)
    else:
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found.extend(Path(dirpath) / f for f in filenames if is_image_name(f))
        found.sort(key=lambda p: p.relative_to(root).parts)
    if not found:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        where = " (searched recursively)" if recursive else ""
        raise DatasetError(f"no images ({exts}) in folder {root}{where}")
    return found


def expand_inputs(items: Iterable[str | os.PathLike[str]], recursive: bool = False) -> list[Path]:
    """Expand command-line inputs (files and folders, mixed) into a list of image files.

    Files are kept as given, in order, whatever their suffix (a file named explicitly is meant to be
    read; :func:`load_image` reports it if it is not an image). Folders are replaced by
    :func:`list_images` of the folder.

    Raises:
        DatasetError: no inputs, a path that does not exist, or a folder without images.

    Example:
        >>> expand_inputs(["a.png", "more_images/"])  # doctest: +SKIP
        [PosixPath('a.png'), PosixPath('more_images/000.png'), PosixPath('more_images/001.png')]
    """
    if isinstance(items, str | os.PathLike):
        items = [items]
    out: list[Path] = []
    seen_any = False
    for item in items:
        seen_any = True
        path = Path(item)
        if path.is_dir():
            out.extend(list_images(path, recursive=recursive))
        elif path.exists():
            out.append(path)
        else:
            raise DatasetError(f"input not found: {path}")
    if not seen_any:
        raise DatasetError("no inputs given")
    return out


# -------------------------------------------------------------------------------------------------
# MVTec layout
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One test image of an MVTec-layout category.

    Attributes:
        path: the image file.
        label: 0 = good (defect-free), 1 = defective.
        defect: the defect folder name (``"good"`` for good images).
        mask_path: the ground-truth mask of a defective image; ``None`` for good ones.
    """

    path: Path
    label: int
    defect: str
    mask_path: Path | None


GOOD = "good"


def list_categories(root: str | os.PathLike[str]) -> list[str]:
    """Names of the subfolders of ``root`` that look like MVTec categories (they have ``train/good``).

    Raises:
        DatasetError: ``root`` does not exist or is not a folder.

    Example:
        >>> list_categories("/data/mvtec")  # doctest: +SKIP
        ['bottle', 'cable', 'capsule']
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"dataset root not found or not a folder: {base}")
    names = (e.name for e in os.scandir(base) if not e.name.startswith("."))
    return sorted(n for n in names if (base / n / "train" / GOOD).is_dir())


class MVTecCategory:
    """One category of a dataset in the MVTec AD layout.

    Layout (any category name, any defect folder names)::

        <root>/<category>/train/good/*.png
        <root>/<category>/test/good/*.png
        <root>/<category>/test/<defect>/*.png
        <root>/<category>/ground_truth/<defect>/<stem>_mask.png

    Files that are not images (``.DS_Store``, ``readme.txt``, ...) and hidden files are ignored.
    Nothing is read at construction; :meth:`validate` checks the whole layout up front.

    Example:
        >>> cat = MVTecCategory("/data/mvtec", "bottle")  # doctest: +SKIP
        >>> cat.validate(); len(cat.train_paths()), len(cat.test_samples())  # doctest: +SKIP
        (209, 83)
    """

    def __init__(self, root: str | os.PathLike[str], category: str) -> None:
        self.root = Path(root)
        self.category = str(category)

    def __repr__(self) -> str:
        return f"MVTecCategory(root={str(self.root)!r}, category={self.category!r})"

    @property
    def path(self) -> Path:
        """The category folder, ``<root>/<category>``."""
        return self.root / self.category

    @property
    def train_dir(self) -> Path:
        """``<category>/train/good``, the defect-free training images."""
        return self.path / "train" / GOOD

    @property
    def test_dir(self) -> Path:
        """``<category>/test``, one subfolder per defect type plus ``good``."""
        return self.path / "test"

    @property
    def ground_truth_dir(self) -> Path:
        """``<category>/ground_truth``, one subfolder of masks per defect type."""
        return self.path / "ground_truth"

    def _check_category(self) -> None:
        if self.path.is_dir():
            return
        if not self.root.is_dir():
            raise DatasetError(f"dataset root not found or not a folder: {self.root}")
        available = list_categories(self.root)
        listed = ", ".join(available) if available else "none (a category folder contains train/good/)"
        raise DatasetError(
            f"category {self.category!r} not found under {self.root}; available categories: {listed}"
        )

    def train_paths(self) -> list[Path]:
        """The defect-free training images, ``train/good/*``, sorted.

        Raises:
            DatasetError: the category or ``train/good`` is missing, or holds no image.
        """
        self._check_category()
        if not self.train_dir.is_dir():
            raise DatasetError(f"training folder not found: {self.train_dir} (expected MVTec layout)")
        paths = _images_in(self.train_dir)
        if not paths:
            raise DatasetError(f"no training images in {self.train_dir}")
        return paths

    def defects(self) -> list[str]:
        """Names of the defect folders under ``test/`` (every subfolder except ``good``), sorted."""
        return [d for d in self._test_folders() if d != GOOD]

    def _test_folders(self) -> list[str]:
        self._check_category()
        if not self.test_dir.is_dir():
            raise DatasetError(f"test folder not found: {self.test_dir} (expected MVTec layout)")
        return sorted(e.name for e in os.scandir(self.test_dir) if e.is_dir() and not e.name.startswith("."))

    def mask_path_for(self, image: Path, defect: str) -> Path:
        """Where the mask of a defective test image is expected: ``ground_truth/<defect>/<stem>_mask.png``.

        If that file is absent but a ``<stem>_mask`` file with another image suffix exists, that one
        is returned; otherwise the expected ``.png`` path (which does not exist) is.
        """
        folder = self.ground_truth_dir / defect
        expected = folder / f"{image.stem}_mask.png"
        if expected.is_file() or not folder.is_dir():
            return expected
        for ext in sorted(IMAGE_EXTENSIONS):
            for candidate in (folder / f"{image.stem}_mask{ext}", folder / f"{image.stem}_mask{ext.upper()}"):
                if candidate.is_file():
                    return candidate
        return expected

    def _collect_test(self) -> tuple[list[Sample], list[str]]:
        samples: list[Sample] = []
        missing: list[str] = []
        for defect in self._test_folders():
            for image in _images_in(self.test_dir / defect):
                if defect == GOOD:
                    samples.append(Sample(image, 0, defect, None))
                    continue
                mask = self.mask_path_for(image, defect)
                if not mask.is_file():
                    missing.append(f"test image {image} has no mask; expected {mask}")
                samples.append(Sample(image, 1, defect, mask))
        return samples, missing

    def test_samples(self) -> list[Sample]:
        """All test images (``test/<defect>/*``), sorted by defect folder then file name.

        Good images have label 0 and ``mask_path=None``; the others label 1 and their mask.

        Raises:
            DatasetError: ``test`` is missing or holds no image, or a defective image has no mask.
        """
        samples, missing = self._collect_test()
        if missing:
            raise DatasetError(_join_problems(missing))
        if not samples:
            raise DatasetError(f"no test images in the subfolders of {self.test_dir}")
        return samples

    def validate(self, check_mask_sizes: bool = True, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        """Check the whole layout up front; raise one :class:`DatasetError` describing the problems.

        Checks: the category exists (otherwise lists the available ones), ``train/good`` exists and
        holds images, ``test`` exists and holds images, every defective test image has its mask, and
        (``check_mask_sizes``, headers only) every mask has the size of its image. ``max_pixels``
        is the limit of :func:`read_image_size` for those headers (use the one images are loaded with).

        Raises:
            DatasetError: the layout is not usable.
            ImageError: ``check_mask_sizes`` and an image or mask header cannot be read.
        """
        self.train_paths()
        samples, problems = self._collect_test()
        if not samples:
            raise DatasetError(f"no test images in the subfolders of {self.test_dir}")
        if check_mask_sizes and not problems:
            for s in samples:
                if s.mask_path is None:
                    continue
                image_hw = read_image_size(s.path, max_pixels=max_pixels)
                mask_hw = read_image_size(s.mask_path, max_pixels=max_pixels)
                if image_hw != mask_hw:
                    problems.append(
                        f"mask {s.mask_path} has size (H, W) = {mask_hw} "
                        f"but its image {s.path} has {image_hw}"
                    )
        if problems:
            raise DatasetError(_join_problems(problems))


def _join_problems(problems: list[str], limit: int = 10) -> str:
    if len(problems) == 1:
        return problems[0]
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} problems:\n  {shown}{more}"


def source_name(source: Any, index: int | None = None) -> str:
    """A short printable name for a source: the path for files, ``<bytes #i>``/``<array #i>`` otherwise.

    Example:
        >>> source_name("a/b.png"), source_name(b"...", 3)
        ('a/b.png', '<bytes #3>')
    """
    suffix = "" if index is None else f" #{index}"
    if isinstance(source, str | os.PathLike):
        return str(Path(source))
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<bytes{suffix}>"
    if isinstance(source, np.ndarray):
        return f"<array{suffix}>"
    if isinstance(source, Image.Image):
        return str(getattr(source, "filename", "") or f"<PIL image{suffix}>")
    return f"<{type(source).__name__}{suffix}>"


def as_sources(images: Any) -> list[Any]:
    """``fit``/``predict`` inputs as a list: a folder or path(s) expanded to image files (sorted),
    in-memory images (PIL, arrays, bytes) as given."""
    if isinstance(images, str | Path):
        return list(expand_inputs([images]))
    items = list(images)
    if items and all(isinstance(x, str | Path) for x in items):
        return list(expand_inputs(items))
    return items
