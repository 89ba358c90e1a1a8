"""Prometheus metrics (``/metrics``): requests/tokens per intervention, latency histograms, slot pool."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """All counters of one server, in their own registry (several apps may live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("steer_requests", "Generation requests by intervention set", ["intervention"], registry=r)
        self.prompt_tokens = Counter("steer_prompt_tokens", "Prompt tokens by intervention set", ["intervention"], registry=r)
        self.generation_tokens = Counter("steer_generation_tokens", "Generated tokens by intervention set",
                                         ["intervention"], registry=r)
        self.ttft = Histogram("steer_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("steer_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.errors = Counter("steer_errors", "Error responses by HTTP status", ["code"], registry=r)
        self.in_flight = Gauge("steer_requests_in_flight", "Requests being served", registry=r)
        self.slots_total = Gauge("steer_slots_total", "Device intervention slots", registry=r)
        self.slots_loaded = Gauge("steer_slots_loaded", "Slots holding an intervention", registry=r)
        self.slots_pinned = Gauge("steer_slots_pinned", "Slots pinned by in-flight requests", registry=r)
        self.slot_refcount = Gauge("steer_slot_refcount_total", "Sum of intervention refcounts", registry=r)
        self.evictions = Gauge("steer_slot_evictions", "Slot evictions since start", registry=r)
        self.load_latency = Histogram("steer_slot_load_seconds", "Latency of writing an intervention into a slot",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.registered = Gauge("steer_interventions_registered", "Registered interventions", registry=r)

    def request_started(self, labels: str) -> None:
        self.requests.labels(labels).inc()

    def request_finished(self, labels: str, prompt_tokens: int, completion_tokens: int, started: float,
                         first_token: float | None) -> None:
        self.prompt_tokens.labels(labels).inc(prompt_tokens)
        self.generation_tokens.labels(labels).inc(completion_tokens)
        if first_token is not None:
            self.ttft.observe(first_token - started)
            if completion_tokens > 1:
                self.tpot.observe((time.perf_counter() - first_token) / (completion_tokens - 1))

    def error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def render(self, registry_state, in_flight: int) -> bytes:
        occupancy = registry_state.occupancy()
        self.slots_total.set(occupancy["slots"])
        self.slots_loaded.set(occupancy["loaded"])
        self.slots_pinned.set(occupancy["pinned"])
        self.evictions.set(occupancy["evictions"])
        self.slot_refcount.set(sum(e.refcount for e in registry_state.entries.values()))
        self.registered.set(len(registry_state.entries))
        self.in_flight.set(in_flight)
        return generate_latest(self.registry)
