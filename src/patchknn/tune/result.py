"""What ``patchknn tune`` found: the table of candidates x metrics, the choice and why.

A :class:`TuneResult` is plain data: it round-trips through JSON (:meth:`TuneResult.to_dict`,
:meth:`TuneResult.from_dict`, :meth:`TuneResult.save`, :meth:`TuneResult.load`), is stored in the
``fit_info`` of a model fitted with ``--preset auto`` (``patchknn.json`` of the model folder, so
``patchknn info MODEL`` shows it and an evaluation of the model carries it into its results row and
HTML report), and renders as a rich table, as Markdown, or in the report
(:mod:`patchknn.report.html`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from patchknn.config import PatchKNNConfig
from patchknn.errors import ConfigError
from patchknn.serialization import atomic_write

__all__ = ["OBJECTIVE", "WEIGHTS", "CandidateRow", "TuneResult", "objective"]

#: weights of the objective: pixel AUPRC on the synthetic masks, image AUROC, F1 at the
#: calibrated threshold (held-out normal vs synthetic defective images)
WEIGHTS = {"pixel_auprc": 0.5, "image_auroc": 0.25, "threshold_f1": 0.25}
OBJECTIVE = "0.5 pixel AUPRC + 0.25 image AUROC + 0.25 F1 at the calibrated threshold"


def objective(pixel_auprc: float | None, image_auroc: float | None, threshold_f1: float | None) -> float:
    """:data:`OBJECTIVE`; an undefined metric counts 0."""
    values = {"pixel_auprc": pixel_auprc, "image_auroc": image_auroc, "threshold_f1": threshold_f1}
    return round(sum(w * float(values[k] or 0.0) for k, w in WEIGHTS.items()), 6)


@dataclass
class CandidateRow:
    """One line of the table.

    Attributes:
        name: the candidate's name (a preset, or a preset + what changed).
        config: its options (:meth:`PatchKNNConfig.to_dict`).
        status: ``"scored"``, ``"skipped"`` (not reached within the budget) or ``"failed"``.
        pixel_auprc, image_auroc, threshold_f1, objective: the metrics (``None`` unless scored).
        threshold_precision, threshold_recall: precision/recall of the calibrated verdict.
        cost: relative cost estimate (1 = the paper).
        seconds: its share of fitting and scoring time.
        note: why it was skipped or failed (a scored ensemble with ``ensemble_weights="auto"``:
            the member weights its fit chose).
    """

    name: str
    config: dict[str, Any]
    status: str = "scored"
    pixel_auprc: float | None = None
    image_auroc: float | None = None
    threshold_f1: float | None = None
    threshold_precision: float | None = None
    threshold_recall: float | None = None
    objective: float | None = None
    cost: float = 1.0
    seconds: float = 0.0
    note: str = ""


@dataclass
class TuneResult:
    """The search's table, choice and reason.

    Attributes:
        rows: every candidate, in the order tried (skipped ones last).
        choice: the chosen candidate's name.
        reason: one sentence on why.
        seconds: time used.
        budget_minutes: the budget it ran under.
        seed: the seed of the split and the defects.
        n_fit, n_heldout, n_defective: images the candidates were fitted on, held-out normal
            images, and synthetic defective versions of them.
        objective: the formula (:data:`OBJECTIVE`).
    """

    rows: list[CandidateRow]
    choice: str
    reason: str
    seconds: float
    budget_minutes: float
    seed: int
    n_fit: int
    n_heldout: int
    n_defective: int
    objective: str = OBJECTIVE
    defect_kinds: list[str] = field(default_factory=list)

    @property
    def chosen(self) -> CandidateRow:
        return next(r for r in self.rows if r.name == self.choice)

    @property
    def config(self) -> PatchKNNConfig:
        """The chosen configuration."""
        return PatchKNNConfig.from_dict(self.chosen.config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneResult:
        try:
            rows = [CandidateRow(**r) for r in data["rows"]]
            result = cls(**{**data, "rows": rows})
        except (KeyError, TypeError) as e:
            raise ConfigError(f"not a tune result: {e}") from None
        if not any(r.name == result.choice for r in rows):
            raise ConfigError(f"tune result: the choice {result.choice!r} is not in its table")
        return result

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(self.to_dict(), indent=2).encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> TuneResult:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read a tune result ({e})") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------------------- rendering
    def ranked(self) -> list[CandidateRow]:
        """The rows in the table's order: best objective first, then those not scored."""
        return sorted(self.rows, key=lambda r: (r.objective is None, -(r.objective or 0.0)))

    def cells(self) -> list[list[str]]:
        """Header + one row of text per candidate (:meth:`ranked` order)."""
        head = ["", "candidate", "pixel AUPRC", "image AUROC", "F1 @ calibrated", "objective", "cost", "s", "note"]
        out = [head]
        for r in self.ranked():
            out.append([
                "*" if r.name == self.choice else "", r.name, _fmt(r.pixel_auprc), _fmt(r.image_auroc),
                _fmt(r.threshold_f1), _fmt(r.objective), f"{r.cost:.2f}", f"{r.seconds:.0f}", r.note or r.status,
            ])
        return out

    def markdown(self) -> str:
        """The table as Markdown, the choice and reason below it."""
        cells = self.cells()
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "|" + "---|" * len(cells[0]))
        return "\n".join(lines) + f"\n\nchoice: {self.choice}: {self.reason}"

    def rich_table(self) -> Any:
        """The table for the terminal (rich)."""
        from rich.table import Table

        cells = self.cells()
        table = Table(
            title=f"patchknn tune: {self.n_fit} fitted, {self.n_heldout} held-out normal + "
                  f"{self.n_defective} synthetic defective images, {self.seconds:.0f} s",
            caption=f"objective = {self.objective}",
        )
        for i, name in enumerate(cells[0]):
            table.add_column(name, justify="right" if 2 <= i <= 7 else "left")
        for row in cells[1:]:
            table.add_row(*row, style="bold green" if row[0] else None)
        return table


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
