"""Prometheus metrics for GET /metrics, rendered in the text exposition format (version 0.0.4).

A small own implementation (counters, gauges, histograms with labels) instead of
prometheus-client: it is all this service needs, and one `Metrics` object per app keeps two apps
in one process (tests) from sharing counts through a global registry. The app creates it (or
takes the one given to `create_app`) and routes receive it by dependency injection as `metrics`;
the engine client can be handed the same object to report batch size, queue depth and time to
first token. Updates are thread-safe: the engine thread may record while the loop renders.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

LabelValues = tuple[str, ...]
M = TypeVar("M", bound="_Metric")

# Seconds; covers a CPU-backend test model (slow) to a GPU prefix-cache hit (fast).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Label values come from closed sets: anyone can send `FOO /x`, and a label set per made-up
# method would grow /metrics without bound.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """The `method` label of an HTTP request: its method if standard, else "other"."""
    return method if method in HTTP_METHODS else "other"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A count that only goes up (requests, tokens); name it `..._total`."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name} is a counter: it cannot go down by {amount}")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        lines = self._header()
        lines += [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]
        return lines


class Gauge(_Metric):
    """A value that goes up and down (batch size, queue depth); or read from a function."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[LabelValues, float] = {} if labelnames else {(): 0.0}
        self._function: Callable[[], float] | None = None

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def set_function(self, fn: Callable[[], float]) -> None:
        """Read the (unlabelled) value from `fn()` at each scrape instead of storing it."""
        self._function = fn

    def value(self, **labels: str) -> float:
        if self._function is not None:
            return float(self._function())
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        items: list[tuple[LabelValues, float]]
        if self._function is not None:
            items = [((), float(self._function()))]
        else:
            with self._lock:
                items = sorted(self._values.items())
        lines = self._header()
        lines += [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]
        return lines


class Histogram(_Metric):
    """Observations counted into cumulative buckets, plus their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        # per label set: [count per bucket (not cumulative)..., sum]
        self._values: dict[LabelValues, list[float]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        index = next(i for i, bound in enumerate(self.buckets) if value <= bound)
        with self._lock:
            row = self._values.setdefault(key, [0.0] * (len(self.buckets) + 1))
            row[index] += 1
            row[-1] += value

    def count(self, **labels: str) -> int:
        with self._lock:
            row = self._values.get(self._key(labels))
            return int(sum(row[:-1])) if row else 0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._values.items())
        lines = self._header()
        for key, row in items:
            cumulative = 0.0
            for bound, n in zip(self.buckets, row[:-1], strict=True):
                cumulative += n
                le = f'le="{_number(bound)}"'
                lines.append(
                    f"{self.name}_bucket{_labels(self.labelnames, key, le)} {_number(cumulative)}"
                )
            labels = _labels(self.labelnames, key)
            lines.append(f"{self.name}_sum{labels} {_number(row[-1])}")
            lines.append(f"{self.name}_count{labels} {_number(cumulative)}")
        return lines


class Metrics:
    """The service's metrics; `render()` is the body of GET /metrics."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []
        self.http_requests = self.counter(
            "loraforge_http_requests_total",
            "HTTP requests answered, by method, route template and status code.",
            ("method", "route", "status"),
        )
        self.http_request_duration = self.histogram(
            "loraforge_http_request_duration_seconds",
            "Time from request to the end of the response (whole stream for SSE).",
            ("method", "route"),
        )
        self.prompt_tokens = self.counter(
            "loraforge_prompt_tokens_total", "Prompt tokens processed, by model.", ("model",)
        )
        self.generation_tokens = self.counter(
            "loraforge_generation_tokens_total", "Tokens generated, by model.", ("model",)
        )
        self.running_requests = self.gauge(
            "loraforge_num_requests_running", "Sequences in the running batch."
        )
        self.waiting_requests = self.gauge(
            "loraforge_num_requests_waiting", "Requests queued for a batch slot."
        )
        self.time_to_first_token = self.histogram(
            "loraforge_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first token.",
        )

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help, labelnames))

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return self._add(Histogram(name, help, labelnames, buckets))

    def _add(self, metric: M) -> M:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} is already registered: reuse that object")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics:
            lines += metric.render()
        return "\n".join(lines) + "\n"
