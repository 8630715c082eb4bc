"""The FastAPI application of ``captioner serve``.

Routes: ``POST /v1/captions`` (multipart ``images`` + ``beam_size``, ``n_best``, ``alpha``,
``block_ngram``, ``max_length`` (default: the model's stored decoding), ``attention``,
``heatmap``), ``GET /`` (the page), ``GET /v1/model``, ``GET /healthz``, ``GET /metrics``
(Prometheus) and ``/static/*`` (the page's script and style). Every request passes
:class:`~captioner.serve.frontdoor.Frontdoor` first (request ID, drain, API key, body limits,
metrics, access log). Every error answer is ``{"error": "<one line>"}`` with a 4xx/5xx status; a
request whose images all fail also carries the per-image ``results``.
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures' annotations,
# and ``Request`` is imported inside create_app (FastAPI stays out of module import).
import asyncio
import tempfile
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from captioner.errors import RequestError
from captioner.formats.decoding_config import MAX_BEAM_SIZE, DecodingConfig
from captioner.formats.json_lines import caption_error_record, caption_record
from captioner.serve.auth import ApiKeys
from captioner.serve.batcher import Batcher, QueueFull
from captioner.serve.engine import (
    ATTENTION,
    Engine,
    Item,
    Options,
    Output,
    attention_record,
)
from captioner.serve.frontdoor import (
    RECORD_KEY,
    BodyTimeout,
    BodyTooLarge,
    DoorSettings,
    Frontdoor,
    ServiceState,
    too_large,
)
from captioner.serve.heatmap import data_url, heatmap_image
from captioner.serve.telemetry import AccessLog, Metrics
from captioner.serve.uploads import (
    IMAGE_FIELD,
    OPTION_FIELDS,
    Decoded,
    Failure,
    Limits,
    decode_upload,
    parse_options,
)

HERE = Path(__file__).resolve().parent
TEMP_PREFIX = "captioner-serve-"
HEATMAP = "heatmap"  # the per-image key of the heat map image, when asked


@dataclass(frozen=True)
class Settings:
    """Everything ``captioner serve`` can set besides the model and the address."""

    limits: Limits = field(default_factory=Limits)
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 64
    decoding: DecodingConfig | None = None  # a request's defaults; None: the model's stored one
    api_keys: ApiKeys | None = field(default=None, repr=False)  # None: no authentication
    body_timeout: float = 30.0  # seconds for a whole request body to arrive
    max_uploads: int = 32  # requests whose bodies are being read at once
    log_format: str = "text"  # the access log: text or json


FAILURE_REASONS = {413: "image_too_large", 415: "not_an_image", 422: "unreadable_image"}


def create_app(engine: Engine, settings: Settings | None = None):
    """The ASGI application around a loaded ``engine`` (warm it up before serving)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles

    settings = settings or Settings()
    limits = settings.limits
    state = ServiceState()
    decoding = settings.decoding or engine.decoding
    batcher = Batcher(engine.run, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue,
                      workers=getattr(engine, "workers", 1))
    metrics = Metrics(queue_depth=lambda: batcher.pending, in_flight=lambda: state.in_flight)
    batcher.on_batch = metrics.batch
    model = engine.describe()
    page = render_page(model, settings, decoding)

    @asynccontextmanager
    async def lifespan(app):
        with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as folder:
            app.state.uploads = Path(folder)
            await batcher.start()
            try:
                yield
            finally:
                await batcher.stop()

    app = FastAPI(title="captioner", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.engine, app.state.settings = batcher, engine, settings
    app.state.service, app.state.metrics = state, metrics
    door = DoorSettings(limits.max_body, settings.body_timeout, settings.max_uploads)
    app.add_middleware(Frontdoor, state=state, door=door, metrics=metrics,
                       log=AccessLog(settings.log_format), keys=settings.api_keys)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz():
        stats = batcher.stats
        body = {"status": "draining" if state.draining else "ok", "queued": batcher.pending,
                "in_flight": state.in_flight, "batches": stats.batches, "images": stats.items,
                "largest_batch": stats.largest_batch, "rejected": stats.rejected}
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        return {**model, "limits": {**asdict(limits), "max_beam_size": MAX_BEAM_SIZE},
                "decoding": decoding.to_dict(),
                "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                             "max_queue": settings.max_queue}}

    @app.post("/v1/captions")
    async def captions(request: Request):
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "multipart/form-data":
            raise RequestError(f"send multipart/form-data with the images in fields named "
                               f"{IMAGE_FIELD!r} (got {kind or 'no content type'})", 415)
        form = await request.form(max_files=limits.max_images, max_fields=2 * len(OPTION_FIELDS),
                                  max_part_size=1024)
        try:
            uploads, fields = _split_form(form)
            options = parse_options(fields, engine.has_attention, decoding)
            decoded = await asyncio.gather(*(
                asyncio.to_thread(decode_upload, upload, k, request.app.state.uploads,
                                  engine.input_size, limits, engine.resample)
                for k, upload in enumerate(uploads)))
        finally:
            await form.close()
        good = [k for k, upload in enumerate(decoded) if upload.pixels is not None]
        _count_failures(metrics, [u.failure for u in decoded if u.failure])
        log = request.scope.get(RECORD_KEY)
        if log is not None:
            log.images = len(decoded)
        outputs, log_batch = [], None
        if good:
            outputs, log_batch = await batcher.submit_sized([Item(decoded[k].pixels, options)
                                                             for k in good])
        if log is not None:
            log.batch = log_batch
        by_index = dict(zip(good, outputs, strict=True))
        records = await asyncio.gather(*(
            _answer(upload, by_index.get(k), options, engine) for k, upload in enumerate(decoded)))
        if not good:
            first = decoded[0]
            return JSONResponse({"error": f"{first.name}: {first.failure.reason}",
                                 "results": records}, status_code=first.failure.status)
        return {"results": records}

    return app


def _split_form(form) -> tuple[list[Any], dict[str, list[str]]]:
    """The uploaded files of ``images`` and the text fields, each checked for its kind."""
    from starlette.datastructures import UploadFile

    uploads, fields = [], {}
    for key, value in form.multi_items():
        if key == IMAGE_FIELD:
            if not isinstance(value, UploadFile):
                raise RequestError(f"field {IMAGE_FIELD!r} must hold files, not text")
            uploads.append(value)
        elif isinstance(value, UploadFile):
            raise RequestError(f"field {key!r} must be text, not a file; images go in fields "
                               f"named {IMAGE_FIELD!r}")
        else:
            fields.setdefault(key, []).append(value)
    if not uploads:
        raise RequestError(f"no images: send one or more files in multipart fields named "
                           f"{IMAGE_FIELD!r}")
    return uploads, fields


def _count_failures(metrics: Metrics, failures: list[Failure]) -> None:
    for failure in failures:
        metrics.rejected.labels(FAILURE_REASONS.get(failure.status, "bad_image")).inc()


async def _answer(upload: Decoded, output: Output | None, options: Options,
                  engine: Engine) -> dict[str, Any]:
    """The per-image answer: the keys of ``captioner caption --json``, plus ``attention``
    (grids) and ``heatmap`` (an image data URL, at the photo's own aspect ratio) when asked."""
    if output is None:
        return caption_error_record(upload.name, upload.failure.reason)
    if output.error is not None:
        return caption_error_record(upload.name, output.error)
    record = caption_record(upload.name, output.captions)
    if output.attention is not None:
        words, weights = output.attention
        if options.attention:
            record[ATTENTION] = attention_record(words, weights, engine.grid)
        if options.heatmap:
            image = await asyncio.to_thread(heatmap_image, upload.pixels, words, weights,
                                            engine.grid, upload.aspect)
            record[HEATMAP] = data_url(*image)
    return record


def _error_handlers(app) -> None:
    """Every error as ``{"error": "<one line>"}``."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error(status: int, message: str, headers: dict | None = None, request=None,
              reason: str | None = None) -> JSONResponse:
        record = request.scope.get(RECORD_KEY) if request is not None else None
        if record is not None and reason:
            record.reason = reason
        return JSONResponse({"error": " ".join(str(message).split())}, status_code=status,
                            headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return error(exc.status, str(exc), request=request, reason="bad_request")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = exc.detail if exc.status_code != 404 else (
            f"not found: {request.method} {request.url.path} (the API is POST /v1/captions, "
            "GET /v1/model and GET /healthz; the page is GET /)")
        return error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return error(400, f"bad request: {exc.errors()[0].get('msg', exc)}", request=request,
                     reason="bad_request")

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request, exc: BodyTooLarge):
        return error(413, too_large(app.state.settings.limits.max_body), request=request,
                     reason="too_large")

    @app.exception_handler(BodyTimeout)
    async def body_timeout(request, exc: BodyTimeout):
        seconds = app.state.settings.body_timeout
        return error(408, f"the request body did not arrive within {seconds:g} s; send it "
                     "again", {"Connection": "close"}, request=request, reason="body_timeout")

    @app.exception_handler(QueueFull)
    async def busy(request, exc: QueueFull):
        return error(503, str(exc), {"Retry-After": str(exc.retry_after)}, request=request,
                     reason="queue_full")

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        return error(500, f"internal error ({type(exc).__name__}: {exc})")


def render_page(model: dict[str, Any], settings: Settings,
                decoding: DecodingConfig | None = None) -> str:
    """The try-it page (Jinja2, autoescaped); ``decoding``: the form's defaults."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(["html"]))
    decoding = decoding or settings.decoding or DecodingConfig()
    return env.get_template("index.html").render(model=model, limits=settings.limits,
                                                 decoding=decoding, max_beam=MAX_BEAM_SIZE,
                                                 auth=settings.api_keys is not None)
