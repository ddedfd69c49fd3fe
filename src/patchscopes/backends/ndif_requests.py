"""NDIF requests built offline: each serialised exactly as nnsight sends it, deserialised with this package
hidden (as on the server), and run here, so that a request can be checked before any key or network.

    >>> from patchscopes.backends.ndif_requests import build_requests
    >>> plan = build_requests(scopes, lm, "HuggingFaceTB/SmolLM2-135M")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from patchscopes.backends.dry_run import dry_run_backend
from patchscopes.backends.errors import BackendError
from patchscopes.backends.nnsight_backend import run_many_nnsight
from patchscopes.backends.nnsight_model import NNsightModel, as_nnsight
from patchscopes.backends.remote import API_KEY_ENV, api_key, check_hosted, model_key, parse_model_key
from patchscopes.models.loading import ModelHandle


@dataclass
class RemoteRequest:
    """One request as NDIF would receive it: the routing envelope and the serialised trace."""

    model_key: str
    envelope: dict[str, Any]
    payload: bytes
    kind: str  # "source" or "target"

    @property
    def size(self) -> int:
        return len(self.payload)


@dataclass
class RequestPlan:
    """Every request a list of Patchscopes needs, with the host and whether a key is set."""

    host: str
    has_key: bool
    requests: list[RemoteRequest] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)

    def validate(self, hosted: Mapping[str, str] | Iterable[str] | None = None, require_key: bool = False) -> None:
        """Check the envelopes, model keys, hosted list (if given) and key (if required); payloads were
        already deserialised with this package hidden while the plan was built."""
        if require_key:
            api_key()
        if not self.requests:
            raise BackendError("the request plan is empty: no Patchscopes were given")
        for request in self.requests:
            data = parse_model_key(request.model_key)
            if request.envelope.get("model_key") != request.model_key:
                raise BackendError("the envelope names another model than the request's key")
            if not request.payload:
                raise BackendError(f"the {request.kind} request has an empty payload")
            if hosted is not None:
                check_hosted(data["repo_id"], hosted)


def recorder(plan: RequestPlan, key: str) -> Callable[[Any, str], Any]:
    """A factory of nnsight backends that record each serialised request, then run it here as NDIF would."""
    from nnsight.ndif import pull_env
    from nnsight.schema.request import RequestModel

    dry_run = dry_run_backend()

    class RecordingBackend(dry_run):  # type: ignore[valid-type,misc]
        # explicit base calls, no zero-argument super(): nnsight may ship this class by value
        def __init__(self, model: Any, kind: str) -> None:
            dry_run.__init__(self, model)
            self.kind = kind

        def __call__(self, tracer: Any) -> None:
            pull_env()
            blob = RequestModel.serialize(tracer, compress=False)
            envelope = json.loads(RequestModel(model_key=key, compress=False, env=self.model._remoteable_get_env()).metadata())
            plan.requests.append(RemoteRequest(key, envelope, blob, self.kind))
            dry_run.__call__(self, tracer)  # deserialises with this package hidden, then runs

    return RecordingBackend


def build_requests(
    scopes: Sequence[Any],
    stand_in: ModelHandle | NNsightModel,
    repo_id: str,
    revision: str | None = None,
    batch_size: int = 16,
) -> RequestPlan:
    """Build, offline, the NDIF requests for ``scopes`` as if ``stand_in`` were the hosted ``repo_id``.

    Each request is serialised exactly as nnsight serialises it for NDIF, deserialised with this package
    hidden (as on the server), and run on ``stand_in``, so the plan also holds the Patchscope results.

    >>> plan = build_requests(scopes, lm, "HuggingFaceTB/SmolLM2-135M")   # doctest: +SKIP
    >>> plan.validate(hosted=["HuggingFaceTB/SmolLM2-135M"])             # doctest: +SKIP
    """
    from nnsight.schema.config import CONFIG

    key = model_key(repo_id, revision)
    parse_model_key(key)
    plan = RequestPlan(host=CONFIG.API.HOST, has_key=bool(os.environ.get(API_KEY_ENV)))
    base = as_nnsight(stand_in, False)
    nm = NNsightModel(base.handle, base.envoy, remote=False, backend=recorder(plan, key))
    plan.results = run_many_nnsight(scopes, nm, batch_size=batch_size)
    return plan


__all__ = ["RemoteRequest", "RequestPlan", "build_requests", "recorder"]
