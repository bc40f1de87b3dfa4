"""The server's Prometheus metrics, kept and rendered by prometheus-client (one registry per app).

Label values are bounded (route templates, status codes, error codes, model names that exist), so
a client cannot grow the metric set by sending odd paths.

Exported series:

* ``patchknn_requests_total{route, method, status}``: requests answered.
* ``patchknn_request_duration_seconds{route}``: histogram of the time to answer.
* ``patchknn_errors_total{code}``: error answers by error code (``unauthorized``, ``server_busy``, ...).
* ``patchknn_predictions_total{model, verdict}``: images scored (verdict ``OK``, ``NG`` or ``none``).
* ``patchknn_inference_seconds{model}``: histogram of one backbone + search call (one batch).
* ``patchknn_batch_size{model}``: histogram of images per backbone call.
* ``patchknn_model_info{model, version, backbone}``: constant 1, one per served model (a new
  version replaces its model's series).
* gauges read at each scrape (:meth:`Metrics.gauge`): admission control, readiness, memory budget,
  model swaps.

Example:
    >>> m = Metrics()
    >>> m.observe_request("/healthz", "GET", 200, 0.001)
    >>> 'patchknn_requests_total{method="GET",route="/healthz",status="200"} 1.0' in m.render()
    True
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["BATCH_BUCKETS", "CONTENT_TYPE", "LATENCY_BUCKETS", "Metrics"]

disable_created_metrics()  # no *_created series: the counters' start time is not worth a series each
CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)


class _ReadGauges(Collector):
    """Gauges whose values are read by calling a function at each scrape; a function that fails
    gives NaN (a scrape never fails because of one gauge)."""

    def __init__(self) -> None:
        self.reads: dict[str, tuple[str, Callable[[], float]]] = {}

    def collect(self) -> Iterator[Metric]:
        for name, (help_text, read) in list(self.reads.items()):
            try:
                value = float(read())
            except Exception:  # noqa: BLE001
                value = math.nan
            yield GaugeMetricFamily(name, help_text, value=value)


class Metrics:
    """The server's metrics (thread-safe: prometheus-client's metrics are)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._requests = Counter(
            "patchknn_requests", "HTTP requests answered.", ("route", "method", "status"), registry=reg
        )
        self._durations = Histogram(
            "patchknn_request_duration_seconds", "Time to answer an HTTP request.", ("route",),
            buckets=LATENCY_BUCKETS, registry=reg,
        )
        self._errors = Counter("patchknn_errors", "Error answers, by error code.", ("code",), registry=reg)
        self._predictions = Counter(
            "patchknn_predictions", "Images scored, by verdict.", ("model", "verdict"), registry=reg
        )
        self._inference = Histogram(
            "patchknn_inference_seconds", "Time of one batched backbone + search call.", ("model",),
            buckets=LATENCY_BUCKETS, registry=reg,
        )
        self._batches = Histogram(
            "patchknn_batch_size", "Images per backbone call.", ("model",), buckets=BATCH_BUCKETS, registry=reg
        )
        self._info = Gauge(
            "patchknn_model_info", "A served model (constant 1).", ("model", "version", "backbone"), registry=reg
        )
        self._info_labels: dict[str, tuple[str, str, str]] = {}
        self._info_lock = threading.Lock()
        self._gauges = _ReadGauges()
        reg.register(self._gauges)

    # ------------------------------------------------------------------------------- recording
    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self._requests.labels(route=route, method=method, status=str(status)).inc()
        self._durations.labels(route=route).observe(seconds)

    def count_error(self, code: str) -> None:
        self._errors.labels(code=code).inc()

    def count_prediction(self, model: str, verdict: str | None) -> None:
        self._predictions.labels(model=model, verdict=verdict or "none").inc()

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self._batches.labels(model=model).observe(size)
        self._inference.labels(model=model).observe(seconds)

    def add_model_info(self, model: str, version: str, backbone: str) -> None:
        """Set the info series of ``model`` (a new version replaces the one before)."""
        with self._info_lock:
            old = self._info_labels.pop(model, None)
            if old is not None:
                self._info.remove(*old)
            self._info_labels[model] = (model, version, backbone)
            self._info.labels(model=model, version=version, backbone=backbone).set(1)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Register a gauge whose value is read (by calling ``read``) at each scrape."""
        self._gauges.reads[name] = (help_text, read)

    # ------------------------------------------------------------------------------- reading
    def counter_value(self, name: str, **labels: str) -> float:
        """Sum of a counter over the series matching ``labels`` (for tests and the load script)."""
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def render(self) -> str:
        """The exposition text (Prometheus' text format)."""
        return generate_latest(self.registry).decode()
