"""A uvicorn server in a background thread, for tests that speak real HTTP to the app."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from slimline.serve.connections import uvicorn_config
from slimline.serve.limits import ServerLimits


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    """uvicorn serving the app in a background thread on a free localhost port (guarded when given limits)."""

    def __init__(self, app, limits: ServerLimits | None = None) -> None:
        self.port = free_port()
        if limits is None:
            config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        else:  # slimline's guarded protocol, as `slimline serve` runs it
            config = uvicorn_config(app, "127.0.0.1", self.port, limits, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
