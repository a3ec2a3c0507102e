"""Prometheus metrics of the server (names prefixed rwkvx_), in a registry of its own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


class Metrics:
    """What the routes and the engine report; exposition() renders Prometheus' text format."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rwkvx_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("rwkvx_prompt_tokens", "prompt tokens fed to the model", registry=r)
        self.cached_tokens = Counter("rwkvx_cached_prompt_tokens", "prompt tokens resumed from the state cache",
                                     registry=r)
        self.generated_tokens = Counter("rwkvx_generated_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("rwkvx_queue_depth", "requests waiting for a slot", registry=r)
        self.active = Gauge("rwkvx_active_sequences", "sequences being generated", registry=r)
        self.cache_bytes = Gauge("rwkvx_state_cache_bytes", "memory held by the state cache", registry=r)
        self.cache_entries = Gauge("rwkvx_state_cache_entries", "states in the state cache", registry=r)
        self.batch_size = Histogram("rwkvx_batch_size", "sequences per engine step", registry=r,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
        self.step_seconds = Histogram("rwkvx_step_seconds", "time of one engine step", registry=r,
                                      buckets=_LATENCY_BUCKETS)
        self.ttft = Histogram("rwkvx_time_to_first_token_seconds", "from arrival to the first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("rwkvx_time_per_output_token_seconds", "between a sequence's tokens", registry=r,
                              buckets=_LATENCY_BUCKETS)

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def engine_state(self, waiting: int, active: int, cache_bytes: int = 0, cache_entries: int = 0) -> None:
        self.queue_depth.set(waiting)
        self.active.set(active)
        self.cache_bytes.set(cache_bytes)
        self.cache_entries.set(cache_entries)

    def step(self, n_sequences: int, n_tokens: int, seconds: float) -> None:
        self.batch_size.observe(n_sequences)
        self.step_seconds.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.tpot.observe(seconds)

    def finished(self, prompt: int, cached: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt - cached)
        self.cached_tokens.inc(cached)
        self.generated_tokens.inc(generated)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
