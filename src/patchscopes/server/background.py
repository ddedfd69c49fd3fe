"""Run the explorer in a background thread of this process (tests, the load test, notebooks).

>>> with serve_in_thread(create_app(["SmolLM2-135M"])) as url:   # doctest: +SKIP
...     print(url)
http://127.0.0.1:43125
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from patchscopes.server.limits import Limits, uvicorn_options


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0) -> Iterator[str]:
    """Start uvicorn on ``host:port`` (a free port by default), yield its base URL, stop it on exit.

    The connection bounds of the app's :class:`~patchscopes.server.limits.Limits` apply, as with ``serve``.
    """
    port = port or free_port(host)
    limits = getattr(app.state, "limits", None) or Limits()
    options = uvicorn_options(limits)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="patchscopes-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the explorer did not start on {host}:{port} within {timeout} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
