"""The FastAPI application of ``captioner serve``.

Routes: ``POST /v1/captions`` (multipart ``images`` + ``beam_size``, ``n_best``, ``alpha``,
``block_ngram``, ``max_length`` (default: the model's stored decoding), ``attention``,
``heatmap``), ``GET /`` (the page), ``GET /v1/model``, ``GET /healthz`` and ``/static/*`` (the
page's script and style). Every error answer is ``{"error": "<one line>"}`` with a 4xx/5xx status; a request
whose images all fail also carries the per-image ``results``.
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures' annotations,
# and ``Request`` is imported inside create_app (FastAPI stays out of module import).
import asyncio
import tempfile
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from captioner.decoding_config import MAX_BEAM_SIZE, DecodingConfig
from captioner.errors import RequestError
from captioner.records import caption_error_record, caption_record
from captioner.serve.batcher import Batcher, QueueFull
from captioner.serve.engine import (
    ATTENTION,
    Engine,
    Item,
    Options,
    Output,
    attention_record,
)
from captioner.serve.heatmap import data_url, heatmap_image
from captioner.serve.uploads import (
    IMAGE_FIELD,
    OPTION_FIELDS,
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


class BodyTooLarge(Exception):
    """The request body went past the limit while it was being read."""


class BodyLimit:
    """ASGI middleware: 413 for a declared ``Content-Length`` over ``limit``; a body that
    turns out longer while streaming raises :class:`BodyTooLarge` in the route."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            from starlette.responses import JSONResponse

            response = JSONResponse({"error": _too_large(self.limit)}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge
            return message

        return await self.app(scope, limited, send)


def _too_large(limit: int) -> str:
    return f"request too large (over {limit / 2**20:.1f} MB); send fewer or smaller images"


def create_app(engine: Engine, settings: Settings | None = None):
    """The ASGI application around a loaded ``engine`` (warm it up before serving)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    settings = settings or Settings()
    limits = settings.limits
    decoding = settings.decoding or engine.decoding
    batcher = Batcher(engine.run, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue)
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
    app.add_middleware(BodyLimit, limit=limits.max_body)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        stats = batcher.stats
        return {"status": "ok", "queued": batcher.pending, "batches": stats.batches,
                "images": stats.items, "largest_batch": stats.largest_batch,
                "rejected": stats.rejected}

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
        good = [k for k, (_, pixels, _) in enumerate(decoded) if pixels is not None]
        outputs = await batcher.submit([Item(decoded[k][1], options) for k in good]) if good else []
        by_index = dict(zip(good, outputs, strict=True))
        records = await asyncio.gather(*(
            _answer(name, pixels, by_index.get(k), failure, options, engine)
            for k, (name, pixels, failure) in enumerate(decoded)))
        if not good:
            name, _, failure = decoded[0]
            return JSONResponse({"error": f"{name}: {failure.reason}", "results": records},
                                status_code=failure.status)
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


async def _answer(name: str, pixels, output: Output | None, failure: Failure | None,
                  options: Options, engine: Engine) -> dict[str, Any]:
    """The per-image answer: the keys of ``captioner caption --json``, plus ``attention``
    (grids) and ``heatmap`` (an image data URL) when asked."""
    if output is None:
        return caption_error_record(name, failure.reason)
    if output.error is not None:
        return caption_error_record(name, output.error)
    record = caption_record(name, output.captions)
    if output.attention is not None:
        words, weights = output.attention
        if options.attention:
            record[ATTENTION] = attention_record(words, weights, engine.grid)
        if options.heatmap:
            image = await asyncio.to_thread(heatmap_image, pixels, words, weights, engine.grid)
            record[HEATMAP] = data_url(*image)
    return record


def _error_handlers(app) -> None:
    """Every error as ``{"error": "<one line>"}``."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(message).split())}, status_code=status,
                            headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return error(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = exc.detail if exc.status_code != 404 else (
            f"not found: {request.method} {request.url.path} (the API is POST /v1/captions, "
            "GET /v1/model and GET /healthz; the page is GET /)")
        return error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return error(400, f"bad request: {exc.errors()[0].get('msg', exc)}")

    @app.exception_handler(BodyTooLarge)
    async def too_large(request, exc: BodyTooLarge):
        return error(413, _too_large(app.state.settings.limits.max_body))

    @app.exception_handler(QueueFull)
    async def busy(request, exc: QueueFull):
        return error(503, str(exc), {"Retry-After": str(exc.retry_after)})

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
                                                 decoding=decoding, max_beam=MAX_BEAM_SIZE)
