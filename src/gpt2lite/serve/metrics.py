"""Prometheus metrics: the scheduler's counters, read at each scrape, and the request latency histogram."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gpt2lite.serve.scheduler import Scheduler

__all__ = ["Metrics", "SchedulerMetrics"]


class SchedulerMetrics:
    """Reads the scheduler's counters at each scrape."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Any:
        s = self.scheduler.stats
        for name, value, text in (
            ("gpt2lite_requests", s.requests, "requests accepted"),
            ("gpt2lite_requests_finished", s.finished, "requests that ended by stop or length"),
            ("gpt2lite_requests_failed", s.failed, "requests that failed"),
            ("gpt2lite_requests_cancelled", s.cancelled, "requests cancelled (client gone, stop string)"),
            ("gpt2lite_generated_tokens", s.generated_tokens, "tokens generated"),
            ("gpt2lite_prompt_tokens", s.prompt_tokens, "prompt tokens prefilled"),
            ("gpt2lite_cached_prompt_tokens", s.cached_prompt_tokens, "prompt tokens served from the prefix cache"),
            ("gpt2lite_decode_steps", s.steps, "batched decode steps"),
        ):
            yield CounterMetricFamily(name, text, value=value)
        yield GaugeMetricFamily("gpt2lite_queue_depth", "requests waiting for a row", value=self.scheduler.queue_depth)
        yield GaugeMetricFamily("gpt2lite_running_batch_size", "requests decoding", value=self.scheduler.running)


class Metrics:
    """The server's registry: the scheduler's counters and ``latency``, observed per request."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(SchedulerMetrics(scheduler))
        self.latency = Histogram("gpt2lite_request_latency_seconds", "time from request to last token",
                                 registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
