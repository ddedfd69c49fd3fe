"""The LRE faithfulness/causality evaluation (``patchscopes eval lre --quick``) on SmolLM2-135M."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from patchscopes.relations import lre_eval
from patchscopes.relations.lre_eval import PROFILES, LreEvalError, choose_beta, run_lre_eval


def test_choose_beta_takes_the_best_rate_and_breaks_ties_towards_one() -> None:
    assert choose_beta({0.5: 0.1, 2.0: 0.4, 4.0: 0.3}) == 2.0
    assert choose_beta({0.5: 0.4, 1.0: 0.4, 2.0: 0.4}) == 1.0
    assert choose_beta({0.5: 0.4, 2.0: 0.4}) == 0.5  # |log 0.5| == |log 2|: the smaller
    with pytest.raises(LreEvalError, match="empty"):
        choose_beta({})


def test_a_bad_beta_grid_is_refused_before_any_work(tmp_path: Path) -> None:
    from dataclasses import replace

    with pytest.raises(LreEvalError, match="β grid"):
        run_lre_eval(replace(PROFILES["quick"], betas=()), tmp_path / "run")


@pytest.mark.real
def test_quick_lre_eval_resumes_keeps_splits_disjoint_and_chooses_beta_on_train(
    smol, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    cfg = PROFILES["quick"]
    out = tmp_path / "lre"
    summary = run_lre_eval(cfg, out, lm=smol, progress=False)

    rows = pd.concat([pd.DataFrame(u["rows"]) for u in map(json.loads, (out / "rows.jsonl").read_text().splitlines())])
    assert set(rows["split"]) == {"train", "cv", "test"} and set(rows["kind"]) == {"faithfulness", "causality"}
    for _, unit in rows.groupby(["relation", "seed"]):
        train, test = set(unit[unit.split == "train"].subject), set(unit[unit.split == "test"].subject)
        assert len(train) == cfg.n_train and test and not train & test
        assert set(unit[unit.split == "cv"].subject) == train
        assert set(unit.beta) == set(cfg.betas)
        edits = unit[unit.kind == "causality"]
        assert (edits.subject != edits.target).all()

    # β is the argmax of the stored leave-one-out TRAIN rates (split "cv"), and the reported rate is the test mean at that β
    table = pd.read_csv(out / "beta.csv")
    per_relation = pd.read_csv(out / "relations.csv")
    assert len(per_relation) == len(cfg.relations)
    for _, rel in per_relation.iterrows():
        for kind in ("faithfulness", "causality"):
            train = table[(table.relation == rel.relation) & (table.kind == kind) & (table.split == "cv")]
            best = train.rate.max()
            assert train[train.beta == rel[f"beta_{kind}"]].rate.iloc[0] == best
            assert rel[f"cv_{kind}"] == best
            hits = rows[(rows.relation == rel.relation) & (rows.kind == kind) & (rows.split == "test")]
            hits = hits[hits.beta == rel[f"beta_{kind}"]].hit.astype(float)
            assert 0.0 <= rel[kind] <= 1.0 and rel[kind] == pytest.approx(hits.mean())
            assert rel[f"n_{kind}"] == len(hits)
            assert rel[f"{kind}_low"] <= rel[kind] <= rel[f"{kind}_high"]
    assert summary["per_relation"][0]["faithfulness"] == pytest.approx(per_relation.faithfulness.iloc[0])
    assert 0.0 <= summary["macro"]["faithfulness"]["mean"] <= 1.0

    # the stored faithfulness agrees with lre_faithfulness run directly on a saved LRE at one β
    from patchscopes.relations.lre import LinearRelationalEmbedding
    from patchscopes.relations.lre_measures import lre_faithfulness
    from patchscopes.relations.prompts import few_shot_prompt

    relation = lre_eval.select_relations(cfg)[0]
    seed = cfg.seeds[0]
    unit = rows[(rows.relation == relation.name) & (rows.seed == seed)]
    by_subject = {s.subject: s for s in relation.samples}
    train_samples = [by_subject[s] for s in dict.fromkeys(unit[unit.split == "train"].subject)]
    test_subjects = list(dict.fromkeys(unit[unit.split == "test"].subject))
    prompts = [few_shot_prompt(relation, by_subject[s], cfg.n_train, seed, pool=train_samples) for s in test_subjects]
    lre = LinearRelationalEmbedding.load(out / "artifacts" / "country-capital-city" / f"seed-{seed}")
    direct = lre_faithfulness(smol, lre, prompts, beta=cfg.betas[-1])
    stored = unit[(unit.split == "test") & (unit.kind == "faithfulness") & (unit.beta == cfg.betas[-1])]
    assert direct.hits == stored.hit.tolist()

    # resumption: a second call does no new work and gives the same summary
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the resumed run recomputed a finished unit")

    for name in ("filter_correct", "estimate_lre", "lre_faithfulness_grid", "lre_causality_grid", "answers_correctly"):
        monkeypatch.setattr(lre_eval, name, refuse)
    before = (out / "rows.jsonl").read_bytes()
    again = run_lre_eval(cfg, out, lm=smol, progress=False)
    assert again == summary
    assert (out / "rows.jsonl").read_bytes() == before
    assert json.loads((out / "summary.json").read_text())["macro"] == json.loads(json.dumps(summary["macro"]))


@pytest.mark.real
def test_eval_lre_quick_command_writes_the_run_files(smol, data_root: Path, tmp_path: Path) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from patchscopes.cli import app

    out = tmp_path / "cli-run"
    result = CliRunner().invoke(app, ["eval", "lre", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "country capital city" in result.output
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["n_train"] == PROFILES["quick"].n_train and config["model"] == "SmolLM2-135M"
    per_relation = pd.read_csv(out / "relations.csv")
    assert per_relation.relation.tolist() == ["country capital city"]
    assert per_relation.beta_faithfulness.iloc[0] in PROFILES["quick"].betas
