"""The Patchscope specification (source, mapping, target, decoding) and running it.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Union

import torch

from patchscopes.capture import EMBEDDINGS, LayerSpec, capture, resolve_layer
from patchscopes.engine import fast_eligible, fast_engine_problem, run_patched_fast
from patchscopes.errors import EngineError, MappingError, PatchscopeError, SpecError, warn_once
from patchscopes.mappings import AffineMap, as_mapping, mapping_from_json, mapping_to_json
from patchscopes.models.loading import ModelHandle
from patchscopes.patching import Patch, PatchedRun, PatchMode, run_patched
from patchscopes.positions import Placeholder, PositionSpec, Substring, position_from_json, position_to_json, resolve_positions

SAME = "same"  # target layer/position/prompt taken from the source
Engine = Literal["auto", "fast", "plain"]
Backend = Literal["native", "nnsight"]


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
    """

    prompt: str | None = None
    layer: LayerSpec = SAME
    position: PositionSpec | str = -1
    model: str | None = None
    decode_at: DecodeAt = "end"

    def __post_init__(self) -> None:
        if self.decode_at not in ("end", "patch"):
            raise SpecError(f"decode_at {self.decode_at!r} is not 'end' or 'patch'")


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
            "target": {**_loc_dict(self.target), "position": _target_position_json(self.target.position)},
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
        mapping = "" if self.mapping is None else f" --{self.mapping!r}-->"
        return (
            f"Patchscope[{s.model or 'model'} {s.prompt!r} @ layer {s.layer}, pos {s.position}{mapping} "
            f"→ {t.model or 'model'} {tprompt} @ layer {t.layer}, pos {t.position}; {self.mode}; {self.decoding}]"
        )


def _target_position_json(position: PositionSpec | str) -> Any:
    return position if position == SAME else position_to_json(position)  # type: ignore[arg-type]


def _loc_dict(loc: Source | Target) -> dict[str, Any]:
    return {k: v for k, v in loc.__dict__.items() if k != "position"}


@dataclass
class PatchscopeResult:
    """What a Patchscope decoded: the next-token distribution and, when generating, the text."""

    scope: Patchscope
    source_positions: list[int]
    target_positions: list[int]
    source_layer: int | str
    target_layer: int
    source_tokens: list[str]
    logits: torch.Tensor
    top_ids: list[int]
    top_tokens: list[str]
    top_probs: list[float]
    generated_ids: list[int]
    text: str

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)

    def __repr__(self) -> str:
        shown = ", ".join(f"{t!r}:{p:.2f}" for t, p in zip(self.top_tokens[:5], self.top_probs[:5]))
        return (
            f"PatchscopeResult(layer {self.source_layer}→{self.target_layer}, source tokens {self.source_tokens}, "
            f"text={self.text!r}, top=[{shown}])"
        )


@dataclass
class _Resolved:
    scope: Patchscope
    src_ids: list[int]
    src_positions: list[int]
    src_layer: int
    tgt_ids: list[int]
    tgt_positions: list[int]
    tgt_layer: int
    mapping: Callable[[torch.Tensor], torch.Tensor]


def _resolve(scope: Patchscope, lm: ModelHandle, tlm: ModelHandle) -> _Resolved:
    s, t = scope.source, scope.target
    for loc, handle, role in ((s, lm, "source"), (t, tlm, "target")):
        if loc.model is not None and loc.model != handle.name:
            raise SpecError(f"the {role} names model {loc.model!r} but runs on {handle.name!r}; pass the matching model")
    src_tok = lm.tokenize(s.prompt)
    src_positions = resolve_positions(s.position, s.prompt, src_tok.offsets)
    src_layer = resolve_layer(s.layer, lm.n_layers)
    tgt_prompt = s.prompt if t.prompt is None else t.prompt
    if t.prompt is None and tlm is not lm and tlm.tokenizer is not lm.tokenizer:
        raise SpecError("a target without a prompt reuses the source prompt, which needs the same model or tokenizer")
    tgt_tok = tlm.tokenize(tgt_prompt)
    if t.position == SAME:
        tgt_positions = list(src_positions)
    else:
        tgt_positions = resolve_positions(t.position, tgt_prompt, tgt_tok.offsets)  # type: ignore[arg-type]
    if t.layer == SAME:
        if src_layer == -1:
            raise SpecError(f"target layer 'same' with source layer {EMBEDDINGS!r}: give the target layer explicitly")
        tgt_layer = resolve_layer(s.layer, tlm.n_layers)
    else:
        tgt_layer = resolve_layer(t.layer, tlm.n_layers)
    if len(src_positions) != len(tgt_positions):
        raise SpecError(
            f"{len(src_positions)} source position(s) {src_positions} but {len(tgt_positions)} target position(s) "
            f"{tgt_positions}: multi-token patching pairs them one to one"
        )
    if t.decode_at == "patch":
        tgt_tok_ids = tgt_tok.ids[: max(tgt_positions) + 1]  # later positions cannot change the patched one
    else:
        tgt_tok_ids = tgt_tok.ids
    mapping = as_mapping(scope.mapping)
    if isinstance(mapping, AffineMap):
        mapping.check_provenance(lm, tlm, src_layer, tgt_layer)
    elif scope.mapping is None and lm.hidden_size != tlm.hidden_size:
        raise MappingError(
            f"incompatible hidden sizes: {lm.name} has {lm.hidden_size}, {tlm.name} has {tlm.hidden_size}; "
            "pass mapping= an AffineMap fitted between them (see patchscopes.mappings)"
        )
    return _Resolved(scope, src_tok.ids, src_positions, src_layer, tgt_tok_ids, tgt_positions, tgt_layer, mapping)


def run_many(
    scopes: Sequence[Patchscope],
    model: ModelHandle,
    target_model: ModelHandle | None = None,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    engine: Engine = "auto",
    backend: Backend = "native",
    remote: bool | str = False,
) -> list[PatchscopeResult]:
    """Run many Patchscopes; sources are captured once per prompt, targets run in batches.

    ``engine="auto"`` uses the fast engine (:mod:`patchscopes.engine`: shared target prefixes, skipped
    layers) wherever it applies — a model that passed its self-check, greedy decoding, one block-layer patch —
    and the plain padded-batch engine elsewhere, with one warning when a model fails the check; ``"plain"``
    always uses the plain one, ``"fast"`` requires the fast one and raises :class:`EngineError` where it cannot run.
    ``backend="nnsight"`` compiles the same Patchscopes into nnsight traces instead (``remote=True`` runs them
    on NDIF; see :mod:`patchscopes.backends`); ``engine`` then does not apply.
    """
    if engine not in ("auto", "fast", "plain"):
        raise SpecError(f"engine {engine!r} is not 'auto', 'fast' or 'plain'")
    if backend == "nnsight":
        from patchscopes.backends.nnsight_backend import run_many_nnsight

        return run_many_nnsight(scopes, model, target_model, batch_size, remote=remote or None, on_batch=on_batch)  # type: ignore[arg-type]
    if backend != "native":
        raise SpecError(f"backend {backend!r} is not 'native' or 'nnsight'")
    tlm = target_model or model
    resolved = [_resolve(s, model, tlm) for s in scopes]
    # capture: one pass per distinct (source prompt, positions), all needed layers at once
    keys: dict[tuple, set[int]] = {}
    for r in resolved:
        keys.setdefault((tuple(r.src_ids), tuple(r.src_positions)), set()).add(r.src_layer)
    key_list = list(keys)
    layer_lists = [sorted(keys[k]) for k in key_list]
    states: dict[tuple, torch.Tensor] = {}
    # group prompts by their layer sets so that one capture call serves each group
    by_layers: dict[tuple[int, ...], list[tuple]] = {}
    for k, layer_list in zip(key_list, layer_lists):
        by_layers.setdefault(tuple(layer_list), []).append(k)
    for layers, group in by_layers.items():
        captured = capture(model, [list(k[0]) for k in group], [list(k[1]) for k in group], list(layers), batch_size)
        for k, tensor in zip(group, captured):
            for i, layer in enumerate(layers):
                states[(k, layer)] = tensor[i]
    runs: list[PatchedRun] = []
    for r in resolved:
        h = states[((tuple(r.src_ids), tuple(r.src_positions)), r.src_layer)]
        with torch.no_grad():
            mapped = r.mapping(h.to(_mapping_device(r.mapping) or model.device))
        if mapped.shape[-1] != tlm.hidden_size:
            raise MappingError(f"the mapping returns size {mapped.shape[-1]} but {tlm.name} has hidden size {tlm.hidden_size}")
        runs.append(PatchedRun(r.tgt_ids, [Patch(r.tgt_layer, r.tgt_positions, mapped, r.scope.mode)]))
    # decode: group by decoding settings
    results: list[PatchscopeResult | None] = [None] * len(resolved)
    groups: dict[Decoding, list[int]] = {}
    for i, r in enumerate(resolved):
        groups.setdefault(r.scope.decoding, []).append(i)
    for decoding, idx in groups.items():
        max_new = decoding.max_new_tokens if isinstance(decoding, Generate) else 0
        temperature = decoding.temperature if isinstance(decoding, Generate) else 0.0
        seed = decoding.seed if isinstance(decoding, Generate) else None
        fast = _fast_members(engine, tlm, [runs[i] for i in idx], temperature)
        fast = [idx[j] for j in fast]
        chosen = set(fast)
        plain = [i for i in idx if i not in chosen]
        if fast:
            try:
                outs = run_patched_fast(tlm, [runs[i] for i in fast], max_new, batch_size, temperature, seed, on_batch)
            except PatchscopeError:  # the caller's own error (a cancellation, a bad input) stops the run as it is
                raise
            except Exception as exc:
                if engine == "fast":
                    raise EngineError(f"the fast engine failed on {tlm.name}: {type(exc).__name__}: {exc}") from exc
                warn_once(
                    f"fast-failed:{id(tlm.model)}",
                    f"fast engine failed on {tlm.name} ({type(exc).__name__}: {exc}); using the plain engine",
                )
                plain, fast = sorted(plain + fast), []
            else:
                for i, out in zip(fast, outs):
                    results[i] = _result(resolved[i], out.logits, out.generated, model, tlm, decoding.top_k)
        if plain:
            outs = run_patched(tlm, [runs[i] for i in plain], max_new, batch_size, temperature, seed, on_batch)
            for i, out in zip(plain, outs):
                results[i] = _result(resolved[i], out.logits, out.generated, model, tlm, decoding.top_k)
    return [r for r in results if r is not None]


def _fast_members(engine: Engine, tlm: ModelHandle, runs: Sequence[PatchedRun], temperature: float) -> list[int]:
    """Which runs go through the fast engine; ``engine="fast"`` raises where it cannot run them exactly."""
    if engine == "plain" or not runs:
        return []
    if temperature > 0:
        if engine == "fast":
            raise EngineError("the fast engine runs greedy decoding only; use engine='auto' or 'plain' to sample")
        return []
    eligible = [j for j, run in enumerate(runs) if fast_eligible(run)]
    if engine == "fast" and len(eligible) < len(runs):
        raise EngineError(
            "the fast engine patches one block layer per run; embeddings patches and several patches per run "
            "need engine='auto' or 'plain'"
        )
    if not eligible:
        return []
    problem = fast_engine_problem(tlm)
    if problem is not None:
        if engine == "fast":
            raise EngineError(f"the fast engine cannot run {tlm.name} exactly: its {problem}; use engine='auto' or 'plain'")
        warn_once(f"fast-check:{id(tlm.model)}", f"{tlm.name}: using the plain engine, since the fast engine's {problem}")
        return []
    return eligible


def _result(
    r: _Resolved, logits: torch.Tensor, generated: list[int], lm: ModelHandle, tlm: ModelHandle, top_k: int
) -> PatchscopeResult:
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, min(top_k, probs.shape[-1]))
    top_ids = top.indices.tolist()
    top_tokens = tlm.token_strings(top_ids)
    text = tlm.tokenizer.decode(generated) if isinstance(r.scope.decoding, Generate) else top_tokens[0]
    return PatchscopeResult(
        scope=r.scope,
        source_positions=r.src_positions,
        target_positions=r.tgt_positions,
        source_layer=EMBEDDINGS if r.src_layer == -1 else r.src_layer,
        target_layer=r.tgt_layer,
        source_tokens=lm.token_strings([r.src_ids[p] for p in r.src_positions]),
        logits=logits,
        top_ids=top_ids,
        top_tokens=top_tokens,
        top_probs=[float(p) for p in top.values],
        generated_ids=generated,
        text=text,
    )


def _mapping_device(mapping: Any) -> torch.device | None:
    """Where a mapping's weights live (it runs there); None for weightless mappings."""
    if isinstance(mapping, torch.nn.Module):
        for tensor in (*mapping.parameters(), *mapping.buffers()):
            return tensor.device
    return None


#: Public names for backends that reuse the resolution and result building of the native engine.
resolve_scope = _resolve
make_result = _result


def run(scope: Patchscope, model: ModelHandle, target_model: ModelHandle | None = None) -> PatchscopeResult:
    """Run one Patchscope.

    >>> result = run(scope, lm)   # doctest: +SKIP
    >>> result.text               # doctest: +SKIP
    """
    return run_many([scope], model, target_model)[0]


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
    "run",
    "run_many",
    "with_layers",
]
