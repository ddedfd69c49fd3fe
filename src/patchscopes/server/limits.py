"""The explorer's bounds on work per request, on the work queue and on connections.

>>> Limits().max_prompt_chars
400
>>> uvicorn_options(Limits())["limit_concurrency"]
100
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Bounds a request must respect; the server answers 4xx/5xx with the bound's name when one is exceeded."""

    max_prompt_chars: int = 400
    max_target_prompt_chars: int = 600
    max_answer_chars: int = 64
    max_new_tokens: int = 40
    max_cells: int = 1024  # source layers × target layers in one request
    max_generated_tokens: int = 4096  # cells × max_new_tokens in one request
    queue_capacity: int = 4  # jobs queued or running; beyond it requests get 429
    workers: int = 1  # threads running model work
    max_results: int = 16  # finished results kept for export
    max_body_bytes: int = 65536
    chunk_cells: int = 32  # Patchscopes per streamed chunk (cancellation and progress granularity)
    request_timeout: float = 120.0  # seconds an inspection may queue and run before it is stopped (504)
    body_timeout: float = 10.0  # seconds a request body may take to arrive (408)
    header_timeout: float = 10.0  # seconds a connection may take to send a request's line and headers (closed)
    max_connections: int = 100  # open connections (idle ones close after header_timeout); beyond it: 503
    keep_alive_timeout: int = 5  # seconds an idle keep-alive connection stays open
    max_header_bytes: int = 16384  # request line and headers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def uvicorn_options(limits: Limits) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.run`` / ``uvicorn.Config`` that apply the connection bounds."""
    from patchscopes.server.protocol import with_header_timeout

    return {
        "http": with_header_timeout(limits.header_timeout),
        "timeout_keep_alive": limits.keep_alive_timeout,
        "limit_concurrency": limits.max_connections,
        "h11_max_incomplete_event_size": limits.max_header_bytes,
        "proxy_headers": False,  # no proxy in front: the peer address is the client
        "server_header": False,
    }
