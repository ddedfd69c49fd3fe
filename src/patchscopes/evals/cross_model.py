"""Cross-model Patchscopes (Patchscopes paper §4.4 and App. E): patch model A's hidden states into model B
through affine maps fitted on the same text.

Three evaluations, all written into a resumable :class:`~patchscopes.results.ResultStore`:

- **next-token Precision@1** over a grid of layer pairs (ℓ, ℓ*): a WikiText snippet runs in A, a random
  position's state at layer ℓ goes through the map (ℓ→ℓ*) into B's token-identity prompt at ℓ*; a hit is
  B's top-1 token equal to A's own top-1 next token at that position (token strings, stripped, compared
  when the tokenizers differ);
- **next-token Precision@1 on the same text** (the official notebook's variant for models of different
  widths, ``prompt_target = prompt``): the mapped state is written into B's own run of the same text, at the
  position whose token ends at the same character, and B's next-token prediction there is scored the same
  way; beside it B's *unpatched* prediction at that position (the floor a patch must beat) and, for models
  sharing a tokenizer, the surprisal −ln p_A(B's patched top-1);
- **entity description** (RougeL by layer): an entity name's last-token state at layer ℓ is described by
  the paper's few-shot prompt, in three settings as in Fig. 3: A→A, B→B (identity) and A→B (map ℓ→ℓ).

    >>> config = CrossModelConfig("SmolLM2-135M", "Gemma-3-270M", layer_step=6, n_fit_texts=200)   # doctest: +SKIP
    >>> summary = run_cross_model(config, "runs/cross-model")                                        # doctest: +SKIP
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch

from patchscopes.crossmodel.align import aligned_positions
from patchscopes.crossmodel.fit import corpus_sha256, fit_maps
from patchscopes.crossmodel.store import MapStore, check_provenance, pair_name
from patchscopes.datasets import data_dir
from patchscopes.errors import PatchscopeError
from patchscopes.evals.attribute_data import load_attribute_task
from patchscopes.evals.common import rouge_l
from patchscopes.executors import ReplayExecutor
from patchscopes.mappings import AffineMap
from patchscopes.models.loading import ModelHandle, load_model
from patchscopes.patching import Patch, PatchedRun, trace
from patchscopes.plan import DecodeGroup
from patchscopes.plots import first_entry
from patchscopes.presets import ENTITY_DESCRIPTION, TOKEN_IDENTITY
from patchscopes.results import ResultStore, dtype_entry
from patchscopes.scope import NextToken
from patchscopes.sweep import sweep


class CrossModelError(PatchscopeError, ValueError):
    """A cross-model evaluation that cannot run as configured."""


@dataclass(frozen=True)
class CrossModelConfig:
    """Everything a cross-model run depends on (saved in the run directory's ``config.json``)."""

    source: str = "SmolLM2-135M"
    target: str = "Gemma-3-270M"
    layer_step: int = 5  # the paper sampled every 5th layer
    n_fit_texts: int = 400
    n_eval_texts: int = 100
    n_entities: int = 40
    entity_layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    ridge: float = 0.0
    ridge_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)  # relative penalties tried; best held-out R² kept
    max_norm_ratio: float | None = None  # drop massive-activation positions from the fit (see fit_maps)
    heldout: float = 0.1
    skip_first: int = 1
    max_new_tokens: int = 20
    dtype: str = "float32"
    seed: int = 0
    batch_size: int = 32
    same_text: bool = True  # also patch into B's run of the same text (the official variant), with B's floor
    source_layers: tuple[int, ...] = field(default=())  # empty: every layer_step-th layer, and the last
    target_layers: tuple[int, ...] = field(default=())


def layer_grid(n_layers: int, step: int) -> list[int]:
    """Every ``step``-th block from 0, plus the last block."""
    if step < 1:
        raise CrossModelError(f"layer_step must be at least 1, got {step}")
    return sorted(set(range(0, n_layers, step)) | {n_layers - 1})


def corpus_texts(n: int, seed: int = 0, offset: int = 0) -> list[str]:
    """``n`` distinct WikiText snippets (the attribute tasks' ``prompt_source`` column), shuffled by ``seed``.

    ``offset`` skips that many snippets of the same shuffle, so ``corpus_texts(100, offset=400)`` is disjoint
    from ``corpus_texts(400)``.
    """
    root = data_dir() / "patchscopes"
    files = sorted(root.rglob("*.tsv"))
    if not files:
        raise CrossModelError(
            f"no attribute-task TSV files under {root}; set PATCHSCOPES_DATA or run `patchscopes data download`"
        )
    seen: dict[str, None] = {}
    for path in files:
        for sample in load_attribute_task(path).samples:
            text = " ".join(sample.prompt_source.split())
            if len(text) >= 30:
                seen.setdefault(text, None)
    texts = sorted(seen)
    random.Random(seed).shuffle(texts)
    if offset + n > len(texts):
        raise CrossModelError(f"asked for {offset + n} snippets, only {len(texts)} available")
    return texts[offset : offset + n]


def load_entities() -> pd.DataFrame:
    """The packaged entity list (``entity``, ``popularity``, ``description``)."""
    text = resources.files("patchscopes").joinpath("data/entities.tsv").read_text(encoding="utf-8")
    return pd.DataFrame(list(csv.DictReader(text.splitlines(), delimiter="\t")))


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of a frame as plain dicts (typed for callers)."""
    return cast(list[dict[str, Any]], df.to_dict("records"))


def _norm_token(token: str) -> str:
    return token.strip().lower()


def get_maps(
    source: ModelHandle,
    target: ModelHandle,
    pairs: list[tuple[int, int]],
    texts: list[str],
    store: MapStore,
    tag: str,
    ridge: float,
    heldout: float,
    skip_first: int,
    progress: bool = False,
    ridge_grid: tuple[float, ...] = (),
    max_norm_ratio: float | None = None,
) -> dict[tuple[int, int], AffineMap]:
    """Maps for ``pairs``: loaded from ``store`` when fitted on the same corpus for these models, else fitted and saved."""
    corpus = corpus_sha256(texts[: len(texts) - int(len(texts) * heldout + 0.999999)])
    maps: dict[tuple[int, int], AffineMap] = {}
    missing = []
    for s, t in pairs:
        name = pair_name(source.name, target.name, s, t, tag)
        if store.exists(name):
            amap = store.load(name)
            same_fit = (
                amap.metadata.get("ridge_base") == ridge
                and amap.metadata.get("ridge_grid") == list(ridge_grid)
                and amap.metadata.get("max_norm_ratio") == max_norm_ratio
            )
            if amap.metadata.get("corpus_sha256") == corpus and same_fit:
                check_provenance(amap, source, target, s, t)
                maps[(s, t)] = amap
                continue
        missing.append((s, t))
    if missing:
        # an interrupted fit continues from its last checkpoint (deleted once the maps are fitted)
        checkpoint = store.checkpoint_path(source.name, target.name, tag, missing)
        report = fit_maps(
            source, target, texts, missing, ridge, heldout, skip_first,
            progress=progress, ridge_grid=ridge_grid, max_norm_ratio=max_norm_ratio, checkpoint=checkpoint,
        )  # fmt: skip
        for (s, t), amap in report.maps.items():
            store.save(pair_name(source.name, target.name, s, t, tag), amap, overwrite=True)
            maps[(s, t)] = amap
    return maps


def _per_pair(maps: dict[tuple[int, int], AffineMap]) -> Callable[[int, int], AffineMap]:
    def mapping(source_layer: int, target_layer: int | str) -> AffineMap:
        return maps[(source_layer, source_layer if target_layer == "same" else int(target_layer))]

    mapping.per_layer_pair = True  # type: ignore[attr-defined]
    return mapping


def source_reading(
    source: ModelHandle, ids: list[int], position: int, layers: Sequence[int] = ()
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass of A: its next-token log-probabilities at ``position`` and its states there at ``layers``."""
    logits, seen, batch = trace(source, [ids], layers=list(layers))
    col = batch.padded(0, position)
    return torch.log_softmax(logits[0, col].float(), -1), [seen[layer][0, col] for layer in layers]


def next_token_rows(
    source: ModelHandle,
    target: ModelHandle,
    maps: dict[tuple[int, int], AffineMap],
    texts: list[str],
    source_layers: list[int],
    target_layers: list[int],
    seed: int = 0,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """One row per (text, ℓ, ℓ*): A's own top-1 next token at a random position, B's patched top-1, hit."""
    rng = random.Random(seed)
    ids = [source.tokenize(t).ids for t in texts]
    positions = [rng.randrange(1, len(i)) if len(i) > 1 else 0 for i in ids]
    own: list[str] = []
    for i, p in zip(ids, positions):
        logp, _ = source_reading(source, i, p)
        own.append(source.token_strings([int(logp.argmax())])[0])
    df = sweep(
        source,
        texts,
        TOKEN_IDENTITY.with_decoding(NextToken(top_k=5)),
        source_layers=source_layers,
        target_layers=target_layers,
        positions=positions,
        mapping=_per_pair(maps),
        target_model=target,
        batch_size=batch_size,
        progress=False,
    )
    rows = []
    for r in records(df):
        expected = own[int(r["example"])]
        rows.append(
            {
                "example": int(r["example"]),
                "source_position": int(r["source_position"]),
                "source_layer": int(r["source_layer"]),
                "target_layer": int(r["target_layer"]),
                "source_top1": expected,
                "patched_top1": r["top1"],
                "patched_top1_prob": float(r["top1_prob"]),
                "hit": _norm_token(r["top1"]) == _norm_token(expected),
            }
        )
    return rows


def same_text_rows(
    source: ModelHandle,
    target: ModelHandle,
    maps: dict[tuple[int, int], AffineMap],
    texts: list[str],
    source_layers: list[int],
    target_layers: list[int],
    seed: int = 0,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """One row per (text, ℓ, ℓ*): A's state at a random position, mapped, written over B's state at the
    aligned position of B's run of the same text (cut after that position), and B's next-token top-1 there.

    ``floor_hit``: B's unpatched top-1 at that position already equals A's. ``surprisal``: −ln p_A(B's
    patched top-1) when both models share a tokenizer (else NaN, as A cannot score B's tokens)."""
    rng = random.Random(seed)
    same_vocab = source.tokenizer is target.tokenizer or source.tokenizer.get_vocab() == target.tokenizer.get_vocab()
    rows: list[dict[str, Any]] = []
    for example, text in enumerate(texts):
        ids_a, ids_b, pos_a, pos_b = aligned_positions(text, source, target, skip_first=1)
        if not pos_a:
            continue
        k = rng.randrange(len(pos_a))
        i_a, i_b = pos_a[k], pos_b[k]
        logp_a, states = source_reading(source, ids_a, i_a, source_layers)
        own = int(logp_a.argmax())
        prefix = list(ids_b[: i_b + 1])
        # B's unpatched prediction, as a zero added after B's last block: exact (h + 0 = h), and in the fast
        # engine's wave it replays every block from the unpatched pass, so it costs one unembedding, not a forward
        unpatched = Patch(target.n_layers - 1, [i_b], torch.zeros(1, target.hidden_size, dtype=target.dtype), mode="add")
        runs = [PatchedRun(prefix, [unpatched])]
        keys: list[tuple[int, int]] = []
        for s in source_layers:
            h = states[source_layers.index(s)]
            for t in target_layers:
                runs.append(PatchedRun(prefix, [Patch(t, [i_b], maps[(s, t)](h[None]).to(target.dtype))]))
                keys.append((s, t))
        # the fast engine where it is exact (the variants share B's prefix)
        outs = ReplayExecutor().decode(target, DecodeGroup(NextToken(), []), runs, batch_size, None)
        expected = source.token_strings([own])[0]
        floor = target.token_strings([int(outs[0].logits.argmax())])[0]
        for (s, t), out in zip(keys, outs[1:]):
            top = int(out.logits.argmax())
            patched = target.token_strings([top])[0]
            rows.append(
                {
                    "example": example,
                    "source_position": i_a,
                    "target_position": i_b,
                    "source_layer": s,
                    "target_layer": t,
                    "source_top1": expected,
                    "patched_top1": patched,
                    "hit": _norm_token(patched) == _norm_token(expected),
                    "floor_top1": floor,
                    "floor_hit": _norm_token(floor) == _norm_token(expected),
                    "surprisal": float(-logp_a[top]) if same_vocab and top < logp_a.numel() else float("nan"),
                }
            )
    return rows


def entity_rows(
    setting: str,
    model: ModelHandle,
    target: ModelHandle,
    entities: pd.DataFrame,
    layers: list[int],
    maps: dict[tuple[int, int], AffineMap] | None,
    max_new_tokens: int = 20,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Entity descriptions from ``model``'s layer ℓ decoded by ``target`` at ℓ* = ℓ (through ``maps`` if given)."""
    from patchscopes.scope import Generate

    df = sweep(
        model,
        list(entities["entity"]),
        ENTITY_DESCRIPTION.with_decoding(Generate(max_new_tokens=max_new_tokens)),
        source_layers=layers,
        target_layers="same",
        mapping=None if maps is None else _per_pair(maps),
        target_model=None if target is model else target,
        batch_size=batch_size,
        progress=False,
    )
    rows = []
    for r in records(df):
        entity = entities.iloc[int(r["example"])]
        description = first_entry(str(r["text"]))
        rows.append(
            {
                "setting": setting,
                "entity": entity["entity"],
                "popularity": entity["popularity"],
                "layer": int(r["source_layer"]),
                "generated": description,
                "rougeL": rouge_l(description, entity["description"]),
            }
        )
    return rows


def pick_entities(n: int, seed: int) -> pd.DataFrame:
    """``n`` entities, half popular and half rare, chosen by ``seed``."""
    table = load_entities()
    parts = []
    for label in ("popular", "rare"):
        group = table[table.popularity == label]
        parts.append(group.sample(n=min(len(group), (n + 1) // 2), random_state=seed))
    return pd.concat(parts, ignore_index=True).head(n) if n else table.head(0)


def run_cross_model(
    config: CrossModelConfig,
    out: str | Path,
    maps_root: str | Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda _: None,
    device: str = "cpu",
    device_map: str | None = None,
) -> dict[str, Any]:
    """Fit (or reuse) the maps, run both evaluations, write tables and ``summary.json`` under ``out``."""
    source = load_model(config.source, dtype=config.dtype, device=device, device_map=device_map)
    target = load_model(config.target, dtype=config.dtype, device=device, device_map=device_map)
    src_layers = list(config.source_layers) or layer_grid(source.n_layers, config.layer_step)
    tgt_layers = list(config.target_layers) or layer_grid(target.n_layers, config.layer_step)
    ent_layers = [layer for layer in config.entity_layers if layer < min(source.n_layers, target.n_layers)]
    pairs = sorted({(s, t) for s in src_layers for t in tgt_layers} | {(layer, layer) for layer in ent_layers})
    store = ResultStore(
        out,  # both models load in config.dtype; dtype_entry records what "auto" became
        {"eval": "cross-model", **asdict(config), "source_sha": source.weights_sha256, "target_sha": target.weights_sha256,
         **dtype_entry(source.dtype)},
    )  # fmt: skip
    maps_store = MapStore(maps_root)
    fit_texts = corpus_texts(config.n_fit_texts, config.seed)
    eval_texts = corpus_texts(config.n_eval_texts, config.seed, offset=config.n_fit_texts)
    tag = f"wiki{config.n_fit_texts}-s{config.seed}" + (f"-r{config.ridge:g}" if config.ridge else "")
    tag += f"-n{config.max_norm_ratio:g}" if config.max_norm_ratio is not None else ""
    log(f"maps: {len(pairs)} layer pairs, {len(fit_texts)} fit texts, store {maps_store.root}")
    fit_args = (config.ridge, config.heldout, config.skip_first, progress, config.ridge_grid, config.max_norm_ratio)
    maps = get_maps(source, target, pairs, fit_texts, maps_store, tag, *fit_args)
    map_rows = [
        {
            "source_layer": s,
            "target_layer": t,
            "r2": m.metadata.get("r2"),
            "n_fit": m.metadata.get("n_fit"),
            "ridge_relative": m.metadata.get("ridge_relative"),
            "name": pair_name(source.name, target.name, s, t, tag),
        }
        for (s, t), m in sorted(maps.items())
    ]
    store.append("maps", "all", map_rows)
    chunk = 10
    # the official variant first (the notebook's prompt_target = prompt): a run cut short still has it
    for start in range(0, len(eval_texts), chunk) if config.same_text else ():
        if store.done("same_text", start):
            continue
        batch = eval_texts[start : start + chunk]
        rows = same_text_rows(source, target, maps, batch, src_layers, tgt_layers, config.seed + start, config.batch_size)
        for row in rows:
            row["example"] += start
        store.append("same_text", start, rows)
        log(f"  same-text variant: texts {start + len(batch)}/{len(eval_texts)}")
    log(f"next-token Precision@1: {len(eval_texts)} texts × {len(src_layers)}×{len(tgt_layers)} layer pairs")
    for start in range(0, len(eval_texts), chunk):
        if store.done("next_token", start):
            continue
        rows = next_token_rows(
            source,
            target,
            maps,
            eval_texts[start : start + chunk],
            src_layers,
            tgt_layers,
            config.seed + start,
            config.batch_size,
        )
        for row in rows:
            row["example"] += start
        store.append("next_token", start, rows)
        log(f"  texts {start + len(rows) // max(1, len(src_layers) * len(tgt_layers))}/{len(eval_texts)}")
    entities = pick_entities(config.n_entities, config.seed)
    settings = [
        (f"{source.name}→{source.name}", source, source, None),
        (f"{target.name}→{target.name}", target, target, None),
        (f"{source.name}→{target.name}", source, target, maps),
    ]
    for setting, model, tmodel, setting_maps in settings:
        for start in range(0, len(entities), chunk):
            key = [setting, start]
            if store.done("entities", key) or not ent_layers:
                continue
            part = entities.iloc[start : start + chunk].reset_index(drop=True)
            store.append(
                "entities",
                key,
                entity_rows(setting, model, tmodel, part, ent_layers, setting_maps, config.max_new_tokens, config.batch_size),
            )
        log(f"  entity descriptions: {setting} done")
    return summarize(store, source, target)


def summarize(store: ResultStore, source: ModelHandle, target: ModelHandle) -> dict[str, Any]:
    """Precision@1 per layer pair, RougeL per (setting, popularity, layer), R² per map; written to ``summary.json``."""
    nt = store.frame("next_token")
    ent = store.frame("entities")
    maps = store.frame("maps")
    summary: dict[str, Any] = {"source": source.name, "target": target.name}
    if len(nt):
        grid = records(nt.groupby(["source_layer", "target_layer"])["hit"].mean().reset_index())
        best = max(grid, key=lambda r: r["hit"])  # the first of equal maxima
        diagonal = nt[nt.source_layer * (target.n_layers - 1) == nt.target_layer * (source.n_layers - 1)]
        summary["next_token"] = {
            "n_texts": int(nt.example.nunique()),
            "precision_at_1": {f"{int(r['source_layer'])}->{int(r['target_layer'])}": round(float(r["hit"]), 4) for r in grid},
            "best_pair": [int(best["source_layer"]), int(best["target_layer"])],
            "best_precision_at_1": round(float(best["hit"]), 4),
            "mean_precision_at_1": round(float(nt.hit.mean()), 4),
            # what always answering A's most frequent top-1 token would score: the floor to read the grid against
            "majority_baseline": round(
                float(nt.drop_duplicates("example").source_top1.str.strip().str.lower().value_counts(normalize=True).iloc[0]), 4
            ),
            "last_to_last": round(float(diagonal[diagonal.source_layer == source.n_layers - 1].hit.mean()), 4)
            if len(diagonal)
            else None,
        }
    same = store.frame("same_text")
    if len(same):
        grid = records(same.groupby(["source_layer", "target_layer"])["hit"].mean().reset_index())
        best = max(grid, key=lambda r: r["hit"])
        first = same.drop_duplicates("example")
        summary["same_text"] = {
            "n_texts": int(same.example.nunique()),
            "precision_at_1": {f"{int(r['source_layer'])}->{int(r['target_layer'])}": round(float(r["hit"]), 4) for r in grid},
            "best_pair": [int(best["source_layer"]), int(best["target_layer"])],
            "best_precision_at_1": round(float(best["hit"]), 4),
            "unpatched_floor": round(float(first.floor_hit.mean()), 4),
            "mean_surprisal": round(float(same.surprisal.mean()), 4) if same.surprisal.notna().any() else None,
        }
        store.write_csv("same_text.csv", same)
    if len(ent):
        curves: dict[str, dict[int, float]] = {}
        for r in records(ent.groupby(["setting", "popularity", "layer"])["rougeL"].mean().round(4).reset_index()):
            curves.setdefault(f"{r['setting']} | {r['popularity']}", {})[int(r["layer"])] = float(r["rougeL"])
        summary["entity_rougeL"] = curves
    if len(maps):
        summary["map_r2"] = {
            f"{int(r['source_layer'])}->{int(r['target_layer'])}": round(float(r["r2"]), 4)
            for r in records(maps)
            if r["r2"] is not None
        }
    store.write_json("summary.json", summary)
    return summary


def plot_results(store: ResultStore, source: str, target: str) -> list[Path]:
    """Heatmap of Precision@1 and RougeL curves by layer, as PNG files in the run directory."""
    from patchscopes import plots

    written = []
    nt = store.frame("next_token")
    if len(nt):
        nt["hit"] = nt["hit"].astype(float)
        fig = plots.heatmap(nt, value="hit", title=f"Precision@1\n{source} → {target}")
        written.append(plots.save(fig, store.directory / "precision_at_1.png"))
    same = store.frame("same_text")
    if len(same):
        same["hit"] = same["hit"].astype(float)
        floor = float(same.drop_duplicates("example")["floor_hit"].astype(float).mean())
        title = f"Precision@1, same text (B unpatched: {floor:.2f})\n{source} → {target}"
        written.append(
            plots.save(plots.heatmap(same, value="hit", title=title), store.directory / "same_text_precision_at_1.png")
        )
    ent = store.frame("entities")
    if len(ent):
        ent["curve"] = ent["setting"] + " (" + ent["popularity"] + ")"
        fig = plots.layer_curves(
            ent, value="rougeL", by="curve", layer="layer", title="entity description, RougeL", ylabel="RougeL"
        )
        written.append(plots.save(fig, store.directory / "entity_rougeL.png"))
    return written
