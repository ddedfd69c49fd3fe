"""The LRC paper's Table 5 on any bundled model: accuracy and causality of LRC, LRC (first token, final
layer), linear SVM and input averaging, macro-averaged over relations, mean ± std over seeds.

Per relation: keep the subjects whose few-shot prompt the model answers correctly; per seed, split them
50/50 per object (≥ 1 training sample per object; relations left without a test sample are dropped);
estimate the LREs from ``n_lre`` training prompts, build every method's concepts from the training
prompts, and test on the zero-shot templates of the test subjects. Causality uses the test prompts whose
unedited answer prefers the true object over a random other one. Every (relation, seed) is one unit of
a :class:`~patchscopes.results.ResultStore`, and Jacobians are cached, so an interrupted run resumes.

    >>> cfg = PROFILES["quick"]                                     # doctest: +SKIP
    >>> summary = run_lrc_eval(lm, cfg, "runs/lrc-quick")           # doctest: +SKIP
    >>> summary["table"]["LRC"]["accuracy"]["mean"]                 # doctest: +SKIP
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from patchscopes.errors import PatchscopeError
from patchscopes.layers import resolve_block
from patchscopes.models.loading import ModelHandle
from patchscopes.progress import progress_bar
from patchscopes.relations.baselines import averaging_concepts, svm_concepts
from patchscopes.relations.data import Relation, RelationSample, relations_named
from patchscopes.relations.jcache import JacobianCache
from patchscopes.relations.lrc import ConceptSet, lrc_concepts, subject_states
from patchscopes.relations.lre import estimate_lre
from patchscopes.relations.prompts import (
    RelationPrompt,
    answers_correctly,
    few_shot_prompt,
    filter_correct,
    zero_shot_prompts,
)
from patchscopes.relations.splits import balanced_choice, fold_split, hash_rank, split_by_object
from patchscopes.relations.steering import ConceptEdit, causality, new_and_old_probs
from patchscopes.results import ResultStore, model_entry

METHODS = ("LRC", "LRC (first token, final layer)", "SVM", "input averaging")
SINGLE_SAMPLE_METHODS = ("LRC (n_lre = 1, same object)", "LRC (n_lre = 1, different object)")
SPLITS = ("half", "folds")


class LrcEvalError(PatchscopeError, ValueError):
    """An evaluation configuration that cannot run (unknown relation, bad layers, …)."""


@dataclass(frozen=True)
class LrcConfig:
    """Everything that defines an LRC evaluation run (it is written to the run's ``config.json``)."""

    model: str = "SmolLM2-135M"
    relations: tuple[str, ...] = ("word sentiment", "substance phase of matter")
    seeds: tuple[int, ...] = (42, 43, 44)
    subject_layer: int = 16
    object_layer: int = 20
    final_layer: int = -1
    rank: int = 192
    n_lre: int = 2
    n_examples: int = 3
    beta: float = 0.1
    max_samples: int | None = None
    relations_dir: str | None = None
    batch_size: int = 16
    chosen_by: str = "fixed"
    # The paper's protocol in full (profile "paper"); the defaults keep the pilot's runs and configurations.
    split: str = "half"  # "half": each seed re-splits 50/50 per object; "folds": the seeds index disjoint test folds
    fold_seed: int = 42  # the seed that deals the folds (split = "folds")
    balanced_lre: bool = False  # LRE prompts spread evenly over the objects (the paper) instead of the hash order
    filter_test: bool = False  # keep only the zero-shot test prompts the model answers (the official code)
    min_test: int = 0  # drop a (relation, seed) with fewer test prompts (the paper: 5)
    betas: tuple[float, ...] = ()  # causality at each β; one β per method chosen on training subjects' prompts
    max_val_edits: int = 8  # validation edits per (relation, seed) for choosing β (pooled over units)
    single_sample: bool = False  # Table 6: LRCs from an LRE of one training prompt, of the same or another object


PROFILES: dict[str, LrcConfig] = {
    # CI: one small relation, one seed, a single LRE prompt, layers close to the top so the Jacobians are cheap.
    "quick": LrcConfig(
        relations=("word sentiment",), seeds=(42,), subject_layer=26, object_layer=27, n_lre=1, rank=64, max_samples=24
    ),
    # The documented run: two relations with few values, three seeds (CPU-bound by the Jacobians; see docs/lrc.md).
    "default": LrcConfig(relations=("word sentiment", "substance phase of matter"), seeds=(42, 43, 44), max_samples=60),
    # The paper's protocol (Tables 5-8, Table 6) at the size two CPU cores allow: ten many-to-one relations (factual,
    # commonsense, bias; SmolLM2-135M answers no linguistic one zero-shot), at most 200 samples each, 20 LRE prompts
    # balanced over objects, 4 few-shot examples, answered test prompts only, relations with fewer than 5 test
    # prompts (over the folds) dropped, 5 disjoint test folds, β swept per method.
    "paper": LrcConfig(
        relations=(
            "person native language",
            "landmark in country",
            "product by company",
            "person plays instrument",
            "plays pro sport",
            "landmark on continent",
            "object superclass",
            "substance phase of matter",
            "occupation gender",
            "occupation age",
        ),
        seeds=(0, 1, 2, 3, 4),
        subject_layer=16,
        object_layer=24,
        rank=192,
        n_lre=20,
        n_examples=4,
        max_samples=200,
        chosen_by="fixed: layers and rank from the pilot's validation sweep",
        split="folds",
        balanced_lre=True,
        filter_test=True,
        min_test=5,
        betas=(0.05, 0.1, 0.2, 0.4),
        single_sample=True,
    ),
}


@dataclass
class SplitData:
    """One (relation, seed) split with its prompts."""

    relation: Relation
    train: list[RelationSample]
    test: list[RelationSample]
    train_prompts: list[RelationPrompt] = field(default_factory=list)
    lre_prompts: list[RelationPrompt] = field(default_factory=list)
    test_prompts: list[RelationPrompt] = field(default_factory=list)


def select_relations(cfg: LrcConfig) -> list[Relation]:
    """The configured relations (by their ``name`` field), from the data directory or ``relations_dir``."""
    return relations_named(cfg.relations, cfg.relations_dir, LrcEvalError)


def correct_samples(lm: ModelHandle, relation: Relation, cfg: LrcConfig, store: ResultStore | None) -> list[RelationSample]:
    """Samples answered correctly with the few-shot prompt (cached in the store's ``filtered`` table)."""
    if store is not None and store.done("filtered", relation.name):
        frame = store.frame("filtered")
        frame = frame[frame["relation"] == relation.name]
        return [RelationSample(s, o) for s, o in zip(frame["subject"], frame["object"]) if s]
    samples = list(relation.samples)
    if cfg.max_samples is not None and len(samples) > cfg.max_samples:
        samples = random.Random(0).sample(samples, cfg.max_samples)
    rel = replace(relation, samples=tuple(samples))
    kept = filter_correct(lm, rel, n_examples=cfg.n_examples, batch_size=cfg.batch_size)
    if store is not None:
        rows = [{"relation": relation.name, "subject": s.subject, "object": s.object} for s in kept]
        store.append("filtered", relation.name, rows or [{"relation": relation.name, "subject": "", "object": ""}])
    return kept


def make_split(
    relation: Relation, samples: Sequence[RelationSample], seed: int, cfg: LrcConfig, prefer: set[str] | None = None
) -> SplitData:
    """The split of ``seed``; LRE prompts are the first ``n_lre`` training samples in a fixed random order,
    those in ``prefer`` (subjects in the training split of every seed) first, so seeds share Jacobians
    (``balanced_lre``: spread evenly over the objects in that order instead)."""
    if cfg.split not in SPLITS:
        raise LrcEvalError(f"split {cfg.split!r} is not one of {', '.join(SPLITS)}")
    if cfg.split == "folds":
        train, test = fold_split(samples, cfg.seeds.index(seed), len(cfg.seeds), cfg.fold_seed, relation.name)
    else:
        train, test = split_by_object(samples, seed)
    data = SplitData(relation, train, test)
    data.train_prompts = [few_shot_prompt(relation, s, cfg.n_examples) for s in train]
    if cfg.balanced_lre:
        chosen = {s.subject for s in balanced_choice(relation.name, train, cfg.n_lre)}
    else:
        ranked = hash_rank(relation.name, train)
        ranked = sorted(ranked, key=lambda s: s.subject not in (prefer or set()))  # stable: keeps the random order
        chosen = {s.subject for s in ranked[: cfg.n_lre]}
    data.lre_prompts = [p for p in data.train_prompts if p.subject in chosen]
    data.test_prompts = [p for s in test for p in zero_shot_prompts(relation, s)]
    return data


def answered(lm: ModelHandle, prompts: Sequence[RelationPrompt], batch_size: int = 16) -> list[RelationPrompt]:
    """The prompts the model answers correctly (greedy, every object token)."""
    return [p for p, ok in zip(prompts, answers_correctly(lm, prompts, batch_size)) if ok] if prompts else []


def single_sample_concepts(
    lm: ModelHandle, data: SplitData, cfg: LrcConfig, jacobians: Callable[..., Any], same_object: bool
) -> ConceptSet:
    """Table 6: each object's LRC from an LRE of one training prompt, of that object or of another one.

    The one prompt is the first in the fixed random order (:func:`hash_rank`) among the training prompts of
    the object (``same_object``) or of the other objects; the concept is the normalised mean of
    W†(o − b) over the object's training prompts, as for the LRC.
    """
    s_layer = resolve_block(cfg.subject_layer, lm.n_layers, "an LRE")
    rank = min(cfg.rank, lm.hidden_size)
    order = {s.subject: i for i, s in enumerate(hash_rank(data.relation.name, data.train))}
    prompts = sorted(data.train_prompts, key=lambda p: order[p.subject])
    names, vectors = [], []
    for name in sorted({p.object for p in prompts}):
        own = [p for p in prompts if p.object == name]
        source = own[0] if same_object else next(p for p in prompts if p.object != name)
        lre = estimate_lre(lm, [source], s_layer, cfg.object_layer, "mean", jacobian_fn=jacobians)
        concept = lrc_concepts(lm, lre, own, rank, cfg.batch_size)
        names.append(name)
        vectors.append(concept.vector(name))
    meta = {"model": lm.name, "relation": data.relation.name, "subject_layer": s_layer, "method": "lrc", "n_lre": 1}
    return ConceptSet(names, torch.stack(vectors), {**meta, "same_object": same_object})


def concept_sets(
    lm: ModelHandle, data: SplitData, cfg: LrcConfig, jacobians: Callable[..., Any], artifacts: Path | None = None
) -> dict[str, ConceptSet]:
    """Every method's concepts, all in the subject space of ``cfg.subject_layer`` (saved under ``artifacts``)."""
    s_layer = resolve_block(cfg.subject_layer, lm.n_layers, "an LRE")
    final = resolve_block(cfg.final_layer, lm.n_layers, "an LRE")
    rank = min(cfg.rank, lm.hidden_size)
    lre = estimate_lre(lm, data.lre_prompts, s_layer, cfg.object_layer, "mean", jacobian_fn=jacobians)
    lre_final = estimate_lre(lm, data.lre_prompts, s_layer, final, "first", jacobian_fn=jacobians)
    states = subject_states(lm, data.train_prompts, s_layer, cfg.batch_size)
    labels = [p.object for p in data.train_prompts]
    meta: dict[str, Any] = {"model": lm.name, "relation": data.relation.name, "subject_layer": s_layer}
    sets = {
        "LRC": lrc_concepts(lm, lre, data.train_prompts, rank, cfg.batch_size),
        "LRC (first token, final layer)": lrc_concepts(lm, lre_final, data.train_prompts, rank, cfg.batch_size),
        "SVM": svm_concepts(states, labels, **meta),
        "input averaging": averaging_concepts(states, labels, **meta),
    }
    if cfg.single_sample:
        for method, same in zip(SINGLE_SAMPLE_METHODS, (True, False)):
            sets[method] = single_sample_concepts(lm, data, cfg, jacobians, same_object=same)
    for concepts in sets.values():
        concepts.metadata["subject_norm"] = float(states.norm(dim=-1).mean())
    if artifacts is not None:
        lre.save(artifacts / "lre")
        lre_final.save(artifacts / "lre-first-token-final-layer")
        for method, concepts in sets.items():
            concepts.save(artifacts / ("concepts-" + re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")))
    return sets


def causal_edits(
    lm: ModelHandle, prompts: Sequence[RelationPrompt], objects: Sequence[str], seed: int, batch_size: int = 16
) -> list[ConceptEdit]:
    """One edit per prompt towards a random other object, kept when the unedited model prefers the true object."""
    rng = random.Random(seed)
    edits = [ConceptEdit(p, p.object, rng.choice([o for o in objects if o != p.object])) for p in prompts]
    if not edits:
        return []
    dummy = ConceptSet(sorted(objects), torch.zeros(len(objects), lm.hidden_size))
    p_new, p_old = new_and_old_probs(lm, dummy, edits, 0.0, batch_size=batch_size)
    return [e for e, o, n in zip(edits, p_old, p_new) if o.min() > n.min()]


def evaluate_concepts(
    lm: ModelHandle,
    concepts: ConceptSet,
    test_prompts: Sequence[RelationPrompt],
    test_states: Any,
    edits: Sequence[ConceptEdit],
    beta: float,
    batch_size: int = 16,
) -> tuple[list[bool], list[bool]]:
    """Per-prompt classification correctness and per-edit causal success."""
    predicted = concepts.classify(test_states)
    accuracy = [pred == p.object for pred, p in zip(predicted, test_prompts)]
    success = causality(lm, concepts, edits, beta, batch_size=batch_size) if edits else []
    return accuracy, success


def validation_edits(lm: ModelHandle, data: SplitData, cfg: LrcConfig, seed: int) -> list[ConceptEdit]:
    """Edits on the training subjects' zero-shot prompts (at most ``max_val_edits``), for choosing β."""
    prompts = [p for s in data.train for p in zero_shot_prompts(data.relation, s)]
    prompts = random.Random(seed).sample(prompts, min(len(prompts), 4 * cfg.max_val_edits))
    if cfg.filter_test:
        prompts = answered(lm, prompts, cfg.batch_size)
    objects = sorted({s.object for s in data.train})
    return causal_edits(lm, prompts, objects, seed, cfg.batch_size)[: cfg.max_val_edits]


def evaluate_split(
    lm: ModelHandle, data: SplitData, cfg: LrcConfig, seed: int, jacobians: Callable[..., Any], artifacts: Path | None = None
) -> list[dict]:
    """All rows (one per test prompt or edit and method) of one (relation, seed).

    Causality rows name their ``split`` and ``beta``: the test edits at every β of ``cfg.betas`` (or at the
    one ``cfg.beta``), and with a β grid also validation edits of training subjects (``split`` "val").
    """
    s_layer = resolve_block(cfg.subject_layer, lm.n_layers, "an LRE")
    sets = concept_sets(lm, data, cfg, jacobians, artifacts)
    states = subject_states(lm, data.test_prompts, s_layer, cfg.batch_size)
    objects = sorted({s.object for s in data.train})
    edits = causal_edits(lm, data.test_prompts, objects, seed, cfg.batch_size)
    val = validation_edits(lm, data, cfg, seed) if cfg.betas else []
    rows: list[dict] = []
    for method, concepts in sets.items():
        base = {"relation": data.relation.name, "seed": seed, "method": method}
        for p, pred in zip(data.test_prompts, concepts.classify(states)):
            row: dict[str, Any] = {"kind": "accuracy", "split": "test", "subject": p.subject, "object": p.object}
            rows.append({**base, **row, "ok": pred == p.object})
        for split, group in (("test", edits), ("val", val)):
            for beta in cfg.betas or (cfg.beta,):
                for e, ok in zip(group, causality(lm, concepts, group, beta, batch_size=cfg.batch_size) if group else []):
                    row = {"kind": "causality", "split": split, "beta": beta, "subject": e.prompt.subject, "object": e.new}
                    rows.append({**base, **row, "ok": ok})
    return rows


def choose_betas(rows: pd.DataFrame) -> dict[str, float]:
    """Per method, the β with the best validation causality (mean over (relation, seed) units; ties: the smaller β).

    >>> frame = pd.DataFrame({"method": ["m"] * 4, "kind": ["causality"] * 4, "split": ["val"] * 4,
    ...                       "beta": [0.1, 0.1, 0.2, 0.2], "relation": ["r"] * 4, "seed": [0] * 4,
    ...                       "ok": [True, False, True, True]})
    >>> choose_betas(frame)
    {'m': 0.2}
    """
    val = rows[(rows["kind"] == "causality") & (rows.get("split") == "val")]
    if val.empty:
        return {}
    per_unit = val.groupby(["method", "beta", "relation", "seed"])["ok"].mean().reset_index()
    per_beta = per_unit.groupby(["method", "beta"])["ok"].mean().reset_index()
    chosen: dict[str, float] = {}
    for method, group in per_beta.groupby("method"):
        best = group[group["ok"] == group["ok"].max()]
        chosen[str(method)] = float(best["beta"].min())
    return chosen


def at_chosen_beta(rows: pd.DataFrame, betas: dict[str, float]) -> pd.DataFrame:
    """The test rows, causality at each method's chosen β (rows without a ``split`` column pass unchanged)."""
    if "split" not in rows.columns:
        return rows
    test = rows[rows["split"] == "test"]
    keep = (test["kind"] != "causality") | (test["beta"] == test["method"].map(betas))
    return test[keep].reset_index(drop=True)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
    """Exact McNemar test of paired binary outcomes: the two-sided binomial p of the discordant pairs.

    >>> mcnemar([True] * 10, [False] * 10)["p"] < 0.01
    True
    """
    from scipy.stats import binomtest

    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {
        "n": len(a),
        "a": float(np.mean(a)) if len(a) else float("nan"),
        "b": float(np.mean(b)) if len(b) else float("nan"),
        "only_a": only_a,
        "only_b": only_b,
        "p": float(p),
    }


def two_proportion_z(a: Sequence[bool], b: Sequence[bool]) -> float:
    """The two-sided p of the pooled two-proportion z-test, the test of the paper's Tables 7-8 (it ignores the pairing).

    >>> round(two_proportion_z([True] * 60 + [False] * 40, [True] * 40 + [False] * 60), 4)
    0.0047
    """
    from scipy.stats import norm

    n_a, n_b = len(a), len(b)
    pooled = (sum(a) + sum(b)) / (n_a + n_b) if n_a + n_b else float("nan")
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b)) if n_a and n_b else 0.0
    if not se:
        return 1.0
    return float(2 * norm.cdf(-abs(sum(a) / n_a - sum(b) / n_b) / se))


def significance(rows: pd.DataFrame, a: str = "LRC", b: str = "SVM") -> list[dict[str, Any]]:
    """The paper's Tables 7-8: per seed and metric, ``a`` against ``b`` on the same test prompts and edits,
    pooled over relations (unweighted), with the exact McNemar p (paired) and the paper's two-proportion z-test p."""
    out = []
    for (kind, seed), group in rows.groupby(["kind", "seed"]):
        keys = [c for c in ("relation", "subject", "object") if c in group.columns]
        left = group[group["method"] == a].reset_index(drop=True)
        right = group[group["method"] == b].reset_index(drop=True)
        if len(left) != len(right) or not (left[keys].values == right[keys].values).all():
            raise LrcEvalError(f"methods {a!r} and {b!r} were not scored on the same prompts (seed {seed}, {kind})")
        x, y = left["ok"].astype(bool).tolist(), right["ok"].astype(bool).tolist()
        out.append({"kind": kind, "seed": seed, "methods": [a, b], **mcnemar(x, y), "p_z": two_proportion_z(x, y)})
    return out


def summarise(rows: pd.DataFrame) -> dict[str, Any]:
    """Macro average over relations per seed, then mean ± std over seeds, per method and metric."""
    table: dict[str, Any] = {}
    if rows.empty:
        return {"table": table, "per_relation": []}
    per_relation = rows.groupby(["method", "kind", "seed", "relation"])["ok"].mean().reset_index()
    per_seed = per_relation.groupby(["method", "kind", "seed"])["ok"].mean().reset_index()
    for (method, kind), group in per_seed.groupby(["method", "kind"]):
        values = group["ok"].tolist()
        std = float(pd.Series(values).std(ddof=0)) if len(values) > 1 else 0.0
        entry = {"mean": float(sum(values) / len(values)), "std": std, "seeds": len(values)}
        table.setdefault(str(method), {})[str(kind)] = entry
    counts: dict[Any, Any] = rows[rows["method"] == METHODS[0]].groupby(["kind", "seed"]).size().to_dict()
    return {
        "table": table,
        "per_relation": per_relation.groupby(["method", "kind", "relation"])["ok"].mean().reset_index().to_dict("records"),
        "counts": {f"{k[0]}/seed {k[1]}": int(v) for k, v in counts.items()},
    }


def pooled_test_prompts(
    lm: ModelHandle, relation: Relation, samples: Sequence[RelationSample], cfg: LrcConfig, store: ResultStore
) -> int:
    """The test prompts of a relation over all folds (answered ones with ``filter_test``), cached in the store."""
    if not store.done("test-counts", relation.name):
        counts = []
        for seed in cfg.seeds:
            prompts = make_split(relation, samples, seed, cfg).test_prompts
            counts.append(len(answered(lm, prompts, cfg.batch_size) if cfg.filter_test else prompts))
        rows = [{"relation": relation.name, "seed": seed, "test_prompts": n} for seed, n in zip(cfg.seeds, counts)]
        store.append("test-counts", relation.name, rows)
    frame = store.frame("test-counts")
    return int(frame[frame["relation"] == relation.name]["test_prompts"].sum())


def run_lrc_eval(
    lm: ModelHandle, cfg: LrcConfig, out_dir: str | Path, progress: bool = True, only_seeds: Sequence[int] | None = None
) -> dict[str, Any]:
    """Run (or resume) the Table 5 evaluation into ``out_dir``; returns and writes ``summary.json``.

    ``only_seeds`` runs a subset of the configured seeds now (each seed has its own table, so processes
    running different seeds can share the directory); the summary covers every seed finished so far.
    """
    if lm.name != cfg.model:
        raise LrcEvalError(f"the configuration names model {cfg.model!r} but {lm.name!r} was loaded; pass the same model")
    s_layer = resolve_block(cfg.subject_layer, lm.n_layers, "an LRE")
    o_layer = resolve_block(cfg.object_layer, lm.n_layers, "an LRE")
    if not s_layer < o_layer:
        raise LrcEvalError(f"subject layer {s_layer} must come before object layer {o_layer}")
    out = Path(out_dir)
    store = ResultStore(out, {**asdict(cfg), **model_entry(lm)})
    jacobians = JacobianCache(out.parent / "jacobian-cache")
    relations = select_relations(cfg)
    samples = {relation.name: correct_samples(lm, relation, cfg, store) for relation in relations}
    prefer = {
        name: set.intersection(*({s.subject for s in split_by_object(kept, seed)[0]} for seed in cfg.seeds))
        for name, kept in samples.items()
    }
    pooled = {r.name: pooled_test_prompts(lm, r, samples[r.name], cfg, store) for r in relations} if cfg.split == "folds" else {}
    with progress_bar(len(relations) * len(cfg.seeds), "LRC evaluation", progress) as advance:
        for seed in cfg.seeds:  # seeds outside: an interrupted run has whole seeds
            if only_seeds is not None and seed not in only_seeds:
                continue
            for relation in relations:
                key = [relation.name, seed]
                if not store.done(f"rows-{seed}", key):
                    data = make_split(relation, samples[relation.name], seed, cfg, prefer[relation.name])
                    if cfg.filter_test:
                        data.test_prompts = answered(lm, data.test_prompts, cfg.batch_size)
                    # the paper drops relations with fewer than min_test test prompts; disjoint folds count them together
                    n_test = pooled[relation.name] if cfg.split == "folds" else len(data.test_prompts)
                    few = not data.test_prompts or n_test < cfg.min_test
                    if not data.test or few or len({s.object for s in data.train}) < 2:
                        why = {
                            "relation": relation.name,
                            "seed": seed,
                            "correct": len(data.train) + len(data.test),
                            "test_prompts": len(data.test_prompts),
                        }
                        store.append(f"dropped-{seed}", key, [why])
                        store.append(f"rows-{seed}", key, [])
                    else:
                        slug = re.sub(r"[^a-z0-9]+", "-", relation.name.lower())
                        artifacts = out / "artifacts" / slug / f"seed-{seed}"
                        store.append(f"rows-{seed}", key, evaluate_split(lm, data, cfg, seed, jacobians, artifacts))
                advance(1)
    rows = pd.concat([store.frame(f"rows-{seed}") for seed in cfg.seeds], ignore_index=True)
    betas = choose_betas(rows) if cfg.betas and not rows.empty else {}
    scored = at_chosen_beta(rows, betas) if betas else rows
    summary = {
        **summarise(scored),
        "betas": betas,
        "significance": significance(scored) if not scored.empty and cfg.betas else [],
        "dropped": pd.concat([store.frame(f"dropped-{seed}") for seed in cfg.seeds], ignore_index=True).to_dict("records"),
        "correct_samples": {
            r: int(sum(1 for s in correct_samples(lm, rel, cfg, store))) for r, rel in zip(cfg.relations, relations)
        },
        "config": asdict(cfg),
        "jacobians": {"computed": jacobians.misses, "cached": jacobians.hits},
    }
    store.write_json("summary.json", summary)
    if not scored.empty:
        per_relation_frame(scored).to_csv(out / "relations.csv", index=False)
    return summary


def per_relation_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (relation, method, kind): the mean over seeds of the per-seed score, the seeds and prompts."""
    per_seed = rows.groupby(["relation", "method", "kind", "seed"])["ok"].agg(["mean", "size"]).reset_index()
    frame = per_seed.groupby(["relation", "method", "kind"]).agg(
        score=("mean", "mean"), seeds=("seed", "nunique"), n=("size", "sum")
    )
    return frame.reset_index()
