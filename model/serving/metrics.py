"""Prometheus metrics of one server, in their own registry (two apps in one process do not collide).

Request counts, latencies and time to first token are recorded by the HTTP layer as requests end; the
scheduler's state (queue depth, running batch, reserved tokens, token counters) is read at scrape time,
so the scheduler itself knows nothing of Prometheus.
"""

from __future__ import annotations

from collections.abc import Iterator

from m2rl.model.serving.scheduler import Scheduler
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _SchedulerCollector(Collector):
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s, stats = self.scheduler, self.scheduler.stats
        gauges = {
            "m2rl_serve_queue_depth": ("requests waiting for admission", s.queue_depth),
            "m2rl_serve_running_sequences": ("sequences in the running decode batch", s.batch_size),
            "m2rl_serve_max_batch": ("rows of the KV cache", s.config.max_batch),
            "m2rl_serve_reserved_tokens": ("tokens reserved by admitted sequences (prompt + max_tokens)",
                                           s.reserved_tokens),
            "m2rl_serve_token_budget": ("the admission token budget", s.config.token_budget),
            "m2rl_serve_policy_version": ("version of the served weights", s.policy_version),
            "m2rl_serve_up": ("1 while the scheduler runs", int(s.running)),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "m2rl_serve_prompt_tokens": ("prompt tokens prefilled", stats.prompt_tokens),
            "m2rl_serve_generation_tokens": ("tokens sampled", stats.generated_tokens),
            "m2rl_serve_decode_steps": ("decode steps of the running batch", stats.decode_steps),
            "m2rl_serve_prefill_batches": ("prefill batches", stats.prefill_batches),
            "m2rl_serve_requests_aborted": ("requests cancelled (client gone) or stopped early", stats.requests_aborted),
            "m2rl_serve_step_errors": ("model calls that raised", stats.step_errors),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SchedulerCollector(scheduler))
        self.requests = Counter("m2rl_serve_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("m2rl_serve_request_latency_seconds", "time from request to its last byte",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("m2rl_serve_time_to_first_token_seconds", "time from request to its first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.weight_updates = Counter("m2rl_serve_weight_updates", "weight updates by result",
                                      ["result"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
