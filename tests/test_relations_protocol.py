"""The LRC paper's protocol (profile "paper"): disjoint test folds, balanced LRE prompts, answered test prompts,
β per method chosen on validation edits, Table 6's one-prompt LREs and the Tables 7-8 McNemar tests."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from patchscopes.relations.data import RelationSample
from patchscopes.relations.evaluate import (
    PROFILES,
    SINGLE_SAMPLE_METHODS,
    at_chosen_beta,
    choose_betas,
    make_split,
    mcnemar,
    run_lrc_eval,
    select_relations,
    two_proportion_z,
)
from patchscopes.relations.prompts import answers_correctly
from patchscopes.relations.splits import balanced_choice, fold_split


def _samples() -> list[RelationSample]:
    counts = {"a": 11, "b": 4, "c": 2, "d": 1}
    return [RelationSample(f"{obj}{i}", obj) for obj, n in counts.items() for i in range(n)]


def test_folds_partition_every_testable_sample_and_train_keeps_every_object() -> None:
    samples = _samples()
    folds = [fold_split(samples, k, 5, seed=3, relation="r") for k in range(5)]
    tested = [s.subject for _, test in folds for s in test]
    assert len(tested) == len(set(tested))  # disjoint test folds
    assert set(tested) == {s.subject for s in samples if s.object != "d"}  # objects with one sample are train-only
    for train, test in folds:
        assert not {s.subject for s in train} & {s.subject for s in test}
        assert {s.object for s in train} == {"a", "b", "c", "d"}
        per_object = Counter(s.object for s in train)
        assert per_object["a"] == 6 and per_object["d"] == 1  # ⌈n/2⌉ per object, the paper's training half
    again = [fold_split(samples, k, 5, seed=3, relation="r")[1] for k in range(5)]
    assert again == [test for _, test in folds]
    with pytest.raises(ValueError, match="fold 5"):
        fold_split(samples, 5, 5, seed=3, relation="r")


def test_balanced_choice_spreads_prompts_over_objects() -> None:
    chosen = balanced_choice("r", _samples(), 7)
    counts = Counter(s.object for s in chosen)
    assert sum(counts.values()) == 7 and set(counts) == {"a", "b", "c", "d"}
    assert max(counts.values()) - min(counts.values()) <= 1 or counts["d"] == 1  # d and c run out first
    assert balanced_choice("r", _samples(), 100) and len(balanced_choice("r", _samples(), 100)) == len(_samples())


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs() -> None:
    a = [True] * 8 + [False] * 1 + [True] * 5
    b = [False] * 8 + [True] * 1 + [True] * 5
    result = mcnemar(a, b)
    assert (result["only_a"], result["only_b"], result["n"]) == (8, 1, 14)
    assert result["p"] == pytest.approx(2 * (1 + 9) / 2**9)  # two-sided P(X <= 1), X ~ Bin(9, 1/2)
    assert mcnemar([True, False], [True, False])["p"] == 1.0
    # the paper's unpaired two-proportion z-test: 13/14 against 6/14, pooled proportion 19/28
    pooled = 19 / 28
    z = (13 / 14 - 6 / 14) / math.sqrt(pooled * (1 - pooled) * (2 / 14))
    assert two_proportion_z(a, b) == pytest.approx(math.erfc(z / math.sqrt(2)))


def test_beta_is_chosen_on_validation_rows_and_only_test_rows_are_scored() -> None:
    rows = []
    for split in ("val", "test"):
        for beta, hits in ((0.1, [True, False]), (0.2, [True, True] if split == "val" else [False, False])):
            for ok in hits:
                rows.append(
                    {"method": "m", "kind": "causality", "split": split, "beta": beta, "relation": "r", "seed": 0, "ok": ok}
                )
    rows.append({"method": "m", "kind": "accuracy", "split": "test", "beta": None, "relation": "r", "seed": 0, "ok": True})
    frame = pd.DataFrame(rows)
    assert choose_betas(frame) == {"m": 0.2}  # the test rows (which favour 0.1) are never looked at
    scored = at_chosen_beta(frame, {"m": 0.2})
    assert set(scored["split"]) == {"test"} and set(scored[scored.kind == "causality"].beta) == {0.2}
    assert scored.ok.tolist() == [False, False, True]


@pytest.mark.real
def test_paper_protocol_on_smollm2(smol, data_root: Path, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = replace(
        PROFILES["paper"],
        relations=("occupation gender",),
        seeds=(0, 1),
        subject_layer=26,
        object_layer=27,
        n_lre=3,
        rank=64,
        betas=(0.1, 0.4),
        max_val_edits=6,
        min_test=2,
    )
    out = tmp_path / "paper"
    summary = run_lrc_eval(smol, cfg, out, progress=False)
    rows = pd.concat([_table(out, f"rows-{seed}") for seed in cfg.seeds], ignore_index=True)
    assert not rows.empty, summary["dropped"]
    relation = select_relations(cfg)[0]

    # folds: the test subjects of the two folds are disjoint, and every test prompt is one the model answers
    tests = [set(rows[(rows.seed == s) & (rows.split == "test")].subject) for s in cfg.seeds]
    assert tests[0] and tests[1] and not tests[0] & tests[1]
    accuracy = rows[(rows.kind == "accuracy") & (rows.method == "LRC")]
    kept = [RelationSample(s, o) for s, o in zip(_table(out, "filtered").subject, _table(out, "filtered").object) if s]
    prompts = [p for seed in cfg.seeds for p in make_split(relation, kept, seed, cfg).test_prompts]
    answered = [p for p, ok in zip(prompts, answers_correctly(smol, prompts)) if ok]
    assert len(prompts) > len(answered)  # the filter removes some zero-shot prompts here
    assert sorted(p.subject for p in answered) == sorted(accuracy.subject)  # exactly the answered ones are tested

    # β: every causality row carries one of the grid's values, and the summary scores each method at its
    # validation choice
    assert set(rows[rows.kind == "causality"].beta) == set(cfg.betas)
    assert set(summary["betas"]) == set(summary["table"]) and set(summary["betas"].values()) <= set(cfg.betas)
    assert set(SINGLE_SAMPLE_METHODS) <= set(summary["table"])
    table = pd.read_csv(out / "relations.csv")
    for method, beta in summary["betas"].items():
        edits = rows[(rows.kind == "causality") & (rows.split == "test") & (rows.method == method) & (rows.beta == beta)]
        got = table[(table.method == method) & (table.kind == "causality")].score.iloc[0]
        per_seed = edits.groupby("seed").ok.mean()
        assert got == pytest.approx(per_seed.mean())

    # Tables 7-8: one McNemar row per seed and metric, LRC against SVM on the same prompts
    sig = pd.DataFrame(summary["significance"])
    assert set(zip(sig.kind, sig.seed)) == {(k, s) for k in ("accuracy", "causality") for s in cfg.seeds}
    for _, r in sig[sig.kind == "accuracy"].iterrows():
        assert r.n == len(accuracy[accuracy.seed == r.seed])
        assert 0.0 <= r.p <= 1.0 and 0.0 <= r.p_z <= 1.0

    # Table 6: the one-prompt concepts are unit vectors over the training objects
    from patchscopes.relations.lrc import ConceptSet

    assert (out / "artifacts").exists()
    lrc = ConceptSet.load(out / "artifacts" / "occupation-gender" / "seed-0" / "concepts-lrc")
    torch.testing.assert_close(lrc.vectors.norm(dim=-1), torch.ones(len(lrc)))


def _table(out: Path, name: str) -> pd.DataFrame:
    """A result store's table, read from its JSON-lines file (one unit per line, its rows under "rows")."""
    units = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    return pd.DataFrame([row for unit in units for row in unit["rows"]])


def test_both_relation_evaluations_refuse_an_unknown_relation_by_name(data_root: Path) -> None:
    """One lookup serves the LRC and the LRE evaluations; each names the unknown relation and the known ones
    in its own error class."""
    from patchscopes.relations import lre_eval
    from patchscopes.relations.evaluate import LrcEvalError

    cfg = replace(PROFILES["paper"], relations=("person native language", "no such relation"))
    with pytest.raises(LrcEvalError, match=r"unknown relation\(s\) \['no such relation'\]; available: .*person native"):
        select_relations(cfg)
    lre_cfg = replace(lre_eval.PROFILES["quick"], relations=("no such relation",))
    with pytest.raises(lre_eval.LreEvalError, match=r"unknown relation\(s\) \['no such relation'\]"):
        lre_eval.select_relations(lre_cfg)
    assert [r.name for r in select_relations(replace(cfg, relations=("person native language",)))] == ["person native language"]
