"""What ``captioner serve`` tells its operator: Prometheus metrics and one access-log line per
request.

Metrics live in a registry of their own (one per application, so tests and several apps in one
process never share counters) and are written by ``prometheus-client``'s own exposition.
The access log is one line per request on stderr, JSON or text; it never holds a header (so
never an API key), only what the service itself decided.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

ROUTES = ("/v1/captions", "/v1/model", "/healthz", "/metrics", "/")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOG_FORMATS = ("text", "json")


def route_of(path: str) -> str:
    """The route label of a request path: a known route, ``/static`` or ``other`` (so that
    random paths cannot grow the number of time series)."""
    if path in ROUTES:
        return path
    return "/static" if path.startswith("/static/") else "other"


class Metrics:
    """The service's counters, histograms and gauges, in their own registry."""

    def __init__(self, queue_depth: Callable[[], float], in_flight: Callable[[], float]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("captioner_requests", "HTTP requests answered, by route and "
                                "status", ("route", "status"), registry=r)
        self.latency = Histogram("captioner_request_seconds", "time from request to answer",
                                 ("route",), buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("captioner_images_captioned", "images captioned", registry=r)
        self.model_time = Histogram("captioner_model_seconds", "model time per batch "
                                    "(encoder and search)", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("captioner_batch_size", "images per model batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.rejected = Counter("captioner_rejected", "requests or uploads refused, by reason",
                                ("reason",), registry=r)
        self.busy = Counter("captioner_busy", "503 answers (queue full, too many uploads or "
                            "draining)", registry=r)
        Gauge("captioner_queue_depth", "images waiting for the model", registry=r
              ).set_function(queue_depth)
        Gauge("captioner_requests_in_flight", "requests being handled", registry=r
              ).set_function(in_flight)

    def batch(self, size: int, seconds: float) -> None:
        """One model batch ran (called by the batcher)."""
        self.batch_size.observe(size)
        self.model_time.observe(seconds)
        self.images.inc(size)

    def exposition(self) -> tuple[bytes, str]:
        """``(body, content type)`` of ``GET /metrics``."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass
class RequestRecord:
    """What the access log says of one request."""

    method: str
    route: str
    path: str
    client: str
    request_id: str
    status: int = 0
    images: int = 0
    batch: int | None = None  # the largest model batch its images ran in
    reason: str | None = None  # why it was refused, when it was


class AccessLog:
    """One line per request on ``stream`` (stderr), as JSON or text."""

    def __init__(self, log_format: str = "text", stream=None):
        if log_format not in LOG_FORMATS:
            raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
        self.log_format, self.stream = log_format, stream

    def line(self, record: RequestRecord, seconds: float) -> str:
        fields = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": record.method,
                  "route": record.route, "path": record.path[:200], "status": record.status,
                  "images": record.images, "latency_ms": round(1000 * seconds, 1),
                  "client": record.client, "batch": record.batch,
                  "request_id": record.request_id}
        if record.reason:
            fields["reason"] = record.reason
        if self.log_format == "json":
            return json.dumps(fields)
        batch = f" batch {record.batch}" if record.batch else ""
        why = f" ({record.reason})" if record.reason else ""
        return (f"{fields['time']} {record.client} {record.method} {fields['path']} "
                f"{record.status}{why} {record.images} image(s) {fields['latency_ms']} ms"
                f"{batch} id={record.request_id}")

    def write(self, record: RequestRecord, seconds: float) -> None:
        print(self.line(record, seconds), file=self.stream or sys.stderr, flush=True)
