"""Prometheus metrics of ``kvcompile serve``: a registry of its own (nothing global), read from
the scheduler at scrape time, plus the server's counters of finished and refused requests.

Series (all prefixed ``kvcompile_``):

- ``slots``, ``slots_active``, ``slots_free``, ``prefilling``, ``queue_length``: gauges of the pool
  and the scheduler's queue;
- ``kv_bytes`` (all slots) and ``kv_bytes_per_slot``: the KV memory the pool allocated once;
- ``max_context_tokens``: tokens one slot holds;
- ``generation_tokens_per_second``: generated tokens over the last 10 s;
- ``prompt_tokens_total``, ``generated_tokens_total``: counters since start;
- ``requests_total{finish_reason}``: finished requests (stop, length, cancelled, error);
- ``requests_refused_total{status}``: requests answered with an error status.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvcompile.runtime.scheduler import FINISH_REASONS, Scheduler

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _SchedulerCollector(Collector):
    """Gauges and counters taken from one :meth:`Scheduler.stats` call per scrape."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.scheduler.stats()
        gauges = (
            ("kvcompile_slots", "Cache slots allocated (concurrent sequences)", stats.slots),
            ("kvcompile_slots_active", "Slots holding a decoding request", stats.active),
            ("kvcompile_slots_free", "Slots neither decoding nor being prefilled", stats.free),
            ("kvcompile_prefilling", "Requests whose prompt is being prefilled", stats.prefilling),
            ("kvcompile_queue_length", "Requests waiting for a slot", stats.queued),
            ("kvcompile_kv_bytes", "KV cache bytes of all slots (allocated once)", stats.kv_bytes),
            ("kvcompile_kv_bytes_per_slot", "KV cache bytes of one slot", stats.bytes_per_slot),
            ("kvcompile_max_context_tokens", "Tokens one slot holds (prompt plus answer)",
             stats.max_context),
            ("kvcompile_generation_tokens_per_second",
             "Generated tokens per second over the last 10 s", stats.tokens_per_s),
        )
        for name, help_text, value in gauges:
            yield GaugeMetricFamily(name, help_text, value=value)
        yield CounterMetricFamily("kvcompile_prompt_tokens", "Prompt tokens prefilled",
                                  value=stats.prompt_tokens)
        yield CounterMetricFamily("kvcompile_generated_tokens", "Tokens generated",
                                  value=stats.generated_tokens)


class ServerMetrics:
    """The server's registry: scheduler state plus request outcomes."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_SchedulerCollector(scheduler))
        self.finished = Counter("kvcompile_requests", "Finished requests by finish reason",
                                ["finish_reason"], registry=self.registry)
        for reason in FINISH_REASONS:
            self.finished.labels(reason)  # every reason is exported from the start, at 0
        self.refused = Counter("kvcompile_requests_refused",
                               "Requests answered with an error status", ["status"],
                               registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
