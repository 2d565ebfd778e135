"""Prometheus metrics, one registry per app (so tests can build many apps in one process)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from piggyback_core import Engine

    from .transport import BodyBudget

__all__ = ["OTHER_TASKS", "Metrics"]

OTHER_TASKS = "_other"  # the task label of every task past the per-task series bound

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _CacheCollector(Collector):
    """The weight cache's figures, read from the engine at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        cache = self.engine.cache
        yield GaugeMetricFamily(
            "piggyback_weight_cache_budget_bytes", "Byte budget of the built-weights cache", value=cache.max_bytes
        )
        yield GaugeMetricFamily("piggyback_weight_cache_bytes", "Bytes of built weights held", value=cache.bytes)
        yield GaugeMetricFamily(
            "piggyback_weight_cache_pinned_bytes", "Bytes of pinned tasks' built weights", value=cache.pinned_bytes
        )
        yield GaugeMetricFamily(
            "piggyback_weight_cache_pinned_tasks",
            "Pinned (loaded) tasks whose built weights are held",
            value=cache.pinned_tasks,
        )
        yield GaugeMetricFamily("piggyback_weight_cache_tasks", "Tasks whose built weights are held", value=len(cache))
        yield CounterMetricFamily(
            "piggyback_weight_cache_hits", "Batches that found a task's weights built (one per task)", value=cache.hits
        )
        yield CounterMetricFamily(
            "piggyback_weight_cache_misses", "Batches that built a task's weights (one per task)", value=cache.misses
        )
        yield CounterMetricFamily(
            "piggyback_weight_cache_evictions", "Built weights evicted for the budget", value=cache.evictions
        )


class _BodyBudgetCollector(Collector):
    """The request-body byte budget, read at scrape time."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily(
            "piggyback_request_body_bytes_in_flight", "Request-body bytes held now", value=self.budget.held
        )
        yield GaugeMetricFamily(
            "piggyback_request_body_budget_bytes", "Budget of request-body bytes held at once", value=self.budget.limit
        )
        yield CounterMetricFamily(
            "piggyback_request_body_budget_refusals",
            "Requests answered 503 because the body budget was spent",
            value=self.budget.refused,
        )


class Metrics:
    """``top_tasks`` and ``tasks`` bound the per-task series (``task_label``): the tasks named in
    ``tasks`` and the first ``top_tasks`` others to get traffic have their own; every other task is
    counted under ``task="_other"``, so 10,000 tasks do not make 10,000 x statuses series."""

    def __init__(self, *, top_tasks: int = 50, tasks: Iterable[str] = ()) -> None:
        self.top_tasks = top_tasks
        self._allowed = set(tasks)
        self._labelled: set[str] = set()
        self._label_lock = threading.Lock()
        self._engine_watched = False
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "piggyback_requests_total",
            "Classify requests by task and HTTP status",
            ["task", "status"],
            registry=r,
        )
        self.grpc_requests = Counter(
            "piggyback_grpc_requests_total",
            "gRPC calls (the Open Inference Protocol over gRPC) by method and status code",
            ["method", "code"],
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
        self.repository_actions = Counter(
            "piggyback_repository_actions_total",
            "Model-repository loads and unloads (POST /v2/repository/models/...) by HTTP status",
            ["action", "status"],
            registry=r,
        )
        self.store_syncs = Counter(
            "piggyback_store_sync_changes_total",
            "Changes picked up from the shared store",
            ["change"],
            registry=r,
        )
        self.store_sync_errors = Counter(
            "piggyback_store_sync_errors_total", "Store polls that failed (the poller goes on)", registry=r
        )
        self.store_sync_success = Gauge(
            "piggyback_store_sync_last_success_timestamp_seconds",
            "Unix time of the last store poll that succeeded",
            registry=r,
        )
        self.store_failed_tasks = Gauge(
            "piggyback_store_tasks_failed", "Task files in the store that cannot be served", registry=r
        )
        self.store_held_removals = Gauge(
            "piggyback_store_held_removals",
            "Tasks whose removal is held until the store lists the same twice",
            registry=r,
        )
        self.device_oom = Counter(
            "piggyback_device_oom_total",
            "Batches that ran out of device memory (split in two and retried once)",
            registry=r,
        )
        self.ready = Gauge("piggyback_ready", "1 once the backbone is loaded and warmed up", registry=r)
        self.compute_info = Gauge(
            "piggyback_compute_info",
            "The engine's compute dtype and activation layout (value 1)",
            ["dtype", "layout"],
            registry=r,
        )

        self.workers = Gauge("piggyback_workers", "Batches computed at once (worker threads)", registry=r)
        self.worker_threads = Gauge("piggyback_worker_threads", "Intra-op threads of each worker", registry=r)

    def task_label(self, task: str) -> str:
        """``task`` itself within the per-task series bound, else ``_other``."""
        if task in self._allowed or task in self._labelled:
            return task
        with self._label_lock:
            if len(self._labelled) < self.top_tasks:
                self._labelled.add(task)
                return task
        return OTHER_TASKS

    def watch_engine(self, engine: Engine) -> None:
        if not self._engine_watched:
            self.registry.register(_CacheCollector(engine))
            self._engine_watched = True

    def watch_body_budget(self, budget: BodyBudget) -> None:
        self.registry.register(_BodyBudgetCollector(budget))

    def refresh_tasks(self, engine: Engine) -> None:
        """The task gauges read ``engine`` at each scrape: tasks are loaded at their first use and
        let go past ``task_cache_bytes``, not only when the set of tasks changes."""
        self.tasks_loaded.set_function(lambda: len(engine.tasks))
        self.mask_bytes.set_function(lambda: engine.resident_mask_bytes)
