"""A real ``captioner serve`` process around the tiny test model (the service's own server and
application; only the model is the tests' tiny one): ``python serve_server.py FOLDER PORT
KEYS_FILE BODY_TIMEOUT DRAIN_TIMEOUT``."""

from __future__ import annotations

import sys
from pathlib import Path

from serve_fixtures import tiny_attention_run, tiny_engine

from captioner.serve.app import Settings, create_app
from captioner.serve.auth import load_keys
from captioner.serve.server import run_server


def main(folder: str, port: str, keys: str, body_timeout: str, drain_timeout: str) -> int:
    run, table, _ = tiny_attention_run(Path(folder))
    engine = tiny_engine(run, table)
    engine.warm_up()
    settings = Settings(api_keys=load_keys(keys), body_timeout=float(body_timeout))
    return run_server(create_app(engine, settings), "127.0.0.1", int(port),
                      float(drain_timeout), "warning")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
