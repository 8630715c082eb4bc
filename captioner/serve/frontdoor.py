"""The ASGI middleware every request of ``captioner serve`` passes first.

In order: a request ID (``X-Request-ID``, echoed when the client sent a sane one), the drain
check (503 + ``Retry-After`` once SIGTERM arrived), the API key (401), the cap on uploads in
progress (503), then the body limits: a declared ``Content-Length`` over the limit is 413 at
once, a body that grows past it while streaming is 413, and a body that is not complete within
``body_timeout`` seconds of the request's start is 408 — so a slow or stalled client holds
neither the model thread nor the queue (images enter the queue only once the body is read).
Each request ends with its metrics and one access-log line.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass

from captioner.serve.auth import CHALLENGE, ApiKeys
from captioner.serve.telemetry import AccessLog, Metrics, RequestRecord, route_of

PUBLIC = ("/healthz", "/", "/static")  # routes a request reaches without a key (see README)
WHILE_DRAINING = ("/healthz", "/metrics")  # routes still answered while draining
UPLOAD_ROUTE = "/v1/captions"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
RECORD_KEY = "captioner.record"  # where a route finds its RequestRecord in the ASGI scope
DRAIN_RETRY_S = 5
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16_384  # beyond the server's own hard limit (64 KiB) the server answers 400


class BodyTooLarge(Exception):
    """The request body went past the limit while it was being read."""


class BodyTimeout(Exception):
    """The request body was not complete within the body timeout."""


@dataclass
class ServiceState:
    """Shared by the middleware, the routes and the server: what is running, and whether the
    service is draining."""

    draining: bool = False
    in_flight: int = 0  # accepted requests not yet answered
    uploads: int = 0  # of them, requests to /v1/captions (bodies being read or captioned)


@dataclass(frozen=True)
class DoorSettings:
    max_body: int
    body_timeout: float = 30.0
    max_uploads: int = 32


def too_large(limit: int) -> str:
    return f"request too large (over {limit / 2**20:.1f} MB); send fewer or smaller images"


class Frontdoor:
    """Pure ASGI middleware (no buffering: the body streams through, bounded)."""

    def __init__(self, app, state: ServiceState, door: DoorSettings, metrics: Metrics,
                 log: AccessLog, keys: ApiKeys | None = None):
        self.app, self.state, self.door = app, state, door
        self.metrics, self.log, self.keys = metrics, log, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = dict(scope["headers"])
        record = RequestRecord(method=scope["method"], route=route_of(scope["path"]),
                               path=scope["path"], client=_client(scope),
                               request_id=_request_id(headers.get(b"x-request-id")))
        scope[RECORD_KEY] = record

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", record.request_id.encode())]}
            await send(message)

        try:
            refusal = self._refusal(record, headers, scope["headers"])
            if refusal is not None:
                status, message, extra, record.reason = refusal
                return await json_error(send_with_id, status, message, extra)
            self.state.in_flight += 1  # accepted: a drain waits for it
            try:
                if record.route == UPLOAD_ROUTE and scope["method"] == "POST":
                    await self._upload(scope, receive, send_with_id, headers, record, start)
                else:
                    await self.app(scope, receive, send_with_id)
            finally:
                self.state.in_flight -= 1
        finally:
            self._finish(record, time.perf_counter() - start)

    def _refusal(self, record: RequestRecord, headers: dict, raw: list) -> tuple | None:
        """``(status, message, extra headers, reason)`` of a request refused at the door."""
        route = record.route
        size = sum(len(k) + len(v) + 4 for k, v in raw)
        if size > MAX_HEADER_BYTES or len(raw) > MAX_HEADERS:
            return (431, f"request headers too large ({len(raw)} headers, {size} bytes; at most "
                    f"{MAX_HEADERS} and {MAX_HEADER_BYTES})", {"connection": "close"},
                    "headers_too_large")
        if self.state.draining and route not in WHILE_DRAINING:
            return (503, "the service is shutting down; retry on another instance",
                    {"retry-after": str(DRAIN_RETRY_S), "connection": "close"}, "draining")
        if self.keys is not None and route not in PUBLIC and not (
                self.keys.allows(headers.get(b"authorization"))):
            return (401, "missing or wrong API key: send the header 'Authorization: Bearer "
                    "KEY'", {"www-authenticate": CHALLENGE}, "unauthorized")
        return None

    async def _upload(self, scope, receive, send, headers: dict, record: RequestRecord,
                      start: float) -> None:
        """The captioning route: counted among uploads in progress, body bounded in size and
        time."""
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.door.max_body:
            record.reason = "too_large"
            return await json_error(send, 413, too_large(self.door.max_body))
        if self.state.uploads >= self.door.max_uploads:
            record.reason = "too_many_uploads"
            return await json_error(send, 503, f"busy: {self.state.uploads} uploads in "
                                    "progress; retry in 1 s", {"retry-after": "1"})
        self.state.uploads += 1
        try:
            await self.app(scope, self._bounded(receive, start), send)
        finally:
            self.state.uploads -= 1

    def _bounded(self, receive, start: float):
        seen, done = 0, False

        async def bounded():
            nonlocal seen, done
            if done:  # after the body: waiting for a disconnect is not bounded
                return await receive()
            left = start + self.door.body_timeout - time.perf_counter()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
            except TimeoutError:
                raise BodyTimeout from None
            seen += len(message.get("body", b""))
            done = not message.get("more_body", False)
            if seen > self.door.max_body:
                raise BodyTooLarge
            return message

        return bounded

    def _finish(self, record: RequestRecord, seconds: float) -> None:
        status = record.status or 500
        self.metrics.requests.labels(record.route, str(status)).inc()
        self.metrics.latency.labels(record.route).observe(seconds)
        if status == 503:
            self.metrics.busy.inc()
        if record.reason:
            self.metrics.rejected.labels(record.reason).inc()
        self.log.write(record, seconds)


async def json_error(send, status: int, message: str, extra: dict | None = None) -> None:
    """Answer ``{"error": message}`` with ``status`` and ``extra`` headers."""
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


def _request_id(given: bytes | None) -> str:
    text = (given or b"").decode("latin-1")
    return text if REQUEST_ID.fullmatch(text) else uuid.uuid4().hex
