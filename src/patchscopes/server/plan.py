"""Check an inspection request against the allow-list and the bounds, and turn it into library calls.

Everything that can be wrong with a request is found here, before any work is queued, so the client
gets a 4xx with a clear message instead of a failure half-way through a stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from patchscopes.errors import PatchscopeError
from patchscopes.models.loading import ModelHandle, context_length
from patchscopes.positions import Placeholder, resolve_positions
from patchscopes.presets import ENTITY_DESCRIPTION, LOGIT_LENS, TOKEN_IDENTITY, Preset, attribute, custom
from patchscopes.scope import SAME, Decoding, Generate, NextToken
from patchscopes.server.errors import LimitError, ServerError
from patchscopes.server.layers import parse_layers
from patchscopes.server.limits import Limits
from patchscopes.server.pool import MapError, MapIndex, ModelPool
from patchscopes.server.schemas import InspectRequest

TOP_K = 5


class InvalidRequestError(ServerError):
    """A request that is well-formed JSON but cannot be run (missing placeholder, bad position, …)."""

    status = 422
    kind = "invalid_request"


@dataclass
class Plan:
    """A checked request: the models, preset, layers and decoding to hand to :func:`patchscopes.sweep.sweep`."""

    request: InspectRequest
    model: ModelHandle
    target_model: ModelHandle
    preset: Preset
    source_layers: list[int]
    target_layers: list[int] | str
    position: int
    source_token: str
    decoding: Decoding
    mapping: Any
    answer_id: int | None
    answer_token: str | None

    @property
    def cells(self) -> int:
        per_layer = 1 if self.target_layers == SAME else len(self.target_layers)
        return len(self.source_layers) * per_layer

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "target_model": self.target_model.name,
            "preset": self.preset.name,
            "target_prompt": self.preset.target_prompt,
            "position": self.position,
            "source_token": self.source_token,
            "source_layers": self.source_layers,
            "target_layers": self.target_layers,
            "grid": self.target_layers != SAME,
            "cells": self.cells,
            "max_new_tokens": self.request.max_new_tokens,
            "answer_token": self.answer_token,
        }


def _over(limit: str, value: int, bound: int, what: str) -> LimitError:
    return LimitError(
        f"{what} is {value}, over this server's {limit}={bound}; ask for less (or restart the server with a larger bound)"
    )


def _preset(req: InspectRequest, limits: Limits) -> Preset:
    if req.preset in ("attribute", "custom"):
        if not req.target_prompt or not req.target_prompt.strip():
            raise InvalidRequestError(
                f"preset {req.preset!r} needs target_prompt, a prompt containing the placeholder {req.placeholder!r}"
            )
        if len(req.target_prompt) > limits.max_target_prompt_chars:
            raise _over(
                "max_target_prompt_chars", len(req.target_prompt), limits.max_target_prompt_chars, "the target prompt length"
            )
        if req.preset == "attribute":
            return attribute(req.target_prompt, placeholder=req.placeholder)
        return custom(req.target_prompt, placeholder=req.placeholder)
    if req.target_prompt is not None:
        raise InvalidRequestError(
            f"preset {req.preset!r} has its own target prompt; send target_prompt only with 'attribute' or 'custom'"
        )
    return {"token-identity": TOKEN_IDENTITY, "entity-description": ENTITY_DESCRIPTION, "logit-lens": LOGIT_LENS}[req.preset]


def make_plan(req: InspectRequest, pool: ModelPool, maps: MapIndex, limits: Limits) -> Plan:
    """Validate ``req`` (loading its models if needed) and return the work it describes."""
    if len(req.prompt) > limits.max_prompt_chars:
        raise _over("max_prompt_chars", len(req.prompt), limits.max_prompt_chars, "the prompt length")
    if not req.prompt.strip():
        raise InvalidRequestError("the prompt is blank; type some text to inspect")
    if req.max_new_tokens > limits.max_new_tokens:
        raise _over("max_new_tokens", req.max_new_tokens, limits.max_new_tokens, "max_new_tokens")
    if req.answer is not None and len(req.answer) > limits.max_answer_chars:
        raise _over("max_answer_chars", len(req.answer), limits.max_answer_chars, "the answer length")
    pool.check(req.model)
    target_name = req.target_model or req.model
    pool.check(target_name)
    preset = _preset(req, limits)
    if target_name != req.model and preset.target_prompt is None:
        raise InvalidRequestError(f"preset {req.preset!r} reuses the source prompt, so it cannot run on another target model")
    if req.preset == "logit-lens" and req.target_layers.strip() != SAME:
        raise InvalidRequestError(
            f"target layers {req.target_layers!r} with the logit lens: it decodes each source layer's state through "
            "the final norm and unembedding, so it has no target layer; send target_layers 'same' (or leave it out), "
            "or choose another preset for a layer grid"
        )
    lm, tlm = pool.get(req.model), pool.get(target_name)
    source_layers = parse_layers(req.source_layers, lm.n_layers)
    target_layers: list[int] | str = SAME if req.target_layers.strip() == SAME else parse_layers(req.target_layers, tlm.n_layers)
    if target_layers == SAME and tlm is not lm and source_layers[-1] >= tlm.n_layers:
        raise InvalidRequestError(
            f"target layers 'same' but source layer {source_layers[-1]} does not "
            f"exist in {tlm.name} ({tlm.n_layers} blocks); give target layers"
        )
    per_layer = 1 if target_layers == SAME else len(target_layers)
    cells = len(source_layers) * per_layer
    if cells > limits.max_cells:
        raise _over("max_cells", cells, limits.max_cells, "source layers × target layers")
    if cells * req.max_new_tokens > limits.max_generated_tokens:
        raise _over("max_generated_tokens", cells * req.max_new_tokens, limits.max_generated_tokens, "cells × max_new_tokens")
    tokens = lm.tokenize(req.prompt)
    if not -len(tokens) <= req.position < len(tokens):
        raise InvalidRequestError(
            f"position {req.position} is outside the prompt's {len(tokens)} tokens; valid: 0..{len(tokens) - 1} or negative"
        )
    n_ctx = context_length(lm)
    if n_ctx is not None and len(tokens) > n_ctx:
        raise LimitError(
            f"the prompt is {len(tokens)} tokens, over {lm.name}'s context length of {n_ctx} tokens; shorten the prompt"
        )
    position = req.position % len(tokens)
    if preset.target_prompt is not None and isinstance(preset.target_position, Placeholder):
        target_tokens = tlm.tokenize(preset.target_prompt)
        t_ctx = context_length(tlm)
        if t_ctx is not None and len(target_tokens) + req.max_new_tokens > t_ctx:
            raise LimitError(
                f"the target prompt ({len(target_tokens)} tokens) plus max_new_tokens={req.max_new_tokens} is over "
                f"{tlm.name}'s context length of {t_ctx} tokens; shorten it or generate fewer tokens"
            )
        try:
            resolve_positions(preset.target_position, preset.target_prompt, target_tokens.offsets)
        except PatchscopeError as exc:
            raise InvalidRequestError(f"target prompt {preset.target_prompt!r}: {exc}") from exc
    mapping = None
    if tlm is not lm:
        mapping = maps.for_request(lm.name, tlm.name)
        for layer in source_layers:  # every requested pair must have a map before any work starts
            for tl in [layer] if target_layers == SAME else target_layers:
                mapping(layer, tl)
    elif lm.hidden_size != tlm.hidden_size:  # pragma: no cover - same handle, same width
        raise MapError("hidden sizes differ")
    decoding: Decoding = (
        NextToken(top_k=TOP_K) if req.max_new_tokens == 0 else Generate(max_new_tokens=req.max_new_tokens, top_k=TOP_K)
    )
    answer_id = answer_token = None
    if req.answer is not None:
        ids = tlm.tokenizer.encode(req.answer, add_special_tokens=False)
        if not ids:
            raise InvalidRequestError(f"answer {req.answer!r} has no tokens; give a word such as ' Paris'")
        answer_id, answer_token = int(ids[0]), tlm.token_strings([int(ids[0])])[0]
    return Plan(
        request=req,
        model=lm,
        target_model=tlm,
        preset=preset.with_decoding(decoding),
        source_layers=source_layers,
        target_layers=target_layers,
        position=position,
        source_token=lm.token_strings([tokens.ids[position]])[0],
        decoding=decoding,
        mapping=mapping,
        answer_id=answer_id,
        answer_token=answer_token,
    )
