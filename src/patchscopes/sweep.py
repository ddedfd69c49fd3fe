"""Many Patchscopes in one call: prompts × source layers × target layers → a tidy DataFrame.

One row per prompt × ℓ × ℓ*, in the schema of :mod:`patchscopes.rows`, plus whatever ``extra`` adds.

    >>> from patchscopes.presets import TOKEN_IDENTITY
    >>> df = sweep(lm, ["Diana, Princess of Wales"], TOKEN_IDENTITY, progress=False)
    >>> len(df) == lm.n_layers, bool((df.source_layer == df.target_layer).all())   # every ℓ, with ℓ* = ℓ
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pandas as pd

from patchscopes.errors import SpecError
from patchscopes.executors import ExecutorLike
from patchscopes.layers import LayerSpec
from patchscopes.models.loading import ModelHandle
from patchscopes.positions import PositionSpec
from patchscopes.presets import Preset, custom
from patchscopes.progress import progress_bar
from patchscopes.rows import COLUMNS, result_row
from patchscopes.runner import run_many
from patchscopes.scope import SAME, Decoding, Patchscope, PatchscopeResult


def chunk_size(lm: ModelHandle, batch_size: int, budget_bytes: int = 128 << 20) -> int:
    """Scopes per chunk: enough for large fast-engine batches, few enough that their logits fit the budget."""
    return max(batch_size, min(4096, budget_bytes // (4 * lm.vocab_size)))


def build_scopes(
    model: ModelHandle,
    prompts: Sequence[str],
    preset: Preset,
    source_layers: Sequence[LayerSpec] | None,
    target_layers: Sequence[LayerSpec] | str | None,
    position: PositionSpec,
    mapping: Any,
    decoding: Decoding | None,
    target_model: ModelHandle | None = None,
    positions: Sequence[PositionSpec] | None = None,
) -> list[tuple[int, Patchscope]]:
    layers = list(source_layers) if source_layers is not None else list(range(model.n_layers))
    tlm = target_model or model
    if positions is not None and len(positions) != len(prompts):
        raise SpecError(f"positions has {len(positions)} entries for {len(prompts)} prompts; give one per prompt")
    scopes = []
    for example, prompt in enumerate(prompts):
        pos = positions[example] if positions is not None else position
        for layer in layers:
            if target_layers is None:
                tls: list[LayerSpec] = list(range(tlm.n_layers))
            elif target_layers == SAME:
                tls = [preset.target_layer]  # the preset's own rule: ℓ* = ℓ, or ℓ* = L−1 for the logit lens
            else:
                tls = list(target_layers)  # type: ignore[arg-type]
            for tl in tls:
                pair_target = layer if tl == SAME else tl
                m = mapping(layer, pair_target) if callable(mapping) and getattr(mapping, "per_layer_pair", False) else mapping
                scopes.append((example, preset.scope(prompt, layer, pos, target_layer=tl, decoding=decoding, mapping=m)))
    return scopes


def sweep(
    model: ModelHandle,
    prompts: str | Sequence[str],
    preset: Preset | str,
    source_layers: Sequence[LayerSpec] | None = None,
    target_layers: Sequence[LayerSpec] | str | None = SAME,
    position: PositionSpec = -1,
    positions: Sequence[PositionSpec] | None = None,
    mapping: Any = None,
    decoding: Decoding | None = None,
    target_model: ModelHandle | None = None,
    batch_size: int = 32,
    extra: Callable[[PatchscopeResult], dict[str, Any]] | None = None,
    progress: bool = True,
    executor: ExecutorLike = "auto",
) -> pd.DataFrame:
    """Run ``preset`` (or a target prompt with placeholder ``x``) over prompts × source layers × target layers.

    ``source_layers=None`` means every block; ``target_layers="same"`` pairs ℓ* = ℓ (the preset's own
    rule for the logit lens), ``None`` means every target block, a list gives the grid explicitly.
    ``position`` applies to every prompt; ``positions`` gives one per prompt instead.
    ``mapping`` may be one mapping, or a callable ``(ℓ, ℓ*) → mapping`` marked ``per_layer_pair = True``.
    ``executor``: see :func:`patchscopes.runner.run_many`. Work runs in chunks whose size
    keeps the per-chunk logits within about 128 MB, so memory stays bounded for any number of prompts.
    """
    frames = list(
        iter_sweep(
            model,
            prompts,
            preset,
            source_layers,
            target_layers,
            position,
            positions,
            mapping,
            decoding,
            target_model,
            batch_size,
            extra,
            progress,
            executor,
        )
    )
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)


def iter_sweep(
    model: ModelHandle,
    prompts: str | Sequence[str],
    preset: Preset | str,
    source_layers: Sequence[LayerSpec] | None = None,
    target_layers: Sequence[LayerSpec] | str | None = SAME,
    position: PositionSpec = -1,
    positions: Sequence[PositionSpec] | None = None,
    mapping: Any = None,
    decoding: Decoding | None = None,
    target_model: ModelHandle | None = None,
    batch_size: int = 32,
    extra: Callable[[PatchscopeResult], dict[str, Any]] | None = None,
    progress: bool = True,
    executor: ExecutorLike = "auto",
) -> Iterator[pd.DataFrame]:
    """Like :func:`sweep`, but yield the rows chunk by chunk as they are computed (memory stays bounded).

    >>> from patchscopes.presets import TOKEN_IDENTITY
    >>> from patchscopes.results import ResultStore
    >>> store = ResultStore("runs/demo", {"preset": "token-identity"})
    >>> for frame in iter_sweep(lm, texts[:2], TOKEN_IDENTITY, source_layers=[1], progress=False):
    ...     store.append("rows", int(frame.example.iloc[0]), frame.to_dict("records"))
    >>> len(store.frame("rows"))
    2
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(preset, str):
        preset = custom(preset)
    if target_layers == SAME and preset.target_layer != SAME:
        target_layers = [preset.target_layer]
    scopes = build_scopes(
        model, prompts, preset, source_layers, target_layers, position, mapping, decoding, target_model, positions
    )
    yield from _chunks(model, scopes, preset.name, target_model, batch_size, extra, progress, executor)


def _chunks(
    model: ModelHandle,
    scopes: list[tuple[int, Patchscope]],
    name: str,
    target_model: ModelHandle | None,
    batch_size: int,
    extra: Callable[[PatchscopeResult], dict[str, Any]] | None,
    progress: bool,
    executor: ExecutorLike,
) -> Iterator[pd.DataFrame]:
    chunk = chunk_size(target_model or model, batch_size)
    with progress_bar(len(scopes), f"sweep {name}", enabled=progress) as advance:
        for start in range(0, len(scopes), chunk):
            part = scopes[start : start + chunk]
            results = run_many([s for _, s in part], model, target_model, batch_size, advance, executor=executor)
            rows = []
            for (example, _), result in zip(part, results):
                row = result_row(example, result)
                if extra is not None:
                    row.update(extra(result))
                rows.append(row)
            del results
            yield pd.DataFrame(rows, columns=COLUMNS + [c for c in (rows[0] if rows else {}) if c not in COLUMNS])


__all__ = ["COLUMNS", "build_scopes", "iter_sweep", "result_row", "sweep"]
