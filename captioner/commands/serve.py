"""CLI: ``captioner serve`` — the captioning web service (needs the ``serve`` extra)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

EXAMPLE = """\
examples:
  captioner serve                                   # the bundled model on http://127.0.0.1:8000
  captioner serve --model runs/attention --port 8080
  curl -F images=@photo.jpg -F beam_size=1 http://127.0.0.1:8000/v1/captions

Needs the serve extra: pip install -e ".[serve]". The default address is localhost only; give
--host 0.0.0.0 to listen on every interface (there is no authentication).
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``captioner serve``."""
    p = sub.add_parser(
        "serve",
        help="web service: JSON API and a page to caption photos",
        description="Load a run folder once, warm it up, then serve POST /v1/captions, a page to "
        "try it (GET /), GET /v1/model and GET /healthz. Images of concurrent requests are "
        "captioned together in batches.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from captioner.commands.caption import add_decoding_options

    p.add_argument("--model", metavar="RUN_DIR", default=None, nargs="+", action="extend",
                   help="run folder from `captioner train` (default: weights/default); several "
                   "folders over the same encoder decode as one ensemble")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    add_decoding_options(p)  # a request's defaults; each request may override them
    p.add_argument("--max-batch", type=int, default=16,
                   help="most images decoded together (default %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first image of a batch waits for others (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="images that may wait; more get 503 + Retry-After (default %(default)s)")
    p.add_argument("--max-images", type=int, default=16,
                   help="images per request (default %(default)s)")
    p.add_argument("--max-mb", type=float, default=10.0,
                   help="largest image file in MB (default %(default)s)")
    p.add_argument("--max-pixels", type=int, default=25_000_000,
                   help="largest image in pixels, checked before decoding (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn log level (default %(default)s)")
    p.set_defaults(handler=run_serve)


def settings_from(args: argparse.Namespace):
    """:class:`~captioner.serve.app.Settings` from the options, each checked."""
    from captioner.commands.caption import decoding_overrides
    from captioner.errors import CaptionerError
    from captioner.serve.app import Settings
    from captioner.serve.uploads import Limits

    decoding_overrides(args)
    checks = [("--port", args.port, 0, 65535),
              ("--max-batch", args.max_batch, 1, 1024), ("--max-queue", args.max_queue, 1, 1 << 20),
              ("--max-images", args.max_images, 1, 1024), ("--max-wait-ms", args.max_wait_ms, 0, 1000),
              ("--max-mb", args.max_mb, 0.001, 1024), ("--max-pixels", args.max_pixels, 1, 1 << 31)]
    for flag, value, low, high in checks:
        if not low <= value <= high:
            raise CaptionerError(f"{flag} must be from {low} to {high}, not {value}")
    limits = Limits(max_images=args.max_images, max_bytes=int(args.max_mb * 2**20),
                    max_pixels=args.max_pixels)
    return Settings(limits=limits, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                    max_queue=max(args.max_queue, args.max_images))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``captioner serve``."""
    from captioner.errors import CaptionerError

    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import multipart  # noqa: F401  (python-multipart)
        import uvicorn
    except ImportError as exc:
        raise CaptionerError(f"captioner serve needs the serve extra ({exc.name} is missing): "
                             'pip install -e ".[serve]"') from None
    from dataclasses import replace

    from captioner.commands.caption import decoding_overrides, model_decoding
    from captioner.inference import DEFAULT_RUN
    from captioner.serve.app import create_app
    from captioner.serve.engine import Engine

    settings = settings_from(args)
    models = [Path(m) for m in args.model or [DEFAULT_RUN]]
    print(f"loading {' '.join(map(str, models))} ...", file=sys.stderr, flush=True)
    engine = Engine.from_run(models)
    settings = replace(settings, decoding=model_decoding(engine.captioner,
                                                         **decoding_overrides(args)))
    print(f"warm-up: {engine.warm_up():.1f} s", file=sys.stderr, flush=True)
    if not _is_loopback(args.host):
        print(f"warning: listening on {args.host}, not only on this machine; the service has no "
              "authentication", file=sys.stderr)
    uvicorn.run(create_app(engine, settings), host=args.host, port=args.port,
                log_level=args.log_level)
    return 0
