"""Hernandez et al. (2023)'s LRE faithfulness and causality on a bundled model, with β chosen on training data.

Per relation: keep the subjects whose few-shot prompt the model answers correctly
(:func:`~patchscopes.relations.prompts.filter_correct`). Per seed: draw ``n_train`` training subjects and
disjoint test subjects; every prompt's solved examples are the training samples (the other ``n_train − 1``
for a training prompt, all ``n_train`` for a test prompt), as in the paper, so no test subject appears in
any training prompt. Test prompts the model does not answer correctly with that context are dropped. The
LRE is the mean Jacobian of the ``n_train`` training prompts (first answer token, object layer = last
block, read out by the final norm and unembedding). Faithfulness and causality
(:mod:`patchscopes.relations.lre_measures`) are measured at every β of the grid on the training prompts
and on the test prompts, and at every β on each training prompt with the LRE of the other training prompts
(leave-one-out, split ``"cv"``); the reported β is the one with the best leave-one-out rate (ties: the β
closest to 1), and the reported rate is the test rate at that β: test prompts never choose anything.
Every (relation, seed) is one unit of a :class:`~patchscopes.results.ResultStore`, and Jacobians are
cached, so a killed run resumes.

    >>> summary = run_lre_eval(PROFILES["quick"], "runs/lre-quick")      # doctest: +SKIP
    >>> summary["macro"]["faithfulness"]["mean"]                         # doctest: +SKIP
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from patchscopes.errors import PatchscopeError
from patchscopes.layers import resolve_block
from patchscopes.models.loading import ModelHandle
from patchscopes.progress import progress_bar
from patchscopes.relations.data import Relation, RelationSample, relations_named
from patchscopes.relations.jcache import JacobianCache
from patchscopes.relations.lre import LinearRelationalEmbedding, estimate_lre, from_jacobians
from patchscopes.relations.lre_measures import LreMeasure, lre_causality_grid, lre_faithfulness_grid
from patchscopes.relations.prompts import RelationPrompt, answers_correctly, few_shot_prompt, filter_correct
from patchscopes.results import ResultStore, model_entry
from patchscopes.statistics import estimate

KINDS = ("faithfulness", "causality")
ROW_COLUMNS = ("relation", "seed", "split", "kind", "beta", "subject", "target", "hit")


class LreEvalError(PatchscopeError, ValueError):
    """An LRE evaluation configuration that cannot run (unknown relation, bad layers, empty β grid, …)."""


@dataclass(frozen=True)
class LreEvalConfig:
    """Everything that defines an LRE faithfulness/causality run (written to the run's ``config.json``)."""

    model: str = "SmolLM2-135M"
    relations: tuple[str, ...] = (
        # factual
        "country capital city",
        "country language",
        "landmark in country",
        "product by company",
        "person native language",
        # linguistic
        "adjective antonym",
        "adjective comparative",
        "verb past tense",
        "word first letter",
        # commonsense
        "object superclass",
        "substance phase of matter",
        "word sentiment",
    )
    seeds: tuple[int, ...] = (0,)
    n_train: int = 8  # training samples per LRE (the paper's n = 8); they are also every prompt's solved examples
    subject_layer: int = 15
    object_layer: int = -1  # the last block: F(s) is read by the final norm and unembedding (the attribute lens)
    betas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.25, 2.5, 3.0, 4.0, 5.0)
    rank: int = 64  # rank of W† for causality
    max_candidates: int = 80  # subjects per relation passed through the correctness filter
    filter_examples: int = 3  # solved examples in the filter's prompts (the project's filter_correct)
    max_test: int = 40  # test prompts per (relation, seed)
    min_test: int = 4  # fewer correctly answered test prompts than this: the relation is dropped
    batch_size: int = 16
    relations_dir: str | None = None


PROFILES: dict[str, LreEvalConfig] = {
    # tests: one relation, three training prompts, layers near the top so the Jacobians are cheap (about a minute)
    "quick": LreEvalConfig(
        relations=("country capital city",),
        n_train=3,
        subject_layer=26,
        betas=(1.0, 2.0, 4.0),
        rank=32,
        max_candidates=24,
        max_test=8,
    ),
    "default": LreEvalConfig(),
}


def select_relations(cfg: LreEvalConfig) -> list[Relation]:
    """The configured relations (by their ``name`` field), from the data directory or ``relations_dir``."""
    return relations_named(cfg.relations, cfg.relations_dir, LreEvalError)


def correct_samples(lm: ModelHandle, relation: Relation, cfg: LreEvalConfig, store: ResultStore) -> list[RelationSample]:
    """Samples (one per subject, at most ``max_candidates``) whose filter prompt the model answers; cached in the store."""
    if store.done("filtered", relation.name):
        frame = store.frame("filtered")
        frame = frame[frame["relation"] == relation.name]
        return [RelationSample(s, o) for s, o in zip(frame["subject"], frame["object"]) if s]
    unique = list({s.subject: s for s in relation.samples}.values())
    if len(unique) > cfg.max_candidates:
        unique = random.Random(0).sample(unique, cfg.max_candidates)
    kept = filter_correct(lm, replace(relation, samples=tuple(unique)), n_examples=cfg.filter_examples, batch_size=cfg.batch_size)
    rows = [{"relation": relation.name, "subject": s.subject, "object": s.object} for s in kept]
    store.append("filtered", relation.name, rows or [{"relation": relation.name, "subject": "", "object": ""}])
    return kept


def split_subjects(
    relation: str, samples: Sequence[RelationSample], seed: int, n_train: int
) -> tuple[list[RelationSample], list[RelationSample]]:
    """A seeded shuffle: the first ``n_train`` samples train, the rest are test candidates (disjoint subjects).

    >>> S = RelationSample
    >>> train, rest = split_subjects("r", [S("a", "x"), S("b", "y"), S("c", "z")], seed=0, n_train=2)
    >>> len(train), len(rest), {s.subject for s in train} & {s.subject for s in rest}
    (2, 1, set())
    """
    order = sorted(samples, key=lambda s: s.subject)
    random.Random(f"{relation}\x1f{seed}").shuffle(order)
    return order[:n_train], order[n_train:]


def edit_targets(lm: ModelHandle, prompts: Sequence[RelationPrompt], seed: int) -> list[tuple[RelationPrompt, RelationPrompt]]:
    """One (prompt, target) pair per prompt: a random other prompt whose object starts with another token."""
    rng = random.Random(seed)
    own = [p.locate(lm).answer_ids[0] for p in prompts]
    pairs = []
    for prompt, first in zip(prompts, own):
        others = [t for t in prompts if t.object != prompt.object]
        rng.shuffle(others)
        for target in others:
            wanted = RelationPrompt(prompt.relation, prompt.subject, target.object, prompt.text).locate(lm).answer_ids[0]
            if wanted != first:
                pairs.append((prompt, target))
                break
    return pairs


def choose_beta(rates: dict[float, float]) -> float:
    """The β with the highest rate; ties go to the β closest to 1 (the unscaled LRE), then to the smaller one.

    >>> choose_beta({0.5: 0.2, 1.0: 0.5, 2.0: 0.7, 4.0: 0.7})
    2.0
    """
    if not rates:
        raise LreEvalError("no rates to choose β from; the β grid is empty")
    best = max(rates.values())
    return min((b for b, r in rates.items() if r == best), key=lambda b: (abs(math.log(b)), b))


def _rows(base: dict[str, Any], split: str, kind: str, measures: dict[float, LreMeasure], pairs: Sequence[Any]) -> list[dict]:
    rows = []
    for beta, measure in measures.items():
        for (subject, target), hit in zip(pairs, measure.hits):
            rows.append({**base, "split": split, "kind": kind, "beta": beta, "subject": subject, "target": target, "hit": hit})
    return rows


def evaluate_unit(
    lm: ModelHandle,
    relation: Relation,
    samples: Sequence[RelationSample],
    seed: int,
    cfg: LreEvalConfig,
    jacobians: JacobianCache,
    artifacts: Path | None = None,
) -> tuple[list[dict], dict[str, Any]]:
    """The rows (one per prompt, split, measure and β) and the bookkeeping of one (relation, seed)."""
    info: dict[str, Any] = {"relation": relation.name, "seed": seed, "candidates": len(samples), "dropped": ""}
    train, rest = split_subjects(relation.name, samples, seed, cfg.n_train)
    if len(train) < cfg.n_train or len(rest) < cfg.min_test:
        info["dropped"] = f"{len(samples)} correctly answered subjects; need {cfg.n_train} to train and {cfg.min_test} to test"
        return [], info
    train_prompts = [few_shot_prompt(relation, s, cfg.n_train, seed, pool=train) for s in train]
    candidates = [few_shot_prompt(relation, s, cfg.n_train, seed, pool=train) for s in rest]
    correct = answers_correctly(lm, candidates, cfg.batch_size)
    test_prompts = [p for p, ok in zip(candidates, correct) if ok][: cfg.max_test]
    info.update(
        train_answered=sum(answers_correctly(lm, train_prompts, cfg.batch_size)),
        test_candidates=len(candidates),
        test_answered=sum(correct),
        test=len(test_prompts),
    )
    if len(test_prompts) < cfg.min_test:
        info["dropped"] = f"{len(test_prompts)} test prompts answered correctly with the training examples; need {cfg.min_test}"
        return [], info
    s_layer = resolve_block(cfg.subject_layer, lm.n_layers, "an LRE")
    o_layer = resolve_block(cfg.object_layer, lm.n_layers, "an LRE")
    lre = estimate_lre(lm, train_prompts, s_layer, o_layer, "first", jacobian_fn=jacobians)
    if artifacts is not None:
        lre.save(artifacts)
    rank = min(cfg.rank, lm.hidden_size)
    base = {"relation": relation.name, "seed": seed}
    rows: list[dict] = []
    for split, prompts in (("train", train_prompts), ("test", test_prompts)):
        faithful = lre_faithfulness_grid(lm, lre, prompts, cfg.betas)
        rows += _rows(base, split, "faithfulness", faithful, [(p.subject, "") for p in prompts])
        pairs = edit_targets(lm, prompts, seed)
        info[f"{split}_edits"] = len(pairs)
        if pairs:
            edited = lre_causality_grid(lm, lre, [p for p, _ in pairs], [t for _, t in pairs], cfg.betas, rank, cfg.batch_size)
            rows += _rows(base, split, "causality", edited, [(p.subject, t.subject) for p, t in pairs])
    rows += leave_one_out_rows(lm, lre, train_prompts, seed, cfg, jacobians)
    return rows, info


def leave_one_out_rows(
    lm: ModelHandle,
    lre: LinearRelationalEmbedding,
    train_prompts: Sequence[RelationPrompt],
    seed: int,
    cfg: LreEvalConfig,
    jacobians: JacobianCache,
) -> list[dict]:
    """Split ``"cv"``: each training prompt measured by the LRE of the *other* training prompts, at every β.

    This is where β is chosen: in-sample (split ``"train"``) the LRE is fitted at the very states it is
    measured on, so β = 1 looks best there by construction. The Jacobians come from the cache (no new ones).
    """
    located = [p.locate(lm) for p in train_prompts]
    jacs = [jacobians(lm, loc, lre.subject_layer, [lre.object_layer], "first") for loc in located]
    meta = {k: v for k, v in lre.metadata.items() if k != "n_prompts"}
    targets = dict((p.subject, t) for p, t in edit_targets(lm, train_prompts, seed))
    rank = min(cfg.rank, lm.hidden_size)
    base = {"relation": lre.metadata.get("relation"), "seed": seed}
    rows: list[dict] = []
    for i, prompt in enumerate(train_prompts):
        held_out = from_jacobians(jacs[:i] + jacs[i + 1 :], **meta)
        faithful = lre_faithfulness_grid(lm, held_out, [prompt], cfg.betas)
        rows += _rows(base, "cv", "faithfulness", faithful, [(prompt.subject, "")])
        target = targets.get(prompt.subject)
        if target is not None:
            edited = lre_causality_grid(lm, held_out, [prompt], [target], cfg.betas, rank, cfg.batch_size)
            rows += _rows(base, "cv", "causality", edited, [(prompt.subject, target.subject)])
    return rows


def beta_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Rate and count per (relation, seed, split, kind, β)."""
    grouped = rows.groupby(["relation", "seed", "split", "kind", "beta"])["hit"]
    return grouped.agg(n="size", rate="mean").reset_index()


def chosen_betas(table: pd.DataFrame) -> dict[tuple[str, int, str], float]:
    """Per (relation, seed, kind): the β whose leave-one-out training rate (split ``"cv"``) is best (:func:`choose_beta`)."""
    train = table[table["split"] == "cv"]
    out: dict[tuple[str, int, str], float] = {}
    for key, group in train.groupby(["relation", "seed", "kind"]):
        relation, seed, kind = (str(x) for x in key)
        out[(relation, int(seed), kind)] = choose_beta(dict(zip(group["beta"].astype(float), group["rate"].astype(float))))
    return out


def _interval(frame: pd.DataFrame, column: str, cluster: str | None = None) -> dict[str, Any]:
    if frame.empty:
        return {"mean": None, "low": None, "high": None, "n": 0}
    value = estimate(frame, {"kind": "mean", "column": column, **({"cluster": cluster} if cluster else {})})
    return {"mean": value.value, "low": value.low, "high": value.high, "n": value.n}


def summarise(rows: pd.DataFrame, info: pd.DataFrame, cfg: LreEvalConfig) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """The summary, the per-relation table (test rates at the training-chosen β, 95% CIs over subjects) and the β table."""
    if rows.empty:
        empty = pd.DataFrame()
        return {"per_relation": [], "macro": {}, "pooled": {}, "beta_curve": [], "chosen": []}, empty, empty
    rows = rows.assign(
        hit=rows["hit"].astype(float), beta=rows["beta"].astype(float), unit=rows["relation"] + "\x1f" + rows["subject"]
    )
    table = beta_table(rows)
    choice = chosen_betas(table)
    test = rows[rows["split"] == "test"]
    picked = test[
        [choice.get((r, int(s), k)) == b for r, s, k, b in zip(test["relation"], test["seed"], test["kind"], test["beta"])]
    ]
    per_relation = []
    for relation in [r for r in cfg.relations if r in set(rows["relation"])]:
        entry: dict[str, Any] = {"relation": relation}
        for kind in KINDS:
            mine = picked[(picked["relation"] == relation) & (picked["kind"] == kind)]
            ci = _interval(mine, "hit", "subject")
            seeds = sorted({s for (r, s, k) in choice if r == relation and k == kind})
            train = table[(table["relation"] == relation) & (table["kind"] == kind) & (table["split"] == "cv")]
            chosen_train = [
                float(train[(train["seed"] == s) & (train["beta"] == choice[(relation, s, kind)])]["rate"].iloc[0]) for s in seeds
            ]
            at_one = test[(test["relation"] == relation) & (test["kind"] == kind) & (test["beta"] == 1.0)]
            entry.update(
                {
                    f"n_{kind}": ci["n"],
                    f"beta_{kind}": sum(choice[(relation, s, kind)] for s in seeds) / len(seeds) if seeds else None,
                    f"cv_{kind}": sum(chosen_train) / len(chosen_train) if chosen_train else None,
                    kind: ci["mean"],
                    f"{kind}_low": ci["low"],
                    f"{kind}_high": ci["high"],
                    f"{kind}_beta1": float(at_one["hit"].mean()) if not at_one.empty else None,
                }
            )
        per_relation.append(entry)
    relations = pd.DataFrame(per_relation)
    macro = {kind: _interval(relations.dropna(subset=[kind]), kind) for kind in KINDS}
    pooled = {kind: _interval(picked[picked["kind"] == kind], "hit", "unit") for kind in KINDS}
    per_beta = table.groupby(["relation", "split", "kind", "beta"])["rate"].mean().reset_index()
    curve = per_beta.groupby(["split", "kind", "beta"])["rate"].agg(mean="mean", relations="size").reset_index()
    summary = {
        "per_relation": per_relation,
        "macro": macro,
        "pooled": pooled,
        "beta_curve": curve.to_dict("records"),
        "chosen": [{"relation": r, "seed": s, "kind": k, "beta": b} for (r, s, k), b in sorted(choice.items())],
        "units": info.astype(object).where(info.notna(), None).to_dict("records") if not info.empty else [],
    }
    return summary, relations, table


def run_lre_eval(cfg: LreEvalConfig, out_dir: str | Path, lm: ModelHandle | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the evaluation into ``out_dir``; write ``summary.json``, ``relations.csv`` and ``beta.csv``.

    ``lm`` defaults to ``load_model(cfg.model)``; a loaded model of another name is refused.
    """
    if not cfg.betas or any(b <= 0 for b in cfg.betas):
        raise LreEvalError(f"the β grid {cfg.betas} must be non-empty and positive, e.g. (0.5, 1, 2, 4)")
    if cfg.n_train < 2:
        raise LreEvalError(f"n_train = {cfg.n_train}: an LRE needs at least 2 training samples (the paper uses 8)")
    if lm is None:
        from patchscopes import load_model

        lm = load_model(cfg.model)
    if lm.name != cfg.model:
        raise LreEvalError(f"the configuration names model {cfg.model!r} but {lm.name!r} was loaded; pass the same model")
    s_layer = resolve_block(cfg.subject_layer, lm.n_layers, "an LRE")
    o_layer = resolve_block(cfg.object_layer, lm.n_layers, "an LRE")
    if not s_layer < o_layer:
        raise LreEvalError(f"subject layer {s_layer} must come before object layer {o_layer}; lower --subject-layer")
    out = Path(out_dir)
    store = ResultStore(out, {**asdict(cfg), **model_entry(lm)}, schemas={"rows": ROW_COLUMNS})
    jacobians = JacobianCache(out / "jacobian-cache")
    relations = select_relations(cfg)
    with progress_bar(len(relations) * len(cfg.seeds), "LRE evaluation", progress) as advance:
        for relation in relations:
            for seed in cfg.seeds:
                key = [relation.name, seed]
                if not store.done("rows", key):
                    samples = correct_samples(lm, relation, cfg, store)
                    slug = re.sub(r"[^a-z0-9]+", "-", relation.name.lower()).strip("-")
                    rows, info = evaluate_unit(
                        lm, relation, samples, seed, cfg, jacobians, out / "artifacts" / slug / f"seed-{seed}"
                    )
                    store.append("info", key, [info])  # before the rows: a unit with rows always has its info
                    store.append("rows", key, rows)
                advance(1)
    summary, per_relation, table = summarise(store.frame("rows"), store.frame("info"), cfg)
    summary = {**summary, "config": asdict(cfg)}
    store.write_csv("relations.csv", per_relation)
    store.write_csv("beta.csv", table)
    store.write_json("summary.json", summary)
    return summary
