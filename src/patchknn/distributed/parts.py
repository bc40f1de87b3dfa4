"""The output folder of ``score-archive``: completed Parquet parts (written atomically, so a run
can resume after any interruption), the maps beside them, and reading it all back."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patchknn.serialization import atomic_write

__all__ = ["MAPS_DIR", "PARTS_DIR", "PartStore", "map_relpath"]

PARTS_DIR = "parts"
MAPS_DIR = "maps"


def map_relpath(image: str, base: str) -> str:
    """Where an image's map goes under ``maps/``: its path under ``base`` + ``.npy``."""
    rel = os.path.relpath(image, base)
    if rel.startswith(".."):
        rel = os.path.join("_abs", image.lstrip(os.sep))
    return rel + ".npy"


class PartStore:
    """The output folder: manifest, completed parts, maps."""

    def __init__(self, output: str | os.PathLike[str]) -> None:
        self.root = Path(output)
        self.parts = self.root / PARTS_DIR
        self.maps = self.root / MAPS_DIR

    def part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []

    def clean_temporaries(self) -> None:
        if self.parts.is_dir():
            for tmp in self.parts.glob(".part-*.tmp"):
                tmp.unlink(missing_ok=True)

    def done(self) -> set[str]:
        """Images recorded in completed parts."""
        import pyarrow.parquet as pq

        out: set[str] = set()
        for f in self.part_files():
            out.update(pq.read_table(f, columns=["image"]).column("image").to_pylist())
        return out

    def next_index(self) -> int:
        numbers = [int(f.stem.split("-")[1]) for f in self.part_files() if f.stem.split("-")[1].isdigit()]
        return max(numbers, default=-1) + 1

    def write_part(self, table: Any, index: int, base: str) -> Path:
        """Write the maps of ``table`` (column ``map_npy``), then the part itself, atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if "map_npy" in table.column_names:
            blobs = table.column("map_npy").to_pylist()
            rels: list[str | None] = []
            for image, blob in zip(table.column("image").to_pylist(), blobs, strict=True):
                if blob is None:
                    rels.append(None)
                    continue
                rel = map_relpath(image, base)
                target = self.maps / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(target, blob)
                rels.append(os.path.join(MAPS_DIR, rel))
            table = table.drop_columns(["map_npy"]).append_column("map", pa.array(rels, pa.string()))
        self.parts.mkdir(parents=True, exist_ok=True)
        final = self.parts / f"part-{index:05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write(final, buf.getvalue())
        return final

    def read_all(self, columns: Sequence[str] | None = None) -> Any:
        """All completed rows as one ``pyarrow.Table``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(f, columns=list(columns) if columns else None) for f in self.part_files()]
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="default")
