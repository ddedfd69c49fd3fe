"""The Patchscope specification (source, mapping, target, decoding), its JSON form and its result.

Running it is :mod:`patchscopes.runner`'s job (through :mod:`patchscopes.plan` and :mod:`patchscopes.executors`).

>>> from patchscopes import Patchscope, Source, Target, Generate, Placeholder
>>> scope = Patchscope(
...     source=Source("Diana, Princess of Wales", layer=3),
...     target=Target("Syria: Country in the Middle East, x", layer=3, position=Placeholder("x")),
...     decoding=Generate(max_new_tokens=10),
... )
>>> Patchscope.from_json(scope.to_json()) == scope
True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Union

import torch

from patchscopes.chat import ChatOption, check_chat
from patchscopes.errors import SpecError
from patchscopes.hooks import PatchMode
from patchscopes.layers import LayerSpec, Location
from patchscopes.mappings import mapping_from_json, mapping_to_json
from patchscopes.positions import Placeholder, PositionSpec, Substring, position_from_json, position_to_json

SAME = "same"  # target layer/position/prompt taken from the source


@dataclass(frozen=True)
class Source:
    """Where the hidden state comes from: prompt, layer (block output, or ``"embeddings"``), position(s)."""

    prompt: str
    layer: LayerSpec
    position: PositionSpec = -1
    model: str | None = None


DecodeAt = Literal["end", "patch"]


@dataclass(frozen=True)
class Target:
    """Where it goes. ``prompt=None`` reuses the source prompt; ``layer``/``position`` ``"same"`` reuse the source's.

    ``decode_at="end"`` (the default) decodes after the whole target prompt; ``"patch"`` decodes right after the
    last patched position (the target is cut there), as the logit lens reads the position it patched.

    ``chat=True`` wraps the prompt as a user turn with the target tokenizer's chat template (positions are
    then resolved on the templated tokens), ``"auto"`` does so only when the tokenizer ships a template, and
    ``False`` (the default) sends the prompt as written; see :mod:`patchscopes.chat`.
    """

    prompt: str | None = None
    layer: LayerSpec = SAME
    position: PositionSpec | str = -1
    model: str | None = None
    decode_at: DecodeAt = "end"
    chat: ChatOption = False

    def __post_init__(self) -> None:
        if self.decode_at not in ("end", "patch"):
            raise SpecError(f"decode_at {self.decode_at!r} is not 'end' or 'patch'")
        check_chat(self.chat)


@dataclass(frozen=True)
class NextToken:
    """Decode the next-token distribution after the target prompt; keep the ``top_k`` tokens."""

    top_k: int = 10

    def __post_init__(self) -> None:
        _check_top_k(self.top_k)


@dataclass(frozen=True)
class Generate:
    """Generate ``max_new_tokens`` after the target prompt (greedy unless ``temperature > 0``).

    A seeded sample depends only on its own Patchscope: each one draws from its own generator, whatever else
    runs in the same batch.
    """

    max_new_tokens: int = 20
    temperature: float = 0.0
    seed: int | None = None
    top_k: int = 10

    def __post_init__(self) -> None:
        _check_top_k(self.top_k)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SpecError(f"max_new_tokens must be a positive int, not {self.max_new_tokens!r}; use NextToken() for none")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise SpecError(f"temperature must be a number >= 0 (0 is greedy), not {self.temperature!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise SpecError(f"seed must be an int or None, not {self.seed!r}")


def _check_top_k(top_k: object) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise SpecError(f"top_k must be a positive int (how many top tokens to keep), not {top_k!r}")


Decoding = Union[NextToken, Generate]


@dataclass(frozen=True)
class Patchscope:
    """A source location, an optional mapping, a target location, a patch mode and a decoding."""

    source: Source
    target: Target
    mapping: Any = None
    mode: PatchMode = "replace"
    decoding: Decoding = field(default_factory=NextToken)

    def __post_init__(self) -> None:
        if self.mode not in ("replace", "add"):
            raise SpecError(f"mode {self.mode!r} is not 'replace' or 'add'")

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": {**_loc_dict(self.source), "position": position_to_json(self.source.position)},
            "target": {**_target_dict(self.target), "position": _target_position_json(self.target.position)},
            "mapping": mapping_to_json(self.mapping),
            "mode": self.mode,
            "decoding": {"type": type(self.decoding).__name__, **self.decoding.__dict__},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], mapping: Any = None) -> Patchscope:
        dec = dict(data.get("decoding") or {"type": "NextToken"})
        kind = dec.pop("type")
        decoding: Decoding = {"NextToken": NextToken, "Generate": Generate}[kind](**dec)
        src, tgt = dict(data["source"]), dict(data["target"])
        src["position"] = position_from_json(src["position"])
        tgt["position"] = tgt["position"] if tgt["position"] == SAME else position_from_json(tgt["position"])
        if mapping is None:
            mapping = mapping_from_json(data.get("mapping"))
        return cls(Source(**src), Target(**tgt), mapping=mapping, mode=data.get("mode", "replace"), decoding=decoding)

    @classmethod
    def from_json(cls, text: str, mapping: Any = None) -> Patchscope:
        return cls.from_dict(json.loads(text), mapping=mapping)

    def __str__(self) -> str:
        s, t = self.source, self.target
        tprompt = "<source prompt>" if t.prompt is None else repr(t.prompt)
        if t.chat is not False:
            tprompt += f" (chat={t.chat!r})"
        mapping = "" if self.mapping is None else f" --{self.mapping!r}-->"
        return (
            f"Patchscope[{s.model or 'model'} {s.prompt!r} @ layer {s.layer}, pos {s.position}{mapping} "
            f"→ {t.model or 'model'} {tprompt} @ layer {t.layer}, pos {t.position}; {self.mode}; {self.decoding}]"
        )


def _target_position_json(position: PositionSpec | str) -> Any:
    return position if position == SAME else position_to_json(position)  # type: ignore[arg-type]


def _loc_dict(loc: Source | Target) -> dict[str, Any]:
    return {k: v for k, v in loc.__dict__.items() if k != "position"}


def _target_dict(target: Target) -> dict[str, Any]:
    """The target's fields; ``chat`` only when set, so a raw target's JSON is what it always was."""
    data = _loc_dict(target)
    if data.get("chat") is False:
        del data["chat"]
    return data


@dataclass
class PatchscopeResult:
    """What a Patchscope decoded: the next-token distribution and, when generating, the text.

    ``chat_text`` is the text the target model read when the target was wrapped with a chat template
    (``None`` when it read the prompt as written).
    """

    scope: Patchscope
    source_positions: list[int]
    target_positions: list[int]
    source_layer: Location
    target_layer: Location
    source_tokens: list[str]
    logits: torch.Tensor
    top_ids: list[int]
    top_tokens: list[str]
    top_probs: list[float]
    generated_ids: list[int]
    text: str
    chat_text: str | None = None

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)

    def __repr__(self) -> str:
        shown = ", ".join(f"{t!r}:{p:.2f}" for t, p in zip(self.top_tokens[:5], self.top_probs[:5]))
        return (
            f"PatchscopeResult(layer {self.source_layer}→{self.target_layer}, source tokens {self.source_tokens}, "
            f"text={self.text!r}, top=[{shown}])"
        )

    def _repr_html_(self) -> str:
        """What a notebook shows: the layers, source tokens, decoded text and top tokens with bars."""
        from patchscopes.display import result_html

        return result_html(self)


def with_layers(scope: Patchscope, source_layer: LayerSpec, target_layer: LayerSpec) -> Patchscope:
    """A copy of ``scope`` with other source and target layers."""
    return replace(scope, source=replace(scope.source, layer=source_layer), target=replace(scope.target, layer=target_layer))


__all__ = [
    "SAME",
    "Decoding",
    "Generate",
    "NextToken",
    "Patchscope",
    "PatchscopeResult",
    "Placeholder",
    "Source",
    "Substring",
    "Target",
    "with_layers",
]
