"""Run a checked :class:`~patchscopes.server.plan.Plan` with :func:`patchscopes.sweep.sweep`, a few cells
at a time, so that progress streams; a cancelled job stops at its next forward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from patchscopes.hooks import at_locations
from patchscopes.models.loading import ModelHandle
from patchscopes.rows import json_row
from patchscopes.scope import SAME, Generate, PatchscopeResult
from patchscopes.server.jobs import JobContext
from patchscopes.server.plan import Plan
from patchscopes.server.pool import ModelPool
from patchscopes.sweep import sweep


def chunk_size(plan: Plan, chunk_cells: int) -> int:
    """Patchscopes per chunk: ``chunk_cells`` for next-token decoding, fewer the more tokens each generates."""
    return max(1, chunk_cells // (1 + plan.request.max_new_tokens // 4))


def layer_chunks(plan: Plan, chunk_cells: int) -> list[tuple[list[int], list[int] | str]]:
    """(source layers, target layers) pieces of about :func:`chunk_size` cells that together cover the plan."""
    size = chunk_size(plan, chunk_cells)
    if plan.target_layers == SAME or len(plan.target_layers) <= size:
        per_layer = 1 if plan.target_layers == SAME else len(plan.target_layers)
        step = max(1, size // per_layer)
        return [(plan.source_layers[i : i + step], plan.target_layers) for i in range(0, len(plan.source_layers), step)]
    targets: list[int] = [int(t) for t in plan.target_layers]
    return [([layer], targets[i : i + size]) for layer in plan.source_layers for i in range(0, len(targets), size)]


@contextmanager
def stop_when_cancelled(models: list[ModelHandle], ctx: JobContext) -> Iterator[None]:
    """Check for cancellation on every forward pass (at block 0), so a cancelled chunk stops mid-way."""

    def check(layer: object, hidden: torch.Tensor) -> None:
        ctx.check()

    with ExitStack() as stack:
        for lm in {id(m): m for m in models}.values():
            stack.enter_context(at_locations(lm.adapter.blocks, [0], check))
        yield


@contextmanager
def model_locks(pool: ModelPool, names: set[str]) -> Iterator[None]:
    """Hold the run locks of ``names`` (in a fixed order): hooks of two runs never share a model."""
    with ExitStack() as stack:
        for name in sorted(names):
            stack.enter_context(pool.run_locks[name])
        yield


def run_plan(plan: Plan, pool: ModelPool, ctx: JobContext, chunk_cells: int = 32) -> list[dict[str, Any]]:
    """All rows of ``plan``; emits ``{"type": "rows", …}`` after each chunk and checks for cancellation."""
    extra = None
    if plan.answer_id is not None:
        answer_id = plan.answer_id

        def extra(result: PatchscopeResult) -> dict[str, Any]:
            return {"answer_prob": float(result.probs[answer_id])}

    generate = isinstance(plan.decoding, Generate)
    rows: list[dict[str, Any]] = []
    total = plan.cells
    ctx.emit({"type": "started", "total": total})
    batch = chunk_size(plan, chunk_cells)
    for sources, targets in layer_chunks(plan, chunk_cells):
        ctx.check()
        locks = model_locks(pool, {plan.model.name, plan.target_model.name})
        with locks, stop_when_cancelled([plan.model, plan.target_model], ctx):
            frame = sweep(
                plan.model,
                [plan.request.prompt],
                plan.preset,
                source_layers=sources,
                target_layers=targets,
                position=plan.position,
                mapping=plan.mapping,
                decoding=plan.decoding,
                target_model=plan.target_model if plan.target_model is not plan.model else None,
                batch_size=batch,
                extra=extra,
                progress=False,
            )
        part = [json_row({str(k): v for k, v in r.items()}, generate) for r in frame.to_dict("records")]
        rows.extend(part)
        ctx.emit({"type": "rows", "rows": part, "done": len(rows), "total": total})
    return rows
