"""Plans run as nnsight traces: in this process, as a serialised round trip, or on NDIF.

:class:`NNsightExecutor` runs the same :class:`~patchscopes.plan.Plan` as the native executors, with nnsight
doing the reading and writing:

1. *source*: one ``trace`` per batch of source reads reads the block outputs (or the input of block 0 for
   ``"embeddings"``) at the source positions, every needed layer in one pass that stops after the deepest one;
2. the mapping runs on the client, where its weights are;
3. *target*: one ``generate`` per batch of steps writes the mapped vectors into the target layer at the target
   positions (replace or add, on the prefill pass only, since an invoke's interventions touch the first
   forward), reads the next-token logits and generates (``max_new_tokens=1`` for :class:`NextToken`).

With ``one_request=True`` both happen in one nnsight ``session`` per batch (see
:mod:`patchscopes.backends.nnsight_session`). The blocks reference nothing but torch and their own variables,
so nnsight can ship them to NDIF as they are. The results equal the native executors' (see
``tests/test_backends_nnsight.py``).

    >>> from patchscopes import load_model, run_many
    >>> from patchscopes.presets import TOKEN_IDENTITY
    >>> from patchscopes.backends.nnsight_backend import NNsightExecutor
    >>> lm = load_model("SmolLM2-135M")                                          # doctest: +SKIP
    >>> scope = TOKEN_IDENTITY.scope("Diana, Princess of Wales", layer=6, position=-1)  # doctest: +SKIP
    >>> [result] = run_many([scope], lm, executor=NNsightExecutor())             # doctest: +SKIP
    >>> result.top_tokens[:3]                                                    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from patchscopes.backends.devices import layer_device
from patchscopes.backends.errors import BackendError
from patchscopes.backends.nnsight_model import NNsightModel, Remote, as_nnsight, blocks_envoy, wrap
from patchscopes.backends.nnsight_ops import (
    TargetItem,
    capture_nnsight,
    check_models_ready,
    decode_batches,
    decode_patched,
)
from patchscopes.backends.nnsight_session import run_session, session_problem
from patchscopes.executors.base import Executor, Progress, map_state
from patchscopes.layers import Location
from patchscopes.models.loading import ModelHandle
from patchscopes.patching import RunOutput
from patchscopes.plan import Plan, Step
from patchscopes.runner import run_many
from patchscopes.scope import Patchscope, PatchscopeResult


class NNsightExecutor(Executor):
    """Runs plans through nnsight. ``remote``: ``False`` here, ``True`` on NDIF, ``"local"`` a serialised dry run,
    ``None`` each wrapper's own setting. ``one_request``: one session per batch (mapping next to the model).
    ``models``: wrappers to use for their handles (say, with a recording backend)."""

    name = "nnsight"

    def __init__(self, remote: Remote | None = None, one_request: bool = False, models: Sequence[NNsightModel] = ()) -> None:
        self.remote = remote
        self.one_request = one_request
        self.models = list(models)

    def __repr__(self) -> str:
        return f"NNsightExecutor(remote={self.remote!r}, one_request={self.one_request})"

    def wrapper(self, lm: ModelHandle) -> NNsightModel:
        for nm in self.models:
            if nm.handle is lm:
                return as_nnsight(nm, self.remote)
        return as_nnsight(lm, self.remote)

    def why_not(self, model: ModelHandle, plan: Plan) -> str | None:
        if self.one_request:
            return session_problem(model, plan)
        return None

    def run(
        self, plan: Plan, model: ModelHandle, target_model: ModelHandle, batch_size: int = 16, on_batch: Progress = None
    ) -> list[RunOutput]:
        problem = self.why_not(model, plan)
        if problem is not None:
            raise BackendError(problem)
        src, tgt = self.wrapper(model), self.wrapper(target_model)
        check_models_ready([src, tgt])
        if self.one_request:
            if target_model is not model:
                raise BackendError("one request per batch runs source and target on one model; use one_request=False")
            return run_session(src, plan, batch_size, on_batch)
        states: list[dict[Location, torch.Tensor]] = [{} for _ in plan.reads]
        for layers, members in plan.reads_by_layers().items():
            reads = [plan.reads[i] for i in members]
            captured = capture_nnsight(src, [list(r.ids) for r in reads], [list(r.positions) for r in reads], layers, batch_size)
            for i, tensor in zip(members, captured):
                states[i] = {layer: tensor[j] for j, layer in enumerate(layers)}
        items = [_target_item(step, states[step.read][step.source_layer], tgt) for step in plan.steps]
        outputs: list[RunOutput | None] = [None] * len(plan.steps)
        for group in plan.decodes:
            for part in decode_batches(group, batch_size):
                for i, out in zip(part, decode_patched(tgt, [items[i] for i in part], group.decoding)):
                    outputs[i] = out
                if on_batch is not None:
                    on_batch(len(part))
        return [o for o in outputs if o is not None]


def _target_item(step: Step, hidden: torch.Tensor, tgt: NNsightModel) -> TargetItem:
    if hidden.device.type == "meta":
        raise BackendError("the source states are on the meta device: capture a remote source through NDIF (remote=True)")
    device = layer_device(tgt.handle, step.target_layer)  # where the patch waits: its block's device (CPU when remote)
    mapped = map_state(step, hidden, tgt.handle, "cpu" if device.type == "meta" else device)
    return (list(step.target_ids), step.target_layer, list(step.target_positions), mapped, step.scope.mode)


def run_many_nnsight(
    scopes: Sequence[Patchscope],
    model: ModelHandle | NNsightModel,
    target_model: ModelHandle | NNsightModel | None = None,
    batch_size: int = 16,
    remote: Remote | None = None,
    on_batch: Callable[[int], None] | None = None,
    one_request: bool = False,
) -> list[PatchscopeResult]:
    """:func:`patchscopes.runner.run_many` with an :class:`NNsightExecutor`, for handles or wrappers.

    ``remote`` (``True`` for NDIF, ``"local"`` for a serialised dry run) overrides the wrappers' own setting.

    >>> results = run_many_nnsight(scopes, lm, batch_size=8)                 # doctest: +SKIP
    >>> results = run_many_nnsight(scopes, ndif_model("meta-llama/Llama-3.1-8B"))  # doctest: +SKIP
    """
    src = as_nnsight(model, remote)
    tgt = src if target_model is None else as_nnsight(target_model, remote)
    executor = NNsightExecutor(remote, one_request, [src, tgt])
    return run_many(scopes, src.handle, tgt.handle, batch_size, on_batch, executor=executor)


def run_many_session(
    scopes: Sequence[Patchscope],
    model: ModelHandle | NNsightModel,
    batch_size: int = 16,
    remote: Remote | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[PatchscopeResult]:
    """:func:`run_many_nnsight` with one request per batch (source and target on the same model).

    >>> results = run_many_session(scopes, ndif_model("meta-llama/Llama-3.1-70B"))   # doctest: +SKIP
    """
    return run_many_nnsight(scopes, model, batch_size=batch_size, remote=remote, on_batch=on_batch, one_request=True)


__all__ = [
    "NNsightExecutor",
    "NNsightModel",
    "as_nnsight",
    "blocks_envoy",
    "capture_nnsight",
    "check_models_ready",
    "decode_patched",
    "run_many_nnsight",
    "run_many_session",
    "wrap",
]
