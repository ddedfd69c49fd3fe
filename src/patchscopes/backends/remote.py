"""Remote execution on NDIF (the National Deep Inference Fabric) through nnsight.

NDIF runs nnsight traces on models it hosts (70B+ included); the weights never leave the server. A
Patchscope sent there is two requests: the source capture and the patched decode, each an nnsight
``generate``/``trace`` block serialised by nnsight (its source text plus the tensors it uses). The
mapping between them runs on the client.

What it needs: an NDIF API key in ``NDIF_API_KEY`` (https://login.ndif.us), network access, and a
model that NDIF currently hosts (``hosted_models()`` lists them). Without a key,
:class:`~patchscopes.backends.errors.MissingAPIKeyError` says so before anything is sent.

    >>> from patchscopes.backends.remote import ndif_model
    >>> from patchscopes.backends.nnsight_backend import run_many_nnsight
    >>> llama = ndif_model("meta-llama/Llama-3.1-70B")                 # doctest: +SKIP
    >>> results = run_many_nnsight(scopes, llama)                       # doctest: +SKIP

Offline, :func:`patchscopes.backends.ndif_requests.build_requests` builds the exact requests that would be sent
(model key, routing envelope, serialised payloads), validates them by deserialising each payload with this package hidden,
as NDIF's server would, and runs the deserialised blocks on a local stand-in model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from patchscopes.backends.errors import BackendError, MissingAPIKeyError, ModelNotHostedError
from patchscopes.backends.nnsight_model import NNsightModel, require_nnsight
from patchscopes.models.loading import from_model

API_KEY_ENV = "NDIF_API_KEY"
TASK = "text-generation"
WRAPPER = "nnsight.modeling.transformers.TransformersModel"  # the class NDIF rebuilds for a language model


def api_key(environ: Mapping[str, str] | None = None) -> str:
    """The NDIF API key from ``NDIF_API_KEY``, or a :class:`MissingAPIKeyError` saying how to set it."""
    env = os.environ if environ is None else environ
    key = (env.get(API_KEY_ENV) or "").strip()
    if not key:
        raise MissingAPIKeyError(
            f"remote execution on NDIF needs an API key in the environment variable {API_KEY_ENV}; "
            f"get one at https://login.ndif.us and run `export {API_KEY_ENV}=<your key>` (or run locally with remote=False)"
        )
    return key


def fetch_status(timeout: float = 10.0) -> dict[str, Any]:
    """NDIF's raw ``/status`` JSON from the configured host (``NDIF_HOST`` overrides it).

    Unlike ``nnsight.status()``, an unreachable service is an error here, not an empty list of models.
    """
    import httpx

    require_nnsight()
    from nnsight.schema.config import CONFIG

    host = CONFIG.API.HOST
    try:
        response = httpx.get(f"{host}/status", timeout=timeout)
        response.raise_for_status()
        return dict(response.json())
    except (httpx.HTTPError, ValueError) as exc:
        message = f"could not reach NDIF at {host} to list hosted models ({exc}); check the network, or NDIF_HOST"
        raise BackendError(message) from exc


def hosted_models(status: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Repo ids NDIF hosts now, with their state (``RUNNING``, ``DEPLOYING``, …).

    ``status`` is NDIF's raw ``/status`` JSON; without it the live service is asked (needs the network).
    """
    if status is None:
        status = fetch_status()
    deployments = (status or {}).get("deployments", {})
    hosted: dict[str, str] = {}
    for name, entry in deployments.items():
        repo = entry.get("repo_id") or name
        state = entry.get("application_state", "UNKNOWN")
        if hosted.get(repo) != "RUNNING":
            hosted[repo] = state
    return hosted


def check_hosted(repo_id: str, hosted: Mapping[str, str] | Iterable[str]) -> None:
    """Raise :class:`ModelNotHostedError` unless ``repo_id`` is among the hosted models (and running)."""
    states = hosted if isinstance(hosted, Mapping) else {r: "RUNNING" for r in hosted}
    if repo_id not in states:
        listed = ", ".join(sorted(states)) or "none (NDIF reported no deployments)"
        raise ModelNotHostedError(
            f"{repo_id!r} is not hosted on NDIF; hosted models: {listed}. Run it locally instead "
            "(load_model + remote=False) or pick a hosted model"
        )
    if states[repo_id] != "RUNNING":
        raise ModelNotHostedError(f"{repo_id!r} is on NDIF but {states[repo_id]}, not RUNNING; retry later")


def model_key(repo_id: str, revision: str | None = None) -> str:
    """The key nnsight sends to name a hosted model: the wrapper class's import path and the checkpoint.

    ``revision=None`` is the default branch, as nnsight writes it.

    >>> model_key("openai-community/gpt2").split(":", 1)[1]
    '{"repo_id": "openai-community/gpt2", "revision": null, "task": "text-generation"}'
    """
    checkpoint = json.dumps({"repo_id": repo_id, "revision": revision, "task": TASK})
    return f"{WRAPPER}:{checkpoint}"


def parse_model_key(key: str) -> dict[str, Any]:
    """Split and check a model key: the class must be nnsight's ``TransformersModel``, the checkpoint JSON complete."""
    if ":" not in key:
        raise BackendError(f"model key {key!r} has no ':' between the wrapper class and the checkpoint")
    cls, _, rest = key.partition(":")
    if cls != WRAPPER:
        raise BackendError(f"model key names wrapper {cls!r}; NDIF language models use {WRAPPER}")
    try:
        data = json.loads(rest)
    except json.JSONDecodeError as exc:
        raise BackendError(f"model key checkpoint part {rest!r} is not JSON") from exc
    missing = [k for k in ("repo_id", "revision", "task") if k not in data]
    if missing:
        raise BackendError(f"model key {key!r} lacks {', '.join(missing)}")
    return data


def check_remote_ready(nm: NNsightModel, hosted: Mapping[str, str] | Iterable[str] | None = None) -> None:
    """Before a real remote run: the key is set (and handed to nnsight), and the model is hosted."""
    key = api_key()
    nnsight = require_nnsight()
    nnsight.CONFIG.API.APIKEY = key
    repo = getattr(nm.envoy, "repo_id", None) or nm.name
    check_hosted(repo, hosted_models() if hosted is None else hosted)


def ndif_model(repo_id: str, revision: str | None = None, check: bool = True) -> NNsightModel:
    """A hosted model for remote runs: nnsight builds its structure on the meta device (no weights download).

    Needs the model's config and tokenizer (from the hub or its local cache), and with ``check`` the key
    and the hosted list. The returned wrapper runs every trace on NDIF.
    """
    if check:
        api_key()
        check_hosted(repo_id, hosted_models())
    require_nnsight()
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=revision)
    envoy = TransformersModel(repo_id, revision=revision, task=TASK, tokenizer=tokenizer)
    handle = from_model(envoy._module, envoy.tokenizer, name=repo_id, source=f"ndif:{repo_id}")
    return NNsightModel(handle, envoy, remote=True)


__all__ = [
    "API_KEY_ENV",
    "api_key",
    "check_hosted",
    "check_remote_ready",
    "fetch_status",
    "hosted_models",
    "model_key",
    "ndif_model",
    "parse_model_key",
]
