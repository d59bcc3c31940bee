"""Prometheus metrics, one registry per app so that tests can build several apps."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

__all__ = ["Metrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "u2serve_requests",
            "Segmentation requests answered, by model, image source (upload, url or image_id), "
            "output and status",
            ["model", "source", "output", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "u2serve_request_duration_seconds",
            "Time from request to response of successful requests, per model and output",
            ["model", "output"],
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
        self.queue_depth = Gauge(
            "u2serve_queue_depth", "Requests waiting in the queue, every model's", registry=r
        )
        self.queue_capacity = Gauge(
            "u2serve_queue_capacity", "Requests that may wait (U2SERVE_MAX_QUEUE)", registry=r
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
        )
        self.ready = Gauge("u2serve_ready", "1 when the service accepts work", registry=r)
        # Read from the Runtime's own count when scraped (set_function): nothing per request.
        self.in_flight = Gauge(
            "u2serve_requests_in_flight",
            "/segment requests begun and not yet answered, their bodies still arriving included",
            registry=r,
        )
        self.memory_budget = Gauge(
            "u2serve_memory_budget_bytes",
            "Bytes that requests in flight may hold, decode to encode",
            registry=r,
        )
        self.memory_held = Gauge(
            "u2serve_memory_held_bytes",
            "Bytes charged to the requests in flight now",
            registry=r,
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
        ProcessCollector(registry=r)
