"""Run Patchscopes: compile them into a plan, hand it to an executor, build the results.

>>> from patchscopes import load_model, run
>>> from patchscopes.presets import TOKEN_IDENTITY
>>> lm = load_model("SmolLM2-135M")                                              # doctest: +SKIP
>>> result = run(TOKEN_IDENTITY.scope("Diana, Princess of Wales", layer=2), lm)
>>> len(result.top_tokens), result.source_layer, result.target_layer
(10, 2, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from patchscopes.executors import ExecutorLike, as_executor, result_of, top_of
from patchscopes.models.loading import ModelHandle
from patchscopes.plan import compile_plan
from patchscopes.scope import Patchscope, PatchscopeResult


def run_many(
    scopes: Sequence[Patchscope],
    model: ModelHandle,
    target_model: ModelHandle | None = None,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    executor: ExecutorLike = "auto",
) -> list[PatchscopeResult]:
    """Run many Patchscopes; each source prompt is read once, targets run in batches.

    ``executor="auto"`` uses the fast engine (:mod:`patchscopes.engine`: shared target prefixes, skipped
    layers) wherever it applies — a model that passed its self-check, greedy decoding, one block-layer patch —
    and the plain padded-batch engine elsewhere, with one warning when a model fails the check; ``"plain"``
    always uses the plain one, ``"fast"`` requires the fast one and raises :class:`EngineError` where it cannot
    run. Any :class:`~patchscopes.executors.Executor` object may be passed instead, such as
    ``NNsightExecutor(remote=True)`` to run on NDIF (see :mod:`patchscopes.backends`).
    """
    runner = as_executor(executor)
    tlm = target_model or model
    plan = compile_plan(scopes, model, tlm)
    outputs = runner.run(plan, model, tlm, batch_size, on_batch)
    tops = top_of(outputs, max((step.scope.decoding.top_k for step in plan.steps), default=1))
    return [result_of(step, out, model, tlm, top) for step, out, top in zip(plan.steps, outputs, tops)]


def run(
    scope: Patchscope, model: ModelHandle, target_model: ModelHandle | None = None, executor: ExecutorLike = "auto"
) -> PatchscopeResult:
    """Run one Patchscope.

    >>> from patchscopes.presets import TOKEN_IDENTITY
    >>> result = run(TOKEN_IDENTITY.scope("Diana", layer=1), lm)
    >>> isinstance(result.text, str), len(result.top_tokens) == len(result.top_probs)
    (True, True)
    """
    return run_many([scope], model, target_model, executor=executor)[0]


__all__ = ["run", "run_many"]
