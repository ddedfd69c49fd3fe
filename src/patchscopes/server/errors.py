"""Errors the explorer answers with a JSON body ``{"error": <kind>, "message": <text>}`` and a status code."""

from __future__ import annotations

from patchscopes.errors import PatchscopeError


class ServerError(PatchscopeError):
    """Base of the explorer's errors; ``status`` is the HTTP status code sent with the message."""

    status = 400
    kind = "bad_request"


class ModelNotAllowedError(ServerError):
    """A model name that is not on the allow-list the server was started with."""

    status = 400
    kind = "model_not_allowed"


class LimitError(ServerError):
    """A request over one of the server's bounds (prompt length, layers, generated tokens, …)."""

    status = 422
    kind = "over_limit"


class QueueFullError(ServerError):
    """The work queue is full; retry after ``retry_after`` seconds."""

    status = 429
    kind = "queue_full"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ResultNotFoundError(ServerError):
    """A result id the server does not hold (never made, or evicted from the bounded result cache)."""

    status = 404
    kind = "result_not_found"


class CancelledError(ServerError):
    """The work was cancelled (its client went away)."""

    status = 499
    kind = "cancelled"


class RequestTimeoutError(ServerError):
    """The inspection queued and ran past the server's ``request_timeout`` and was stopped."""

    status = 504
    kind = "timeout"
