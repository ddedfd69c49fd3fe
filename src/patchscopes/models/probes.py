"""Two cheap probes every loaded model passes before the library reads or writes its hidden states.

1. **Logit lens.** The last block's output, through the adapter's final norm and unembedding, gives the
   model's own logits. This checks the blocks, the norm, the head and any logit scaling the adapter knows.
   When a discovered adapter picked the wrong norm, the probe tries the other candidates and keeps the one
   that matches.
2. **Identity write.** Writing every block's own output back (and the embeddings' into block 0) changes
   nothing. This checks that the hook primitive reads and writes the hidden state inside whatever the
   blocks return (a tensor or a tuple).

A failure raises :class:`~patchscopes.errors.ModelCheckError` naming the model type, the probe, the size of
the difference and what to pass instead. The verdict is kept per model object, so it runs once.

>>> from patchscopes.models.probes import tolerance
>>> tolerance(torch.float32, 10.0)
0.001
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from patchscopes import compat
from patchscopes.errors import ModelCheckError
from patchscopes.models.adapters import ArchSpec

if TYPE_CHECKING:
    from patchscopes.models.loading import ModelHandle

PROBE_TEXT = "The Eiffel Tower is in Paris, and the Colosseum is in"


@dataclass(frozen=True)
class ProbeReport:
    """What the load-time probes saw: the differences measured and how the blocks are called."""

    model_type: str
    logit_lens_diff: float
    identity_diff: float
    final_norm: str | None
    block_output: str  # "tensor" or "tuple"
    cache_keyword: str | None  # the keyword a block receives its KV cache under (None: no cache seen)


#: model → {the adapter's spec as given: (the spec the probes settled on, their report)}
_REPORTS: weakref.WeakKeyDictionary[nn.Module, dict[ArchSpec, tuple[ArchSpec, ProbeReport]]] = weakref.WeakKeyDictionary()


def tolerance(dtype: torch.dtype, scale: float) -> float:
    """Allowed |Δ logit| between two computations of the same logits: float noise relative to their size."""
    relative = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    return relative * max(1.0, scale)


def _model_type(lm: ModelHandle) -> str:
    return str(getattr(getattr(lm.model, "config", None), "model_type", type(lm.model).__name__))


def _can_run(model: nn.Module) -> bool:
    """False for a weightless (meta) model, such as the local stand-in of a remote one."""
    params = list(model.parameters())
    return hasattr(model, "hf_device_map") or (bool(params) and not all(p.device.type == "meta" for p in params))


@torch.no_grad()
def probe(lm: ModelHandle) -> ProbeReport | None:
    """Run both probes on ``lm`` (once per model object); None for a model without local weights.

    Raises :class:`ModelCheckError` when one fails.
    """
    given = lm.adapter.spec
    known = _REPORTS.get(lm.model, {}).get(given)
    if known is not None:
        settled, report = known
        if settled != given:
            _use(lm, settled)
        return report
    if not _can_run(lm.model):
        return None
    from patchscopes.hooks import at_locations, hidden_of
    from patchscopes.layers import EMBEDDINGS

    ids = lm.tokenize(PROBE_TEXT).ids[:10]
    device = lm.device
    if device.type == "meta":  # disk-offloaded weights: accelerate's hooks move the inputs where they run
        device = torch.device("cpu")
    input_ids = torch.tensor([ids], device=device)
    last = lm.n_layers - 1
    seen: dict[str, object] = {}

    def observe_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = compat.find_cache(args, kwargs)
        seen["cache_keyword"] = next((k for k, v in kwargs.items() if v is cache), None) if cache is not None else None

    def observe_output(module: nn.Module, args: tuple, output: object) -> None:
        seen["block_output"] = "tensor" if isinstance(output, torch.Tensor) else "tuple"
        seen["hidden"] = hidden_of(output).detach().clone()

    handles = [
        lm.adapter.blocks[0].register_forward_pre_hook(observe_call, with_kwargs=True),
        lm.adapter.blocks[last].register_forward_hook(observe_output),
    ]
    try:
        try:
            reference = lm.model(input_ids=input_ids, use_cache=True).logits.float()
        except Exception:  # some hybrid models cannot start a cache from a short prompt; the probe needs none
            seen.clear()
            reference = lm.model(input_ids=input_ids, use_cache=False).logits.float()
    except Exception as exc:
        raise ModelCheckError(
            f"{_model_type(lm)}: the probe's forward pass failed ({type(exc).__name__}: {exc}); the model does not run "
            "on plain input_ids, so the library cannot patch it"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    if "hidden" not in seen:
        raise ModelCheckError(
            f"{_model_type(lm)}: the forward pass never ran block {last} at {lm.adapter.spec.blocks!r}; "
            "pass adapter=ArchSpec(blocks=...) with the path of the decoder layers the model runs"
        )
    scale = float(reference.abs().max())
    allowed = tolerance(lm.dtype, scale)
    hidden = seen["hidden"]
    assert isinstance(hidden, torch.Tensor)
    try:
        lens_diff = _lens_diff(lm, hidden, reference)
    except Exception:  # the guessed head does not take the hidden state: try the others
        lens_diff = float("inf")
    if lens_diff > allowed:
        lens_diff = _repair_final_norm(lm, hidden, reference, allowed, lens_diff)

    def write_back(layer: object, h: torch.Tensor) -> torch.Tensor:
        return h.clone()

    with at_locations(lm.adapter.blocks, [EMBEDDINGS, *range(lm.n_layers)], write_back):
        rewritten = lm.model(input_ids=input_ids, use_cache=False).logits.float()
    identity_diff = float((rewritten - reference).abs().max())
    if identity_diff > allowed:
        raise ModelCheckError(
            f"{_model_type(lm)}: writing each block's own output back changed the logits by {identity_diff:.3g} "
            f"(tolerance {allowed:.3g}), so patches would not land where they should. The blocks at "
            f"{lm.adapter.spec.blocks!r} return {seen.get('block_output')}s the library cannot rewrite; "
            "pass adapter=ArchSpec(...) naming modules whose first output is the residual stream"
        )
    report = ProbeReport(
        model_type=_model_type(lm),
        logit_lens_diff=lens_diff,
        identity_diff=identity_diff,
        final_norm=lm.adapter.spec.final_norm,
        block_output=str(seen.get("block_output")),
        cache_keyword=seen.get("cache_keyword"),  # type: ignore[arg-type]
    )
    _REPORTS.setdefault(lm.model, {})[given] = (lm.adapter.spec, report)
    return report


def _use(lm: ModelHandle, spec: ArchSpec) -> None:
    from patchscopes.models.adapters import module_at

    lm.adapter.final_norm = module_at(lm.model, spec.final_norm) if spec.final_norm is not None else None
    lm.adapter.unembed = module_at(lm.model, spec.unembed)
    lm.adapter.spec = spec


def _lens_diff(lm: ModelHandle, hidden: torch.Tensor, reference: torch.Tensor) -> float:
    logits = lm.adapter.decode(hidden.to(_device_of(lm.adapter.unembed, hidden))).float()
    return float((logits.to(reference.device) - reference).abs().max())


def _device_of(module: nn.Module, fallback: torch.Tensor) -> torch.device:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    return fallback.device


def _repair_final_norm(lm: ModelHandle, hidden: torch.Tensor, reference: torch.Tensor, allowed: float, diff: float) -> float:
    """Try the other final-norm candidates (and none); keep the first whose logit lens matches, else raise."""
    from patchscopes.models.adapters import norm_candidates, unembed_candidates

    given = lm.adapter.spec
    tried: dict[tuple[str | None, str], float] = {(given.final_norm, given.unembed): diff}
    norms = [given.final_norm, *norm_candidates(lm.model, given.blocks), None]
    for head in unembed_candidates(lm.model, given.unembed):
        for path in dict.fromkeys(norms):
            if (path, head) in tried:
                continue
            _use(lm, replace(given, final_norm=path, unembed=head))
            try:
                tried[(path, head)] = _lens_diff(lm, hidden, reference)
            except Exception:  # a module that does not take the hidden state: not the head
                tried[(path, head)] = float("inf")
            if tried[(path, head)] <= allowed:
                return tried[(path, head)]
    _use(lm, given)
    adapter = lm.adapter
    attempts = ", ".join(f"{path!r} → {head!r}: {d:.3g}" for (path, head), d in list(tried.items())[:4])
    raise ModelCheckError(
        f"{_model_type(lm)}: the last-layer logit lens does not give the model's logits "
        f"(|Δ logit| by final norm → head tried: {attempts}; tolerance {allowed:.3g}). The model transforms its last "
        f"hidden state in a way the adapter does not know. Pass adapter=ArchSpec(blocks={adapter.spec.blocks!r}, "
        f"final_norm=..., unembed={adapter.spec.unembed!r}, embed={adapter.spec.embed!r}) with the right modules, "
        "or check=False to load it unchecked (lens readings will then be wrong)"
    )


def report_of(model: nn.Module) -> ProbeReport | None:
    """The latest probe report kept for a model object, if its probes ran."""
    reports = list(_REPORTS.get(model, {}).values())
    return reports[-1][1] if reports else None


__all__ = ["PROBE_TEXT", "ProbeReport", "probe", "report_of", "tolerance"]
