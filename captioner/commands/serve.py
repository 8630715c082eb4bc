"""CLI: ``captioner serve`` — the captioning web service (needs the ``serve`` extra)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

EXAMPLE = """\
examples:
  captioner serve                                   # the bundled model on http://127.0.0.1:8000
  captioner serve --model runs/attention --port 8080
  curl -F images=@photo.jpg -F beam_size=1 http://127.0.0.1:8000/v1/captions

  captioner serve --host 0.0.0.0 --api-key-file keys.txt   # beyond localhost: keys needed
  curl -H "Authorization: Bearer $KEY" -F images=@photo.jpg http://HOST:8000/v1/captions

Needs the serve extra: pip install -e ".[serve]". The default address is localhost only. Any
other address needs API keys (--api-key-file, or the CAPTIONER_API_KEY_FILE environment
variable: one key per line) or an explicit --insecure-no-auth. GET /metrics gives Prometheus
metrics; each request is one access-log line on stderr (--log-format json for JSON). SIGTERM or
Ctrl-C drains: new requests get 503, accepted ones finish, then the service exits 0.
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
    from captioner.commands.options import (
        add_check,
        add_decoding_options,
        add_memory_option,
        add_model_options,
        check_port,
    )

    add_model_options(p, runtime=True)
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
    p.add_argument("--api-key-file", metavar="PATH", default=None,
                   help="require 'Authorization: Bearer KEY' with one of the keys of PATH (one "
                   "per line) on every route but /healthz and the page (default: the file "
                   "named by $CAPTIONER_API_KEY_FILE, else no keys)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without API keys")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds to finish accepted requests before exiting "
                   "(default %(default)s)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request may take to send its body; slower gets 408 "
                   "(default %(default)s)")
    p.add_argument("--max-uploads", type=int, default=32,
                   help="requests whose uploads are read at once; more get 503 (default "
                   "%(default)s)")
    p.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="access log on stderr, one line per request (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn log level (default %(default)s)")
    add_memory_option(p)
    add_check(p, _need_serve_extra)
    add_check(p, lambda args: settings_from(args))  # every option, before the model loads
    add_check(p, check_port)  # a busy port: one line, before the model loads
    p.set_defaults(handler=run_serve, lazy_keras=True)


def settings_from(args: argparse.Namespace):
    """:class:`~captioner.serve.app.Settings` from the options, each checked."""
    from captioner.commands.options import decoding_overrides
    from captioner.errors import CaptionerError
    from captioner.serve.app import Settings
    from captioner.serve.uploads import Limits

    decoding_overrides(args)
    checks = [("--port", args.port, 0, 65535),
              ("--max-batch", args.max_batch, 1, 1024), ("--max-queue", args.max_queue, 1, 1 << 20),
              ("--max-images", args.max_images, 1, 1024), ("--max-wait-ms", args.max_wait_ms, 0, 1000),
              ("--max-mb", args.max_mb, 0.001, 1024), ("--max-pixels", args.max_pixels, 1, 1 << 31),
              ("--drain-timeout", args.drain_timeout, 0, 3600),
              ("--body-timeout", args.body_timeout, 0.1, 3600),
              ("--max-uploads", args.max_uploads, 1, 1 << 16)]
    for flag, value, low, high in checks:
        if not low <= value <= high:
            raise CaptionerError(f"{flag} must be from {low} to {high}, not {value}")
    limits = Limits(max_images=args.max_images, max_bytes=int(args.max_mb * 2**20),
                    max_pixels=args.max_pixels)
    return Settings(limits=limits, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                    max_queue=max(args.max_queue, args.max_images),
                    api_keys=_api_keys(args), body_timeout=args.body_timeout,
                    max_uploads=args.max_uploads, log_format=args.log_format)


def _api_keys(args: argparse.Namespace):
    """The keys of --api-key-file (or $CAPTIONER_API_KEY_FILE); a non-loopback --host without
    keys is refused unless --insecure-no-auth."""
    from captioner.errors import CaptionerError
    from captioner.serve.auth import KEY_FILE_ENV, load_keys

    path = args.api_key_file or os.environ.get(KEY_FILE_ENV)
    keys = load_keys(path) if path else None
    if keys is None and not _is_loopback(args.host) and not args.insecure_no_auth:
        raise CaptionerError(
            f"refusing to listen on {args.host} without API keys: give --api-key-file PATH (one "
            f"key per line, or set {KEY_FILE_ENV}), or --insecure-no-auth to serve anyone")
    return keys


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _need_serve_extra(args: argparse.Namespace) -> None:
    """The serve extra is installed (else one line saying how to add it)."""
    from captioner.errors import CaptionerError

    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import multipart  # noqa: F401  (python-multipart)
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise CaptionerError(f"captioner serve needs the serve extra ({exc.name} is missing): "
                             'pip install -e ".[serve]"') from None


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``captioner serve`` (its checks ran in ``cli.main``)."""
    from dataclasses import replace

    from captioner.commands.caption import resolve_runtime
    from captioner.commands.options import decoding_overrides, model_decoding
    from captioner.inference.captioner import DEFAULT_RUN
    from captioner.serve.app import create_app
    from captioner.serve.engine import Engine

    settings = settings_from(args)  # before the model loads: a bad option costs nothing
    models = [Path(m) for m in args.model or [DEFAULT_RUN]]
    print(f"loading {' '.join(map(str, models))} ...", file=sys.stderr, flush=True)
    engine = Engine.from_run(models, runtime=resolve_runtime(args, models))
    engine.captioner.max_memory = args.max_memory
    settings = replace(settings, decoding=model_decoding(engine.captioner,
                                                         **decoding_overrides(args)))
    print(f"warm-up: {engine.warm_up():.1f} s", file=sys.stderr, flush=True)
    if settings.api_keys is None and not _is_loopback(args.host):
        print(f"warning: listening on {args.host} without API keys (--insecure-no-auth)",
              file=sys.stderr)
    from captioner.serve.server import run_server

    return run_server(create_app(engine, settings), args.host, args.port, args.drain_timeout,
                      args.log_level)
