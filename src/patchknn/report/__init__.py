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

from patchknn.report.collect import ReportCollector, category_data, select_gallery
from patchknn.report.html import render, write_report
from patchknn.report.layout import ReportError

__all__ = ["ReportCollector", "ReportError", "category_data", "render", "select_gallery", "write_report"]
