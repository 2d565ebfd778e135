"""Prometheus metrics, one registry per app (so tests can build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "piggyback_requests_total",
            "Classify requests by task and HTTP status",
            ["task", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "piggyback_request_duration_seconds",
            "End-to-end classify latency",
            ["task"],
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "piggyback_queue_wait_seconds", "Time from enqueue to batch start", buckets=_LATENCY, registry=r
        )
        self.compute_seconds = Histogram(
            "piggyback_batch_compute_seconds", "Engine time per batch", buckets=_LATENCY, registry=r
        )
        self.batch_size = Histogram("piggyback_batch_size", "Requests per batch", buckets=_SIZES, registry=r)
        self.batch_tasks = Histogram("piggyback_batch_tasks", "Distinct tasks per batch", buckets=_SIZES, registry=r)
        self.queue_depth = Gauge("piggyback_queue_depth", "Requests waiting for a batch", registry=r)
        self.tasks_loaded = Gauge("piggyback_tasks_loaded", "Tasks loaded in the engine", registry=r)
        self.mask_bytes = Gauge(
            "piggyback_mask_resident_bytes",
            "Device bytes of packed masks, heads and BN of all tasks",
            registry=r,
        )
        self.registrations = Counter(
            "piggyback_task_registrations_total", "Task registrations by outcome", ["result"], registry=r
        )
        self.deletions = Counter("piggyback_task_deletions_total", "Task deletions", registry=r)
        self.store_syncs = Counter(
            "piggyback_store_sync_changes_total",
            "Changes picked up from the shared store",
            ["change"],
            registry=r,
        )
        self.ready = Gauge("piggyback_ready", "1 once the backbone is loaded and warmed up", registry=r)
        self.compute_info = Gauge(
            "piggyback_compute_info",
            "The engine's compute dtype and activation layout (value 1)",
            ["dtype", "layout"],
            registry=r,
        )
