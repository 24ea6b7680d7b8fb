"""Counters, gauges and histograms written in the Prometheus text exposition format (version 0.0.4).

Small and dependency-free on purpose: a server needs a handful of series, not a client library.
All updates take a lock, so the event loop and worker threads may record concurrently.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _number(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()):
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help_text, label_names=()):
        super().__init__(name, help_text, label_names)
        self._values: dict[tuple[str, ...], float] = {} if label_names else {(): 0}

    def inc(self, amount: float = 1, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = tuple(str(labels[n]) for n in self.label_names)
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        key = tuple(str(labels[n]) for n in self.label_names)
        with self._lock:
            return self._values.get(key, 0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name, help_text):
        super().__init__(name, help_text)
        self._value: float = 0

    def set(self, value: float) -> None:
        with self._lock:
            self._value = value

    def add(self, amount: float) -> None:
        with self._lock:
            self._value += amount

    def value(self) -> float:
        with self._lock:
            return self._value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(self.value())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help_text, buckets: Iterable[float]):
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # last: above every bucket (+Inf only)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float, times: int = 1) -> None:
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self._counts[index] += times
            self._sum += value * times
            self._count += times

    def observe_many(self, values: Iterable[float]) -> None:
        for value in values:
            self.observe(value)

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def render(self) -> list[str]:
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        lines = self.header()
        cumulative = 0
        for bound, n in zip(self.buckets, counts, strict=False):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {count}')
        lines.append(f"{self.name}_sum {_number(total)}")
        lines.append(f"{self.name}_count {count}")
        return lines


class ServerMetrics:
    """Every series the server exposes on ``GET /metrics``."""

    def __init__(self, num_layers: int):
        p = "consistentee"
        self.requests = Counter(f"{p}_requests_total", "HTTP requests by path and status code (499: the client "
                                "disconnected first).", ("path", "status"))
        self.client_disconnects = Counter(f"{p}_client_disconnects_total",
                                          "Requests whose client disconnected before the answer (not server errors).")
        self.latency = Histogram(f"{p}_request_latency_seconds", "Time from request received to response sent.",
                                 LATENCY_BUCKETS)
        self.exit_layer = Histogram(f"{p}_exit_layer", "Layer (1-based) each prediction exited at.",
                                    range(1, num_layers + 1))
        self.predictions = Counter(f"{p}_predictions_total", "Texts predicted.")
        self.batches = Counter(f"{p}_batches_total", "Micro-batches handed to the model (one worker call each).")
        self.engine_calls = Counter(f"{p}_engine_calls_total", "Early-exit engine calls (padded batches run).")
        self.batch_items = Histogram(f"{p}_batch_items", "Texts per micro-batch.", BATCH_BUCKETS)
        self.batch_seconds = Histogram(f"{p}_batch_seconds", "Model time per micro-batch.", LATENCY_BUCKETS)
        self.queue_items = Gauge(f"{p}_queue_items", "Texts waiting for the model.")
        self.in_flight = Gauge(f"{p}_requests_in_flight", "Requests being handled now.")

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.client_disconnects, self.latency, self.exit_layer, self.predictions, self.batches,
                       self.engine_calls, self.batch_items, self.batch_seconds, self.queue_items, self.in_flight):
            lines += metric.render()
        return "\n".join(lines) + "\n"
