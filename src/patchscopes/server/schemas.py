"""Request bodies of the explorer's API (pydantic; they appear in the OpenAPI document at ``/docs``).

Static bounds here reject absurd input early; the server's :class:`~patchscopes.server.limits.Limits`
apply the configured bounds with a message naming the limit.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictInt

#: A registry-style model name: letters, digits, dot, dash, underscore. Never a path.
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

PresetName = Literal["token-identity", "entity-description", "attribute", "custom", "logit-lens"]


class TokenizeRequest(BaseModel):
    """A prompt to split into tokens with the model's tokenizer."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=MODEL_NAME, description="A model on the server's allow-list.")
    prompt: str = Field(min_length=1, max_length=10_000, description="The source prompt.")


class InspectRequest(BaseModel):
    """One inspection: a source prompt and token, an inspection prompt, layers and decoding."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "SmolLM2-135M",
                    "prompt": "Diana, Princess of Wales",
                    "position": -1,
                    "preset": "token-identity",
                    "source_layers": "0-29:3",
                    "target_layers": "same",
                    "max_new_tokens": 0,
                }
            ]
        },
    )

    model: str = Field(pattern=MODEL_NAME, description="Source model (allow-listed name).")
    target_model: Optional[str] = Field(
        default=None, pattern=MODEL_NAME, description="Target model; another model needs a fitted map loaded at start."
    )
    prompt: str = Field(min_length=1, max_length=10_000, description="The source prompt.")
    position: StrictInt = Field(default=-1, ge=-10_000, le=10_000, description="Source token index (negative from the end).")
    preset: PresetName = Field(default="token-identity", description="The inspection prompt to patch into.")
    target_prompt: Optional[str] = Field(
        default=None, max_length=10_000, description="For 'attribute' and 'custom': a prompt containing the placeholder."
    )
    placeholder: str = Field(default="x", min_length=1, max_length=16, description="The placeholder word in target_prompt.")
    source_layers: str = Field(default="all", max_length=200, description="Source layers: all, 0-10, 0-29:3, 1,5,9 …")
    target_layers: str = Field(default="same", max_length=200, description="'same' (ℓ* = ℓ) or a layer list for a grid.")
    max_new_tokens: StrictInt = Field(default=0, ge=0, le=10_000, description="Tokens to generate per cell; 0 = next token only.")
    answer: Optional[str] = Field(
        default=None, max_length=10_000, description="Also report the probability of this answer's first token (e.g. ' Paris')."
    )


class ErrorBody(BaseModel):
    """Every error answer: a short kind and a message naming the bad value and the fix."""

    error: str = Field(description="e.g. invalid_request, over_limit, bad_layers, model_not_allowed, no_map, queue_full")
    message: str


class Row(BaseModel):
    """One Patchscope of an inspection: what the state of the chosen token at layer ℓ decodes to at ℓ*."""

    source_layer: int
    target_layer: int
    text: str = Field(description="Generated text (or the top token when only the next token is decoded).")
    summary: str = Field(description="The text up to the end of its first few-shot entry.")
    top_tokens: list[str]
    top_probs: list[Optional[float]]
    top1: str
    top1_prob: Optional[float]
    answer_prob: Optional[float] = Field(default=None, description="Probability of the answer's first token, when asked.")


class InspectResponse(BaseModel):
    """All rows of an inspection, the checked plan, and the id for ``/api/results/{id}/csv`` and ``/png``."""

    result_id: str
    plan: dict[str, object]
    rows: list[Row]
    elapsed_s: float
    cached: bool = False


ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorBody, "description": "A model that is not on the allow-list"},
    408: {"model": ErrorBody, "description": "A request body that did not arrive within body_timeout"},
    413: {"model": ErrorBody, "description": "A request body over max_body_bytes"},
    422: {"model": ErrorBody, "description": "Malformed or over a bound (prompt length, layers, tokens), or no map"},
    429: {"model": ErrorBody, "description": "The work queue is full; see the Retry-After header"},
    504: {"model": ErrorBody, "description": "The inspection ran past request_timeout and was stopped"},
}
