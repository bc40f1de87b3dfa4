"""Results people can look at: an HTML report per evaluation run.

* :class:`ReportCollector` - pass it as ``evaluate(on_category=...)``; it stores per category
  what the page needs (curves, scores, calibration statistics, gallery images) under
  ``DIR/assets``; :meth:`ReportCollector.finish` writes ``DIR/results.json`` and ``DIR/index.html``.
* :func:`write_report` - (re)writes the page from a ``results.json`` and its ``assets/`` folder
  (``patchknn report RESULTS.json``).

Example:
    >>> from patchknn.evaluation import evaluate                                   # doctest: +SKIP
    >>> collector = ReportCollector("report")                                       # doctest: +SKIP
    >>> results = evaluate(root, ["bottle"], config, on_category=collector)         # doctest: +SKIP
    >>> collector.finish(results)                                                   # doctest: +SKIP
    PosixPath('report/index.html')
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from patchknn.report.layout import ReportError

if TYPE_CHECKING:  # for type checkers; at run time see __getattr__ below
    from patchknn.report.collect import ReportCollector, category_data, select_gallery
    from patchknn.report.html import render, write_report

# The page and the collector draw with matplotlib (a second to import): loaded on first use, so
# that registering `patchknn report` keeps the CLI's start light (PEP 562).
_LAZY = {"ReportCollector": "collect", "category_data": "collect", "select_gallery": "collect",
         "render": "html", "write_report": "html"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"patchknn.report.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'patchknn.report' has no attribute {name!r}")

__all__ = ["ReportCollector", "ReportError", "category_data", "render", "select_gallery", "write_report"]
