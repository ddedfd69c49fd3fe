"""A sweep split into shards that run as Ray tasks, all writing into one resumable results store.

The prompts are cut into ``n_shards`` shards. Each shard is a Ray task that loads the model once per
worker, runs :func:`patchscopes.sweep.sweep` one prompt (one *unit*) at a time, and appends the unit's
rows to the shared :class:`~patchscopes.results.ResultStore` under a file lock, one fsync'd line per unit.
A task that dies (a killed worker, a crash) is retried by Ray; the retry skips the units already written
and redoes a unit torn by the crash, so no row is lost or duplicated. Re-running the same call on the
same directory resumes the same way. The table equals a single-process :func:`~patchscopes.sweep.sweep`.

What it needs: ``ray`` (``pip install ray``), a model every worker can load by name or path (a registry
name, a local checkpoint directory or a cached hub id), and a directory all workers can write (shared
storage on a multi-machine cluster).

    >>> from patchscopes.backends.ray_sweep import distributed_sweep
    >>> df = distributed_sweep("SmolLM2-135M", prompts, "token-identity", out_dir="runs/dist",
    ...                        source_layers=[2, 6, 10], n_shards=4)            # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from patchscopes.backends.errors import BackendError, ShardFailedError
from patchscopes.files import file_lock
from patchscopes.layers import LayerSpec
from patchscopes.models.loading import ModelHandle, load_model
from patchscopes.positions import PositionSpec
from patchscopes.presets import Preset
from patchscopes.results import ResultStore, dtype_entry
from patchscopes.scope import Decoding

TABLE = "rows"
_MODELS: dict[str, ModelHandle] = {}  # per worker process: loaded once, reused by later shards


def shard_indices(n_items: int, n_shards: int) -> list[list[int]]:
    """Split ``range(n_items)`` into at most ``n_shards`` contiguous, nearly equal, non-empty shards.

    >>> shard_indices(5, 2)
    [[0, 1, 2], [3, 4]]
    """
    if n_shards < 1:
        raise BackendError(f"n_shards must be at least 1, got {n_shards}")
    n = min(n_shards, max(n_items, 1))
    size, extra = divmod(n_items, n)
    shards, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        if end > start:
            shards.append(list(range(start, end)))
        start = end
    return shards


def unit_key(example: int) -> list[Any]:
    return ["example", example]


def _model(name: str, dtype: str) -> ModelHandle:
    key = f"{name}|{dtype}"
    if key not in _MODELS:
        _MODELS[key] = load_model(name, dtype=dtype)
    return _MODELS[key]


def run_shard(
    shard: int,
    examples: Sequence[int],
    model: str,
    prompts: Sequence[str],
    positions: Sequence[PositionSpec],
    sweep_kwargs: dict[str, Any],
    out_dir: str,
    config: dict[str, Any],
    dtype: str = "float32",
    after_unit: Callable[[int, int], None] | None = None,
) -> int:
    """Run one shard's pending units into the store; returns how many units it wrote.

    ``after_unit(shard, example)`` runs after each unit is stored (a test uses it to kill the worker).
    """
    from patchscopes.sweep import sweep

    ResultStore(out_dir, config)  # refuses a directory of another configuration
    lock = file_lock(Path(out_dir) / f"{TABLE}.lock")
    lm = _model(model, dtype)
    written = 0
    for example in examples:
        with lock:
            if ResultStore(out_dir, config).done(TABLE, unit_key(example)):
                continue
        df = sweep(lm, [prompts[example]], positions=[positions[example]], progress=False, **sweep_kwargs)
        df["example"] = example
        rows = [{str(k): v for k, v in row.items()} for row in df.to_dict(orient="records")]
        with lock:
            fresh = ResultStore(out_dir, config)  # re-read: another attempt may have written it meanwhile
            fresh.append(TABLE, unit_key(example), rows)
        written += 1
        if after_unit is not None:
            after_unit(shard, example)
    return written


def sweep_config(
    model: str, prompts: Sequence[str], positions: Sequence[PositionSpec], sweep_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The run configuration recorded in the store (a different one in the same directory is refused)."""
    digest = hashlib.sha256(json.dumps([list(prompts), [repr(p) for p in positions]]).encode()).hexdigest()[:16]
    shown = {k: repr(v) if not isinstance(v, (int, float, str, list, type(None))) else v for k, v in sweep_kwargs.items()}
    return {"kind": "distributed_sweep", "model": model, "n_prompts": len(prompts), "prompts_sha256": digest, **shown}


def ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in the order a single-process sweep gives: by example, then as each unit wrote them."""
    if frame.empty:
        return frame
    return frame.sort_values("example", kind="stable").reset_index(drop=True)


def distributed_sweep(
    model: str,
    prompts: str | Sequence[str],
    preset: Preset | str,
    out_dir: str | Path,
    source_layers: Sequence[LayerSpec] | None = None,
    target_layers: Sequence[LayerSpec] | str | None = "same",
    position: PositionSpec = -1,
    positions: Sequence[PositionSpec] | None = None,
    mapping: Any = None,
    decoding: Decoding | None = None,
    batch_size: int = 32,
    n_shards: int = 4,
    max_retries: int = 3,
    num_cpus_per_task: float = 1,
    dtype: str = "float32",
    address: str | None = None,
    after_unit: Callable[[int, int], None] | None = None,
    **sweep_options: Any,
) -> pd.DataFrame:
    """Run :func:`patchscopes.sweep.sweep` as Ray tasks over prompt shards into ``out_dir``; return the table.

    Ray is started locally when it is not running yet (or joins ``address``, e.g. ``"auto"`` for a cluster).
    A shard failing more than ``max_retries`` times raises :class:`ShardFailedError`; what finished stays
    in ``out_dir`` and the same call resumes it. Other keyword arguments (say ``engine="plain"``) go to
    :func:`~patchscopes.sweep.sweep` unchanged and are recorded in the run configuration.
    """
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray is a dependency of this backend
        raise BackendError("distributed sweeps need ray: pip install ray") from exc
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if positions is None:
        positions = [position] * len(prompts)
    elif len(positions) != len(prompts):
        raise BackendError(f"positions has {len(positions)} entries for {len(prompts)} prompts; give one per prompt")
    if isinstance(preset, str):
        from patchscopes.presets import PRESETS, custom

        preset = PRESETS[preset] if preset in PRESETS else custom(preset)
    preset_name = preset.name
    sweep_kwargs: dict[str, Any] = {
        "preset": preset,
        "source_layers": list(source_layers) if source_layers is not None else None,
        "target_layers": target_layers if isinstance(target_layers, (str, type(None))) else list(target_layers),
        "mapping": mapping,
        "decoding": decoding,
        "batch_size": batch_size,
        **sweep_options,
    }
    config = sweep_config(model, prompts, positions, {**sweep_kwargs, "preset": preset_name}) | dtype_entry(dtype)
    out = str(out_dir)
    store = ResultStore(out, config)
    pending = [e for e in range(len(prompts)) if not store.done(TABLE, unit_key(e))]
    shards = [[pending[i] for i in s] for s in shard_indices(len(pending), n_shards)] if pending else []
    if shards:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        task = ray.remote(max_retries=max_retries, retry_exceptions=True, num_cpus=num_cpus_per_task)(run_shard)
        args = (model, prompts, list(positions), sweep_kwargs, out, config, dtype, after_unit)
        refs = {task.remote(i, s, *args): i for i, s in enumerate(shards)}
        failures = []
        for ref, shard in refs.items():
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - report every failed shard together
                failures.append(f"shard {shard} (examples {shards[shard][0]}..{shards[shard][-1]}): {type(exc).__name__}: {exc}")
        if failures:
            raise ShardFailedError(
                f"{len(failures)} shard(s) failed after {max_retries} retries; finished units are kept in {out} and "
                "calling distributed_sweep again with the same arguments resumes: " + "; ".join(failures)
            )
    return ordered(ResultStore(out, config).frame(TABLE))


__all__ = ["distributed_sweep", "ordered", "run_shard", "shard_indices", "sweep_config", "unit_key"]
