"""Multi-hop CoT Patchscope (Patchscopes paper §5 and App. F) on two-hop queries built from the relations data.

A two-hop query chains τ1 = (σ1, ρ1, ω1) and τ2 = (σ2 = ω1, ρ2, ω2) as ``[π2][π1]``, e.g. π2 = "The CEO of",
π1 = "the company that created Visual Basic", ending with " is". The CoT Patchscope takes the hidden
state at the last token of π1 (layer ℓ) and writes it over the last token of π2 — the token just before
π1 — at layer ℓ*, then generates 20 tokens greedily. As in the paper, π1 is computed without any view of
π2 and π2 without any view of π1: one forward pass over the whole query with an attention mask in which
π1's tokens cannot attend to π2's (π2 cannot see π1 anyway, by causality); special tokens such as
``<bos>`` belong to neither part and stay visible. Tokens after π1 (" is" and the generated ones) see
everything. Baselines: the plain query ("vanilla") and "Let's think step by step. " + query.

Only queries whose two single hops the model answers (the object within 20 generated tokens) are kept.
Reported: vanilla and CoT accuracy, the paper's **oracle** (a query counts if *any* (ℓ, ℓ*) pair answers
it) and an **honest** number (one pair chosen on one half of the queries, scored on the other, both ways).

    >>> queries = build_queries(load_relations(), max_per_combo=20)            # doctest: +SKIP
    >>> summary = run_multihop(MultihopConfig(model="Gemma-3-270M"), "runs/multihop")   # doctest: +SKIP
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch

from patchscopes.batching import chunks
from patchscopes.errors import PatchscopeError
from patchscopes.evals.cross_model import records
from patchscopes.models.loading import ModelHandle, load_model
from patchscopes.patching import Patch, PatchedRun, run_patched, trace
from patchscopes.positions import char_span_to_tokens
from patchscopes.relations.data import Relation, load_relations
from patchscopes.results import ResultStore, model_entry

#: How each relation is phrased as a noun phrase around its subject; the project's own wording.
HOP_PHRASES: dict[str, str] = {
    "product by company": "the company that created {}",
    "company CEO": "the CEO of {}",
    "company hq": "the headquarters city of {}",
    "food from country": "the country of origin of {}",
    "city in country": "the country containing {}",
    "landmark in country": "the country containing {}",
    "country capital city": "the capital city of {}",
    "country currency": "the official currency of {}",
    "country language": "the official language of {}",
    "country largest city": "the largest city of {}",
    "person father": "the father of {}",
    "person mother": "the mother of {}",
    "person university": "the university attended by {}",
}
COT_PREFIX = "Let's think step by step. "


class MultihopError(PatchscopeError, ValueError):
    """A multi-hop query or configuration that cannot be used as given."""


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class TwoHopQuery:
    """``[π2][π1] is`` with the subject, bridge entity (ω1 = σ2) and accepted final answers."""

    hop1: str
    hop2: str
    subject: str
    bridge: str
    answers: tuple[str, ...]

    @property
    def pi1(self) -> str:
        return HOP_PHRASES[self.hop1].format(self.subject)

    @property
    def pi2(self) -> str:
        return _cap(HOP_PHRASES[self.hop2].removesuffix("{}").rstrip())

    @property
    def prompt(self) -> str:
        return f"{self.pi2} {self.pi1} is"

    @property
    def hop1_prompt(self) -> str:
        return _cap(self.pi1) + " is"

    @property
    def hop2_prompt(self) -> str:
        return _cap(HOP_PHRASES[self.hop2].format(self.bridge)) + " is"

    @property
    def combo(self) -> str:
        return f"{self.hop1} -> {self.hop2}"


def _norm(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", text.lower())


def answered(text: str, answers: Sequence[str]) -> bool:
    """Whether any accepted answer appears in ``text`` (case, spaces and punctuation ignored)."""
    generated = _norm(text)
    return any(_norm(a) and _norm(a) in generated for a in answers)


def build_queries(
    relations: dict[str, Relation], max_per_combo: int = 30, seed: int = 0, phrases: dict[str, str] | None = None
) -> list[TwoHopQuery]:
    """Every two-hop query whose first object is the second relation's subject, at most ``max_per_combo``
    per relation pair (a seeded sample; 0 keeps them all), for the relations that have a phrasing."""
    phrases = phrases or HOP_PHRASES
    for name, phrase in phrases.items():
        if not phrase.endswith("{}"):
            raise MultihopError(f"the phrasing of {name!r} must end with the subject slot '{{}}', got {phrase!r}")
    usable = {name: rel for name, rel in relations.items() if name in phrases}
    by_subject: dict[str, dict[str, list[str]]] = {}
    for name, rel in usable.items():
        table: dict[str, list[str]] = {}
        for sample in rel.samples:
            table.setdefault(sample.subject, []).append(sample.object)
        by_subject[name] = table
    queries: list[TwoHopQuery] = []
    rng = random.Random(seed)
    for hop1 in sorted(usable):
        for hop2 in sorted(usable):
            found = []
            for sample in usable[hop1].samples:
                answers = by_subject[hop2].get(sample.object)
                circular = _norm(sample.subject) in {_norm(a) for a in answers or []} | {_norm(sample.object)}
                if answers and not circular:
                    found.append(TwoHopQuery(hop1, hop2, sample.subject, sample.object, tuple(sorted(set(answers)))))
            found = sorted(set(found), key=lambda q: (q.subject, q.bridge))
            rng.shuffle(found)
            queries.extend(found[:max_per_combo] if max_per_combo else found)
    return queries


def query_spans(query: TwoHopQuery, lm: ModelHandle) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the query and the token indices of π2 and π1 (character offsets; no token may straddle)."""
    tok = lm.tokenize(query.prompt)
    start1 = len(query.pi2) + 1
    pi2_tokens = char_span_to_tokens(tok.offsets, 0, len(query.pi2))
    pi1_tokens = char_span_to_tokens(tok.offsets, start1, start1 + len(query.pi1))
    if not pi2_tokens or not pi1_tokens or set(pi2_tokens) & set(pi1_tokens):
        raise MultihopError(f"cannot split {query.prompt!r} into π2 and π1 tokens with {lm.name}'s tokenizer")
    return tok.ids, pi2_tokens, pi1_tokens


def blind_pi1(pi2: list[int], pi1: list[int]) -> tuple[list[int], list[int]] | None:
    """The attention restriction of the CoT Patchscope: π1's tokens do not see π2's (none when either is empty)."""
    return (list(pi1), list(pi2)) if pi1 and pi2 else None


@torch.no_grad()
def restricted_states(
    lm: ModelHandle, parts: Sequence[tuple[list[int], list[int], list[int]]], layers: Sequence[int], batch_size: int = 32
) -> list[torch.Tensor]:
    """Per query ``(ids, π2, π1)``: the hidden states ``[len(layers), d]`` at π1's last token, read on a prefill
    where π1 does not attend to π2."""
    states: list[torch.Tensor] = []
    for group in chunks(list(parts), batch_size):
        _, seen, batch = trace(lm, [ids for ids, _, _ in group], layers=layers, blind=[blind_pi1(p2, p1) for _, p2, p1 in group])
        for row, (_, _, pi1) in enumerate(group):
            col = batch.padded(row, pi1[-1])
            states.append(torch.stack([seen[layer][row, col] for layer in layers]).float().cpu())
    return states


def greedy_texts(lm: ModelHandle, prompts: Sequence[str], max_new_tokens: int = 20, batch_size: int = 32) -> list[str]:
    """Plain greedy continuations (the core engine without patches)."""
    outs = run_patched(lm, [PatchedRun(lm.tokenize(p).ids) for p in prompts], max_new_tokens, batch_size)
    return [lm.tokenizer.decode(o.generated) for o in outs]


def cot_patchscope_rows(
    lm: ModelHandle,
    queries: Sequence[TwoHopQuery],
    source_layers: Sequence[int],
    target_layers: Sequence[int],
    max_new_tokens: int = 20,
    batch_size: int = 32,
    donors: Sequence[TwoHopQuery] | None = None,
) -> list[dict[str, Any]]:
    """One row per (query, ℓ, ℓ*): the CoT Patchscope's generation and whether it holds the answer.

    ``donors`` (the random-patch control): the state patched into query k is read at the end of
    ``donors[k]``'s π1, on that query's own restricted prefill, instead of query k's."""
    parts = [query_spans(q, lm) for q in queries]
    layers = sorted(set(source_layers))
    states = restricted_states(lm, [query_spans(q, lm) for q in donors] if donors else parts, layers, batch_size)
    runs, keys = [], []
    for qi, (ids, pi2, pi1) in enumerate(parts):
        for s in source_layers:
            vector = states[qi][layers.index(s)]
            for t in target_layers:
                runs.append(PatchedRun(ids, [Patch(t, [pi2[-1]], vector[None])], blind_pi1(pi2, pi1)))
                keys.append((qi, s, t))
    generated = [out.generated for out in run_patched(lm, runs, max_new_tokens, batch_size)]
    rows = []
    for (qi, s, t), ids in zip(keys, generated):
        text = lm.tokenizer.decode(ids)
        rows.append(
            {"query": qi, "source_layer": s, "target_layer": t, "text": text, "correct": answered(text, queries[qi].answers)}
        )
    return rows


def honest_accuracy(rows: Sequence[dict[str, Any]], query_ids: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """Pick the (ℓ, ℓ*) pair with the best accuracy on one half of the queries, score it on the other half, both ways.

    Each fold lists the pair, the half sizes, its accuracy and the ids of the queries it answered."""
    ids = sorted(set(query_ids))
    random.Random(seed).shuffle(ids)
    halves = [set(ids[: len(ids) // 2]), set(ids[len(ids) // 2 :])]
    folds: list[dict[str, Any]] = []
    for pick, score in ((0, 1), (1, 0)):
        acc: dict[tuple[int, int], list[bool]] = {}
        for r in rows:
            if r["query"] in halves[pick]:
                acc.setdefault((r["source_layer"], r["target_layer"]), []).append(bool(r["correct"]))
        if not acc or not halves[score]:
            continue
        best = max(sorted(acc), key=lambda k: sum(acc[k]) / len(acc[k]))
        scored = {
            int(r["query"]): bool(r["correct"])
            for r in rows
            if r["query"] in halves[score] and (r["source_layer"], r["target_layer"]) == best
        }
        folds.append(
            {
                "pair": [int(x) for x in best],
                "chosen_on": len(halves[pick]),
                "scored_on": len(scored),
                "accuracy": sum(scored.values()) / len(scored),
                "correct_queries": sorted(q for q, ok in scored.items() if ok),
            }
        )
    total = sum(f["scored_on"] for f in folds)
    mean = sum(f["accuracy"] * f["scored_on"] for f in folds) / total if total else float("nan")
    return {"folds": folds, "accuracy": mean}


@dataclass(frozen=True)
class MultihopConfig:
    """Everything a multi-hop run depends on (saved in ``config.json``)."""

    model: str = "SmolLM2-135M"
    max_per_combo: int = 30
    max_queries: int = 0  # 0: every query that passes the single-hop filter
    layer_step: int = 3
    max_new_tokens: int = 20
    dtype: str = "float32"
    seed: int = 0
    batch_size: int = 48
    relations_dir: str = ""
    random_control: bool = True  # also patch the π1 state of another kept query (another bridge entity)


def random_donor(query_id: int, kept: Sequence[int], queries: Sequence[TwoHopQuery], seed: int) -> int | None:
    """The random-patch control's donor for a query: a kept query with another bridge entity, drawn by a
    seed of its own (so a resumed run draws the same); None when every kept query shares the bridge."""
    others = sorted(k for k in kept if queries[k].bridge != queries[query_id].bridge)
    return random.Random(f"{seed}-{query_id}").choice(others) if others else None


#: Distinct single-hop prompts answered per saved unit of the filter.
FILTER_CHUNK = 64


def single_hop_answers(
    lm: ModelHandle,
    store: ResultStore,
    prompts: Sequence[str],
    config: MultihopConfig,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, str]:
    """Greedy answers to the single-hop checks, each distinct prompt once (queries share first hops and
    bridges: 2,544 queries ask 1,333 distinct questions), saved in chunks so an interrupted filter resumes."""
    unique = sorted(set(prompts))
    for k, part in enumerate(chunks(unique, FILTER_CHUNK)):
        if store.done("single_hops", k):
            continue
        texts = greedy_texts(lm, part, config.max_new_tokens, config.batch_size)
        store.append("single_hops", k, [{"prompt": p, "text": t} for p, t in zip(part, texts)])
        log(f"  single-hop checks: {min((k + 1) * FILTER_CHUNK, len(unique))}/{len(unique)} prompts")
    frame = store.frame("single_hops")
    return dict(zip(frame["prompt"], frame["text"]))


def run_multihop(
    config: MultihopConfig,
    out: str | Path,
    log: Callable[[str], None] = lambda _: None,
    device: str = "cpu",
    device_map: str | None = None,
) -> dict[str, Any]:
    """Build, filter and evaluate the queries; resumable per query; writes ``summary.json`` under ``out``."""
    lm = load_model(config.model, dtype=config.dtype, device=device, device_map=device_map)
    store = ResultStore(out, {"eval": "multihop", **asdict(config), **model_entry(lm)})
    relations = load_relations(config.relations_dir or None)
    queries = build_queries(relations, config.max_per_combo, config.seed)
    log(f"{len(queries)} two-hop queries over {len({q.combo for q in queries})} relation pairs")
    if not store.done("filter", "all"):
        answers = single_hop_answers(lm, store, [p for q in queries for p in (q.hop1_prompt, q.hop2_prompt)], config, log)
        hop1 = [answers[q.hop1_prompt] for q in queries]
        hop2 = [answers[q.hop2_prompt] for q in queries]
        rows = [
            {"query": i, "combo": q.combo, "prompt": q.prompt, "bridge": q.bridge, "answers": list(q.answers),
             "hop1_text": h1, "hop2_text": h2, "hop1_ok": answered(h1, [q.bridge]), "hop2_ok": answered(h2, q.answers)}
            for i, (q, h1, h2) in enumerate(zip(queries, hop1, hop2))
        ]  # fmt: skip
        store.append("filter", "all", rows)
    filt = store.frame("filter")
    kept = [int(i) for i in filt[filt.hop1_ok & filt.hop2_ok]["query"]]
    all_kept = sorted(kept)
    random.Random(config.seed).shuffle(kept)  # a budget-capped or interrupted run then still covers the relation pairs
    if config.max_queries:
        kept = kept[: config.max_queries]
    log(f"{len(kept)} queries with both single hops answered")
    layers = sorted(set(range(0, lm.n_layers, config.layer_step)) | {lm.n_layers - 1})
    for qi in kept:
        if store.done("queries", qi):
            continue
        q = queries[qi]
        vanilla, cot = greedy_texts(lm, [q.prompt, COT_PREFIX + q.prompt], config.max_new_tokens)
        patch_rows = cot_patchscope_rows(lm, [q], layers, layers, config.max_new_tokens, config.batch_size)
        for r in patch_rows:
            r["query"] = qi
        donor = random_donor(qi, all_kept, queries, config.seed) if config.random_control else None
        control_rows = []
        if donor is not None:
            control_rows = cot_patchscope_rows(
                lm, [q], layers, layers, config.max_new_tokens, config.batch_size, donors=[queries[donor]]
            )
            for r in control_rows:
                r.update(query=qi, donor=donor)
        baselines = [
            {"query": qi, "combo": q.combo, "kind": kind, "text": text, "correct": answered(text, q.answers)}
            for kind, text in (("vanilla", vanilla), ("cot", cot))
        ]
        store.append(
            "queries",
            qi,
            baselines
            + [{"combo": q.combo, "kind": "patchscope", **r} for r in patch_rows]
            + [{"combo": q.combo, "kind": "random_patch", **r} for r in control_rows],
        )
        log(f"  query {qi}: {q.prompt!r}")
    return summarize(store, config, len(queries))


def versus_vanilla(rows: pd.DataFrame, oracle: pd.Series, heldout: dict[str, Any]) -> dict[str, int]:
    """Where the methods differ from vanilla prompting, query by query: how many composition failures each one
    repairs, and how many vanilla answers the held-out Patchscope pair loses."""
    vanilla = rows[rows.kind == "vanilla"].set_index("query")["correct"].astype(bool)
    cot = rows[rows.kind == "cot"].set_index("query")["correct"].astype(bool)
    held_ok = {int(q) for fold in heldout["folds"] for q in fold["correct_queries"]}
    scored = set(vanilla.index)
    wrong, right = [q for q in scored if not vanilla[q]], [q for q in scored if vanilla[q]]
    return {
        "vanilla_wrong": len(wrong),
        "repaired_by_cot_prompt": sum(bool(cot[q]) for q in wrong),
        "repaired_by_patchscope_oracle": sum(bool(oracle[q]) for q in wrong),
        "repaired_by_patchscope_heldout_pair": sum(int(q) in held_ok for q in wrong),
        "vanilla_right": len(right),
        "lost_by_cot_prompt": sum(not cot[q] for q in right),
        "lost_by_patchscope_heldout_pair": sum(int(q) not in held_ok for q in right),
    }


def per_query_table(rows: pd.DataFrame, heldout: dict[str, Any], control_heldout: dict[str, Any] | None) -> pd.DataFrame:
    """One row per evaluated query: 0/1 for vanilla, the CoT prompt, the Patchscope (oracle over pairs, and
    the pair chosen on the other half) and, where it ran, the random-patch control scored the same two ways."""

    def oracle(kind: str) -> pd.Series:
        return rows[rows.kind == kind].groupby("query")["correct"].any().astype(int)

    def held(result: dict[str, Any] | None, index: pd.Index) -> pd.Series:
        scored = {int(q) for fold in (result or {}).get("folds", []) for q in fold["correct_queries"]}
        return pd.Series([int(int(q) in scored) for q in index], index=index)

    first = rows.drop_duplicates("query").set_index("query")
    table = pd.DataFrame({"combo": first["combo"]})
    for kind in ("vanilla", "cot"):
        table[kind] = rows[rows.kind == kind].set_index("query")["correct"].astype(int)
    table["patchscope_oracle"] = oracle("patchscope")
    table["patchscope_heldout"] = held(heldout, table.index)
    if control_heldout is not None:
        table["random_patch_oracle"] = oracle("random_patch")
        table["random_patch_heldout"] = held(control_heldout, table.index)
    return table.reset_index()


def summarize(store: ResultStore, config: MultihopConfig, n_built: int) -> dict[str, Any]:
    """Accuracies (vanilla, CoT prompt, CoT Patchscope oracle and held-out) and per-pair accuracy; ``summary.json``."""
    rows = store.frame("queries")
    summary: dict[str, Any] = {"model": config.model, "n_built": n_built}
    filt = store.frame("filter")
    if len(filt):
        summary["n_hop1_ok"] = int(filt.hop1_ok.sum())
        summary["n_hop2_ok"] = int(filt.hop2_ok.sum())
        summary["n_both_ok"] = int((filt.hop1_ok & filt.hop2_ok).sum())
    if not len(rows):
        store.write_json("summary.json", summary)
        return summary
    patch = rows[rows.kind == "patchscope"]
    per_query = patch.groupby("query")["correct"].any()
    grid = patch.groupby(["source_layer", "target_layer"])["correct"].mean()
    best = cast(tuple[int, int], grid.idxmax())
    heldout = honest_accuracy(records(patch), [int(q) for q in per_query.index], config.seed)
    control = rows[rows.kind == "random_patch"]
    control_heldout = None
    if len(control):
        control_heldout = honest_accuracy(records(control), [int(q) for q in per_query.index], config.seed)
        summary["random_patch_oracle"] = float(control.groupby("query")["correct"].any().mean())
        summary["random_patch_heldout"] = control_heldout
    table = per_query_table(rows, heldout, control_heldout)
    store.write_csv("queries.csv", table)
    wrong = table[table.vanilla == 0]
    if len(wrong):
        summary["repair_rate_among_vanilla_failures"] = {
            column: float(wrong[column].mean()) for column in table.columns if column not in ("query", "combo", "vanilla")
        }
    summary.update(
        {
            "n_evaluated": int(rows["query"].nunique()),
            "vanilla": float(rows[rows.kind == "vanilla"].correct.mean()),
            "cot_prompt": float(rows[rows.kind == "cot"].correct.mean()),
            "patchscope_oracle": float(per_query.mean()),
            "patchscope_best_single_pair_in_sample": {"pair": [int(best[0]), int(best[1])], "accuracy": float(grid.max())},
            "patchscope_heldout": heldout,
            "versus_vanilla": versus_vanilla(rows, per_query, heldout),
            "by_combo": {c: int(n) for c, n in rows.drop_duplicates("query").combo.value_counts().items()},
            "pair_accuracy": {
                f"{int(r['source_layer'])}->{int(r['target_layer'])}": round(float(r["correct"]), 4)
                for r in records(grid.reset_index())
            },
        }
    )
    store.write_json("summary.json", summary)
    return summary


def summarize_run(out: str | Path) -> dict[str, Any]:
    """Recompute ``summary.json`` and ``queries.csv`` of a run directory from what it holds, without the model:
    an interrupted run is summarised on the queries it finished (a seeded random subset of the kept ones)."""
    store = ResultStore.reopen(out)
    fields = {k: v for k, v in store.config.items() if k in MultihopConfig.__dataclass_fields__}
    return summarize(store, MultihopConfig(**fields), len(store.frame("filter")))


def plot_results(store: ResultStore, model: str) -> list[Path]:
    """Heatmap of CoT Patchscope accuracy per (ℓ, ℓ*)."""
    from patchscopes import plots

    rows = store.frame("queries")
    if not len(rows):
        return []
    patch = rows[rows.kind == "patchscope"].copy()
    patch["correct"] = patch["correct"].astype(float)
    fig = plots.heatmap(patch, value="correct", title=f"CoT Patchscope accuracy\n{model}")
    return [plots.save(fig, store.directory / "cot_patchscope.png")]
