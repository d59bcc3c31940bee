"""Prometheus metrics, one registry per app so that tests can build several apps.

With several processes (``U2SERVE_WORKERS``), prometheus-client's multiprocess mode: each process
writes its series to files in ``PROMETHEUS_MULTIPROC_DIR`` (set by the supervisor before any of
them imports this module), and ``/metrics`` adds them up; each gauge says how (its
``multiprocess_mode``: the live processes' sum, or their most). The ``process_*`` series are
then the whole service's: the resident memory of every one of its processes, summed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["Metrics", "multiprocess"]


def multiprocess() -> bool:
    """Whether this process is one of several whose metrics are added up."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


class _TreeMemory:
    """``process_resident_memory_bytes`` of a process and its descendants, summed (Linux)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def collect(self) -> Iterator[GaugeMetricFamily]:
        page = os.sysconf("SC_PAGE_SIZE")
        total, todo = 0, [self.pid]
        while todo:
            pid = todo.pop()
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue  # a process that has just exited
        yield GaugeMetricFamily(
            "process_resident_memory_bytes",
            "Resident memory of every process of the service, in bytes",
            value=total,
        )


_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        if multiprocess():
            # prometheus-client chooses where values live when it is imported; a process that
            # imported it before the supervisor named the folder would keep them to itself.
            values.ValueClass = values.get_value_class()
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "u2serve_requests",
            "Segmentation requests answered, by API (segment, removebg or rembg), model, image "
            "source (upload, url or image_id), output and status",
            ["api", "model", "source", "output", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "u2serve_request_duration_seconds",
            "Time from request to response of successful requests, per API, model and output",
            ["api", "model", "output"],
            buckets=_LATENCY,
            registry=r,
        )
        self.stage_duration = Histogram(
            "u2serve_stage_duration_seconds",
            "Time spent per request in each stage",
            ["stage"],
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_wait = Histogram(
            "u2serve_queue_wait_seconds",
            "Time a request waited in the queue before its batch ran",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.inference_duration = Histogram(
            "u2serve_inference_duration_seconds",
            "Time the model took for one batch, pre- and postprocessing included",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "u2serve_batch_size",
            "Images per batch",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.second_looks = Counter(
            "u2serve_second_looks",
            "Images that precision auto ran again in float32 (their int8 map was uncertain), "
            "by model; their share: over u2serve_batch_size_sum",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "u2serve_queue_depth",
            "Requests waiting, by stage: for a codec thread to decode them (decode), for the "
            "network (batch, every model's), for a codec thread to make their answer (encode)",
            ["stage"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_capacity = Gauge(
            "u2serve_queue_capacity",
            "Requests that may wait, in every stage together (U2SERVE_MAX_QUEUE)",
            registry=r,
            multiprocess_mode="max",
        )
        self.in_flight_limit = Gauge(
            "u2serve_requests_in_flight_limit",
            "Requests the service may hold at once, from admission to answer: U2SERVE_MAX_QUEUE "
            "waiting beyond one batch and one image per codec thread; past it, 503",
            registry=r,
            multiprocess_mode="max",
        )
        self.rejected = Counter(
            "u2serve_rejected",
            "Requests refused before inference, by error code",
            ["reason"],
            registry=r,
        )
        self.model_info = Gauge(
            "u2serve_model_info",
            "A model being served (value 1; one series per model)",
            ["model", "engine", "device", "dtype"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ready = Gauge(
            "u2serve_ready",
            "1 when the service accepts work",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.in_flight = Gauge(
            "u2serve_requests_in_flight",
            "Image requests (every API's) begun and not yet answered, their bodies still arriving "
            "included",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.memory_budget = Gauge(
            "u2serve_memory_budget_bytes",
            "Bytes that requests in flight may hold, decode to encode",
            registry=r,
            multiprocess_mode="max",
        )
        self.memory_held = Gauge(
            "u2serve_memory_held_bytes",
            "Bytes charged to the requests in flight now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.kept_buffers = Gauge(
            "u2serve_kept_buffers_bytes",
            "Bytes of working buffers kept for the next request that no request uses now, beyond "
            "the memory budget's charges (at most 192 MiB a process; none once nothing is held)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.map_cache_hits = Counter(
            "u2serve_map_cache_hits",
            "Requests whose network map came from the map cache (no network pass), by model",
            ["model"],
            registry=r,
        )
        self.map_cache_misses = Counter(
            "u2serve_map_cache_misses",
            "Requests whose network map was not in the map cache, by model",
            ["model"],
            registry=r,
        )
        self.map_cache_bytes = Gauge(
            "u2serve_map_cache_bytes",
            "Bytes of maps in the in-process map cache (0 with Redis)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.map_cache_evictions = Counter(
            "u2serve_map_cache_evictions",
            "Maps dropped from the in-process map cache to stay within its bytes",
            registry=r,
        )
        self.upload_cache_bytes = Gauge(
            "u2serve_upload_cache_bytes",
            "Bytes of uploads kept in this process for image ids (0 with Redis)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upload_cache_evictions = Counter(
            "u2serve_upload_cache_evictions",
            "Kept uploads dropped before their time to stay within their bytes",
            registry=r,
        )
        self.image_id_requests = Counter(
            "u2serve_image_id_requests",
            "Requests that gave an image_id instead of an image, by whether it was found",
            ["result"],
            registry=r,
        )
        self.cache_fallbacks = Counter(
            "u2serve_cache_fallbacks",
            "Cache calls that failed or timed out (Redis), each answered without the cache",
            ["operation"],
            registry=r,
        )
        # process_resident_memory_bytes and friends, for alerts on the process's real memory.
        if not multiprocess():
            ProcessCollector(registry=r)

    def exposition(self) -> bytes:
        """What ``/metrics`` answers: this registry's series, or, with several processes, every
        process's added up, and the memory of all of them."""
        if not multiprocess():
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        merged.register(_TreeMemory(os.getppid()))  # the supervisor's, every process's
        return generate_latest(merged)
