"""Choose the LRC's layers, inverse rank and steering strength on a validation split (never the test split).

For the first seed, each relation's *training* split is split again 50/50 per object into fit and
validation parts. In order: the object layer (subject layer fixed; one forward-mode Jacobian pass gives
every object layer at once), then the subject layer (at the chosen object layer), then the rank, then β.
Each stage keeps the value with the best macro mean of validation accuracy plus causality (the rank
stage: accuracy alone, to save the steering runs).

    >>> choice = run_lrc_sweep(lm, SweepConfig(base=PROFILES["default"]), "runs/lrc/sweep")   # doctest: +SKIP
    >>> choice["subject_layer"], choice["object_layer"], choice["rank"], choice["beta"]       # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from patchscopes.layers import resolve_block
from patchscopes.models.loading import ModelHandle
from patchscopes.progress import progress_bar
from patchscopes.relations.evaluate import (
    LrcConfig,
    SplitData,
    causal_edits,
    correct_samples,
    evaluate_concepts,
    make_split,
    select_relations,
)
from patchscopes.relations.jcache import JacobianCache
from patchscopes.relations.lrc import lrc_from_objects, object_states, subject_states
from patchscopes.relations.lre import from_jacobians
from patchscopes.relations.splits import split_by_object
from patchscopes.results import ResultStore, model_entry


@dataclass(frozen=True)
class SweepConfig:
    """The grids; the base configuration gives model, relations, n_lre, the first seed and the fixed values."""

    base: LrcConfig
    object_layers: tuple[int, ...] = (18, 21, 24)
    subject_layers: tuple[int, ...] = (12, 16, 20)
    ranks: tuple[int, ...] = (16, 64, 192, 576)
    betas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    n_lre: int = 1


SWEEP_PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"object_layers": (27, 28), "subject_layers": (25, 26), "ranks": (16, 576), "betas": (0.1, 0.3)},
    "default": {},
}


def _validation_split(lm: ModelHandle, relation: Any, cfg: LrcConfig, store: ResultStore) -> SplitData | None:
    samples = correct_samples(lm, relation, cfg, store)
    train, _ = split_by_object(samples, cfg.seeds[0])
    data = make_split(relation, train, cfg.seeds[0] + 1000, cfg)
    if not data.test or len({s.object for s in data.train}) < 2:
        return None
    return data


def _score(
    lm: ModelHandle,
    data: SplitData,
    cfg: LrcConfig,
    jac: Callable[..., Any],
    memo: dict[tuple, Any],
    s_layer: int,
    o_layer: int,
    rank: int,
    beta: float,
    steer: bool = True,
) -> dict[str, float]:
    rel = data.relation.name

    def cached(key: tuple, make: Callable[[], Any]) -> Any:
        if (rel, *key) not in memo:
            memo[(rel, *key)] = make()
        return memo[(rel, *key)]

    located = [p.locate(lm) for p in data.lre_prompts]
    lre = from_jacobians([jac(lm, loc, s_layer, [o_layer], "mean") for loc in located])
    objects = cached(("objects", o_layer), lambda: object_states(lm, data.train_prompts, o_layer, "mean", cfg.batch_size))
    concepts = lrc_from_objects(lre, objects, [p.object for p in data.train_prompts], min(rank, lm.hidden_size))
    states = cached(("subjects", s_layer), lambda: subject_states(lm, data.test_prompts, s_layer, cfg.batch_size))
    objects_all = sorted({s.object for s in data.train})
    edits = cached(("edits",), lambda: causal_edits(lm, data.test_prompts, objects_all, cfg.seeds[0], cfg.batch_size))
    accuracy, success = evaluate_concepts(lm, concepts, data.test_prompts, states, edits if steer else [], beta, cfg.batch_size)
    return {
        "accuracy": sum(accuracy) / len(accuracy),
        "causality": sum(success) / len(success) if success else float("nan"),
        "n_val": len(accuracy),
        "n_edits": len(success),
    }


def _best(frame: pd.DataFrame, stage: str) -> Any:
    part = frame[frame["stage"] == stage]
    macro = part.groupby("value")[["accuracy", "causality"]].mean()
    score = macro["accuracy"] + macro["causality"].fillna(0)
    return score.idxmax()


def run_lrc_sweep(lm: ModelHandle, sweep: SweepConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the sweep into ``out_dir``; returns and writes ``choice.json`` and the ``sweep`` table."""
    cfg = replace(sweep.base, n_lre=sweep.n_lre)
    out = Path(out_dir)
    store = ResultStore(out, {**asdict(sweep), **model_entry(lm)})
    jac = JacobianCache(out.parent / "jacobian-cache")
    splits = {r.name: d for r in select_relations(cfg) if (d := _validation_split(lm, r, cfg, store)) is not None}
    s0 = resolve_block(cfg.subject_layer, lm.n_layers, "an LRE")
    o_layers = sorted(
        resolve_block(x, lm.n_layers, "an LRE") for x in sweep.object_layers if resolve_block(x, lm.n_layers, "an LRE") > s0
    )
    memo: dict[tuple, Any] = {}
    choice: dict[str, Any] = {"relations": sorted(splits), "rank": cfg.rank, "beta": cfg.beta}

    def stage(name: str, values: Sequence[Any], score: Callable[[SplitData, Any], dict[str, float]]) -> Any:
        with progress_bar(len(values) * len(splits), f"sweep {name}", progress) as advance:
            for value in values:
                for rel, data in splits.items():
                    key = [name, rel, value]
                    if not store.done("sweep", key):
                        store.append("sweep", key, [{"stage": name, "relation": rel, "value": value, **score(data, value)}])
                    advance(1)
        return _best(store.frame("sweep"), name)

    def warm_object_layers(data: SplitData) -> None:  # one forward-mode pass per prompt gives every object layer
        for p in data.lre_prompts:
            jac(lm, p.locate(lm), s0, o_layers, "mean")

    for data in splits.values():
        warm_object_layers(data)
    best_o = int(stage("object_layer", o_layers, lambda d, v: _score(lm, d, cfg, jac, memo, s0, v, cfg.rank, cfg.beta)))
    s_layers = sorted({resolve_block(x, lm.n_layers, "an LRE") for x in sweep.subject_layers} | {s0})
    s_layers = [s for s in s_layers if s < best_o]
    best_s = int(stage("subject_layer", s_layers, lambda d, v: _score(lm, d, cfg, jac, memo, v, best_o, cfg.rank, cfg.beta)))
    # the rank is chosen by validation accuracy alone (no steering runs: they are the expensive part on a CPU)
    best_r = int(stage("rank", list(sweep.ranks), lambda d, v: _score(lm, d, cfg, jac, memo, best_s, best_o, v, cfg.beta, False)))
    best_b = float(stage("beta", list(sweep.betas), lambda d, v: _score(lm, d, cfg, jac, memo, best_s, best_o, best_r, v)))
    choice.update({"subject_layer": best_s, "object_layer": best_o, "rank": best_r, "beta": best_b})
    store.write_json("choice.json", choice)
    return choice


def apply_choice(cfg: LrcConfig, choice: dict[str, Any]) -> LrcConfig:
    """The evaluation configuration with the sweep's layers, rank and β."""
    return replace(
        cfg,
        subject_layer=int(choice["subject_layer"]),
        object_layer=int(choice["object_layer"]),
        rank=int(choice["rank"]),
        beta=float(choice["beta"]),
        chosen_by="validation sweep",
    )


def sweep_frame(directory: str | Path) -> pd.DataFrame:
    """The ``sweep`` table of a sweep run directory (read-only; no configuration check)."""
    rows: list[dict[str, Any]] = []
    path = Path(directory) / "sweep.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.extend(json.loads(line)["rows"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return pd.DataFrame(rows)
