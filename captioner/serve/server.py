"""Running the service: uvicorn with a graceful drain.

On the first SIGTERM or SIGINT the service keeps its socket open but answers every new request
503 with ``Retry-After`` (``/healthz`` says ``draining``, so a load balancer takes it out of
rotation), finishes every request it had already accepted, then exits 0 — at the latest
``drain_timeout`` seconds after the signal. A second signal stops it at once.
"""

from __future__ import annotations

import sys
import threading
import time

import uvicorn  # the serve extra; this module is imported only to run the service

from captioner.serve.frontdoor import ServiceState

POLL_S = 0.05
HARD_HEADER_BYTES = 65_536  # h11's limit on a request's head; the middleware refuses > 16 KiB in JSON


def run_server(app, host: str, port: int, drain_timeout: float = 30.0,
               log_level: str = "info") -> int:
    """Serve ``app`` (from :func:`~captioner.serve.app.create_app`) until drained; exit 0."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            h11_max_incomplete_event_size=HARD_HEADER_BYTES,
                            timeout_graceful_shutdown=max(1, int(drain_timeout)))
    DrainingServer(config, app.state.service, drain_timeout).run()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first signal drains instead of closing the socket."""

    def __init__(self, config: uvicorn.Config, service: ServiceState, drain_timeout: float):
        super().__init__(config)
        self.service, self.drain_timeout = service, drain_timeout

    def handle_exit(self, sig, frame) -> None:
        if self.service.draining:  # a second signal: stop now
            self.force_exit = self.should_exit = True
            return
        self.service.draining = True
        print(f"draining: no new requests; finishing {self.service.in_flight} in flight "
              f"(at most {self.drain_timeout:g} s)", file=sys.stderr, flush=True)
        threading.Thread(target=self._drain, name="captioner-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        time.sleep(POLL_S)  # a request that just arrived reaches the middleware
        while self.service.in_flight and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self.should_exit = True
