"""steer-serve's Prometheus metrics (``/metrics``, beside vLLM's): requests per intervention, slot pool."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _InterventionsInfo:
    """``vllm:lora_requests_info`` as vLLM exports it for LoRA adapters (labels ``max_lora``,
    ``running_lora_adapters``, ``waiting_lora_adapters``; value = the time), listing interventions and
    adapters alike: running = pinned by requests and loaded, waiting = pinned and waiting for a slot.
    So LoRA-affinity routers (Gateway API Inference Extension, llm-d) route steered requests to the
    replica that holds their intervention without knowing about interventions. vLLM's own series of
    that name is left out of ``/metrics`` (this one includes its adapters)."""

    NAME = "vllm:lora_requests_info"

    def __init__(self):
        self.registry_state = None

    def collect(self):
        family = GaugeMetricFamily(self.NAME, "Running stats on lora requests (interventions and adapters).",
                                   labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
        if self.registry_state is not None:
            pinned = [e for e in self.registry_state.entries.values() if e.refcount > 0]
            running = ",".join(sorted(e.id for e in pinned if e.loaded))
            waiting = ",".join(sorted(e.id for e in pinned if not e.loaded))
            capacity = self.registry_state.geometry.num_slots + self.registry_state.max_loras
            family.add_metric([str(capacity), waiting, running], time.time())
        yield family


class Metrics:
    """All counters of one server, in their own registry (several apps may live in one process).

    Token counts and latencies are vLLM's own (``vllm:`` metrics, served beside these)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("steer_requests", "Generation requests naming each intervention ('none': unsteered)",
                                ["intervention"], registry=r)
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
        self.info = _InterventionsInfo()
        r.register(self.info)

    def request_started(self, intervention_ids: list[str]) -> None:
        """Count one request for each intervention it names (bounded by the registry: one label per id)."""
        for intervention_id in intervention_ids:
            self.requests.labels(intervention_id).inc()

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
        self.info.registry_state = registry_state
        return generate_latest(self.registry)
