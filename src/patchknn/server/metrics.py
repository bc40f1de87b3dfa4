"""Prometheus metrics in the plain-text exposition format (version 0.0.4), written by hand.

No dependency: a handful of counters, gauges and histograms behind one lock, rendered on
``GET /metrics``. Label values are bounded (route templates, status codes, error codes, model names
that exist), so a client cannot grow the metric set by sending odd paths.

Exported series:

* ``patchknn_requests_total{route, method, status}``: requests answered.
* ``patchknn_request_duration_seconds{route}``: histogram of the time to answer.
* ``patchknn_errors_total{code}``: error answers by error code (``unauthorized``, ``server_busy``, ...).
* ``patchknn_predictions_total{model, verdict}``: images scored (verdict ``OK``, ``NG`` or ``none``).
* ``patchknn_inference_seconds{model}``: histogram of one backbone + search call (one batch).
* ``patchknn_batch_size{model}``: histogram of images per backbone call.
* ``patchknn_requests_in_progress``, ``patchknn_requests_queued``: gauges of admission control.
* ``patchknn_model_info{model, version, backbone}``: constant 1, one per served model.

Example:
    >>> m = Metrics()
    >>> m.observe_request("/healthz", "GET", 200, 0.001)
    >>> 'patchknn_requests_total{route="/healthz",method="GET",status="200"} 1' in m.render()
    True
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

__all__ = ["BATCH_BUCKETS", "CONTENT_TYPE", "LATENCY_BUCKETS", "Histogram", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)

LabelKey = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(key: LabelKey, extra: tuple[str, str] | None = None) -> str:
    items = list(key) + ([extra] if extra else [])
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


class Histogram:
    """Cumulative-bucket histogram for one label set."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # last = +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """The server's metrics; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[LabelKey, int] = defaultdict(int)
        self._durations: dict[LabelKey, Histogram] = {}
        self._errors: dict[LabelKey, int] = defaultdict(int)
        self._predictions: dict[LabelKey, int] = defaultdict(int)
        self._inference: dict[LabelKey, Histogram] = {}
        self._batches: dict[LabelKey, Histogram] = {}
        self._info: list[LabelKey] = []
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    # ------------------------------------------------------------------------------- recording
    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(("route", route), ("method", method), ("status", str(status)))] += 1
            key = (("route", route),)
            hist = self._durations.get(key)
            if hist is None:
                hist = self._durations[key] = Histogram(LATENCY_BUCKETS)
            hist.observe(seconds)

    def count_error(self, code: str) -> None:
        with self._lock:
            self._errors[(("code", code),)] += 1

    def count_prediction(self, model: str, verdict: str | None) -> None:
        with self._lock:
            self._predictions[(("model", model), ("verdict", verdict or "none"))] += 1

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        with self._lock:
            key = (("model", model),)
            if key not in self._batches:
                self._batches[key] = Histogram(BATCH_BUCKETS)
                self._inference[key] = Histogram(LATENCY_BUCKETS)
            self._batches[key].observe(size)
            self._inference[key].observe(seconds)

    def add_model_info(self, model: str, version: str, backbone: str) -> None:
        """Set the info series of ``model`` (a new version replaces the one before)."""
        with self._lock:
            self._info[:] = [key for key in self._info if key[0] != ("model", model)]
            self._info.append((("model", model), ("version", version), ("backbone", backbone)))

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Register a gauge whose value is read (by calling ``read``) at each scrape."""
        with self._lock:
            self._gauges[name] = (help_text, read)

    # ------------------------------------------------------------------------------- reading
    def counter_value(self, name: str, **labels: str) -> float:
        """Sum of a counter over the series matching ``labels`` (for tests and the load script)."""
        table = {
            "patchknn_requests_total": self._requests,
            "patchknn_errors_total": self._errors,
            "patchknn_predictions_total": self._predictions,
        }[name]
        with self._lock:
            return float(sum(v for k, v in table.items() if all((n, s) in k for n, s in labels.items())))

    def render(self) -> str:
        """The exposition text."""
        out: list[str] = []
        with self._lock:
            self._counter(out, "patchknn_requests_total", "HTTP requests answered.", self._requests)
            self._histograms(
                out, "patchknn_request_duration_seconds", "Time to answer an HTTP request.", self._durations
            )
            self._counter(out, "patchknn_errors_total", "Error answers, by error code.", self._errors)
            self._counter(out, "patchknn_predictions_total", "Images scored, by verdict.", self._predictions)
            self._histograms(
                out, "patchknn_inference_seconds", "Time of one batched backbone + search call.", self._inference
            )
            self._histograms(out, "patchknn_batch_size", "Images per backbone call.", self._batches)
            out.append("# HELP patchknn_model_info A served model (constant 1).")
            out.append("# TYPE patchknn_model_info gauge")
            out.extend(f"patchknn_model_info{_labels(key)} 1" for key in self._info)
            gauges = list(self._gauges.items())
        for name, (help_text, read) in gauges:
            try:
                value = float(read())
            except Exception:  # noqa: BLE001 - a scrape never fails because of one gauge
                value = float("nan")
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} gauge")
            out.append(f"{name} {_num(value) if not math.isnan(value) else 'NaN'}")
        return "\n".join(out) + "\n"

    @staticmethod
    def _counter(out: list[str], name: str, help_text: str, table: dict[LabelKey, int]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} counter")
        out.extend(f"{name}{_labels(key)} {value}" for key, value in sorted(table.items()))

    @staticmethod
    def _histograms(out: list[str], name: str, help_text: str, table: dict[LabelKey, Histogram]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} histogram")
        for key, hist in sorted(table.items()):
            cumulative = 0
            for bound, n in zip(hist.bounds + (math.inf,), hist.counts):
                cumulative += n
                out.append(f"{name}_bucket{_labels(key, ('le', _num(bound)))} {cumulative}")
            out.append(f"{name}_sum{_labels(key)} {_num(hist.sum)}")
            out.append(f"{name}_count{_labels(key)} {hist.count}")
