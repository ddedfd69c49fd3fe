"""The claim tables: statistics against plain references, verdicts, the page writer, and the docs being current."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from patchscopes.evals.claims import (
    BEGIN,
    END,
    ClaimsError,
    Estimate,
    estimate,
    unqualified_reproduces,
    verdict,
    write_claim_tables,
)

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _scores(seed: int = 0, n: int = 300, layers: int = 10) -> pd.DataFrame:
    """Per-example hits of two methods: 'a' improves with depth faster than 'b' and crosses it near layer 4."""
    rng = np.random.default_rng(seed)
    rows = []
    for example in range(n):
        for layer in range(layers):
            pa, pb = min(1.0, 0.05 + 0.1 * layer), 0.4
            rows.append((example, layer, "a", float(rng.random() < pa)))
            rows.append((example, layer, "b", float(rng.random() < (1.0 if layer == layers - 1 else pb))))
    return pd.DataFrame(rows, columns=["example", "layer", "method", "hit"])


def test_mean_and_its_interval_match_a_plain_bootstrap() -> None:
    frame = _scores()
    got = estimate(frame, {"kind": "mean", "column": "hit", "where": {"method": "a", "layer": 3}, "cluster": "example"})
    values = frame[(frame.method == "a") & (frame.layer == 3)].hit.to_numpy()
    assert got.value == pytest.approx(values.mean()) and got.n == len(values)
    se = values.std(ddof=1) / np.sqrt(len(values))  # the normal interval the bootstrap should approximate
    assert got.low == pytest.approx(values.mean() - 1.96 * se, abs=0.02)
    assert got.high == pytest.approx(values.mean() + 1.96 * se, abs=0.02)


def test_clustered_mean_resamples_units_not_rows() -> None:
    # two units: one with 99 identical rows of 1, one with a single 0; rows are not independent
    frame = pd.DataFrame({"unit": [0] * 99 + [1], "x": [1.0] * 99 + [0.0]})
    by_rows = estimate(frame, {"kind": "mean", "column": "x"})
    by_units = estimate(frame, {"kind": "mean", "column": "x", "cluster": "unit"})
    assert by_rows.value == by_units.value == pytest.approx(0.99)
    assert by_units.n == 2 and by_rows.n == 100
    assert by_units.low < 0.5 < by_rows.low  # resampling two units can draw the 0-unit twice


def test_paired_difference_is_the_mean_of_per_pair_differences() -> None:
    frame = _scores(seed=1)
    stat = {"kind": "paired_difference", "column": "hit", "by": "method", "a": "a", "b": "b", "pair": ["example"]}
    stat["where"] = {"layer": 7}
    got = estimate(frame, stat)
    at = frame[frame.layer == 7].pivot_table(index="example", columns="method", values="hit")
    assert got.value == pytest.approx((at.a - at.b).mean()) and got.n == len(at)
    assert got.low < got.value < got.high


def test_group_difference_of_two_independent_groups_matches_welchs_interval() -> None:
    rng = np.random.default_rng(2)
    rows = [("p", f"p{k}", layer, rng.normal(0.3, 0.1)) for k in range(120) for layer in (3, 6)]
    rows += [("r", f"r{k}", layer, rng.normal(0.1, 0.2)) for k in range(80) for layer in (3, 6)]
    frame = pd.DataFrame(rows, columns=["group", "entity", "layer", "score"])
    got = estimate(frame, {"kind": "group_difference", "column": "score", "by": "group", "a": "p", "b": "r", "cluster": "entity"})
    per = frame.groupby(["group", "entity"]).score.mean()
    a, b = per["p"].to_numpy(), per["r"].to_numpy()
    assert got.value == pytest.approx(a.mean() - b.mean()) and got.n == 200
    se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))  # the unpaired normal interval
    assert got.low == pytest.approx(got.value - 1.96 * se, abs=0.01)
    assert got.high == pytest.approx(got.value + 1.96 * se, abs=0.01)
    with pytest.raises(ClaimsError, match="no rows equal to 'x'"):
        estimate(frame, {"kind": "group_difference", "column": "score", "by": "group", "a": "p", "b": "x"})


def test_mean_over_groups_weighs_groups_equally_and_matches_a_stratified_normal_interval() -> None:
    rng = np.random.default_rng(3)
    sizes, means = {"big": 400, "small": 40, "mid": 120}, {"big": 0.1, "small": 0.5, "mid": -0.2}
    frame = pd.DataFrame(
        [(task, rng.normal(means[task], 0.3)) for task, n in sizes.items() for _ in range(n)], columns=["task", "d"]
    )
    got = estimate(frame, {"kind": "mean_over_groups", "column": "d", "groups": "task"})
    per = frame.groupby("task").d
    assert got.value == pytest.approx(per.mean().mean()) and got.n == len(frame)
    assert abs(got.value - frame.d.mean()) > 0.05  # not the pooled (row-weighted) mean
    se = np.sqrt((per.var(ddof=1) / per.count()).sum()) / len(sizes)  # the variance of an equal-weight mean of means
    assert got.low == pytest.approx(got.value - 1.96 * se, abs=0.01)
    assert got.high == pytest.approx(got.value + 1.96 * se, abs=0.01)


def test_crossover_finds_the_layer_from_which_a_stays_above_b() -> None:
    frame = _scores(seed=2, n=2000)
    got = estimate(frame, {"kind": "crossover", "column": "hit", "by": "method", "a": "a", "b": "b", "unit": "example"})
    assert got.value == 4  # p_a = .45 > .4 from layer 4 on; the last layer, where b is 1, is excluded
    assert got.low <= 4 <= got.high and got.high - got.low <= 1
    relative = estimate(frame, {"kind": "crossover", "column": "hit", "by": "method", "a": "a", "b": "b", "per_depth": 10})
    assert relative.value == pytest.approx(0.4)
    never = estimate(frame, {"kind": "crossover", "column": "hit", "by": "method", "a": "b", "b": "a"})
    assert np.isinf(never.value)


def test_verdicts_need_the_whole_interval() -> None:
    assert verdict(Estimate(0.3, 0.1, 0.5, 10), {"op": ">", "value": 0}) == "yes"
    assert verdict(Estimate(-0.3, -0.5, -0.1, 10), {"op": ">", "value": 0}) == "no"
    assert verdict(Estimate(0.1, -0.1, 0.3, 10), {"op": ">", "value": 0}) == "no (inconclusive)"
    assert verdict(Estimate(0.2, 0.18, 0.3, 10), {"op": "between", "value": [0.15, 0.35]}) == "yes"
    assert verdict(Estimate(0.6, 0.5, 0.7, 10), {"op": "between", "value": [0.15, 0.35]}) == "no"
    with pytest.raises(ClaimsError, match="unknown condition"):
        verdict(Estimate(0, 0, 0, 1), {"op": "=", "value": 0})


def test_bad_specifications_name_the_problem() -> None:
    frame = _scores(n=5)
    with pytest.raises(ClaimsError, match="lacks column"):
        estimate(frame, {"kind": "mean", "column": "nope"})
    with pytest.raises(ClaimsError, match="unknown statistic kind"):
        estimate(frame, {"kind": "median", "column": "hit"})
    with pytest.raises(ClaimsError, match="no rows"):
        estimate(frame, {"kind": "mean", "column": "hit", "where": {"layer": 99}})


def _beats(a: str, b: str, paper: str) -> dict[str, object]:
    stat = {"kind": "paired_difference", "column": "hit", "by": "method", "a": a, "b": b, "pair": ["example"]}
    return {"claim": f"{a} beats {b} at layer 8", "paper": paper, "result": "results/run/scores.csv",
            "stat": {**stat, "where": {"layer": 8}}, "expect": {"op": ">", "value": 0}}  # fmt: skip


def _site(tmp_path: Path, prose: str) -> Path:
    (tmp_path / "results" / "run").mkdir(parents=True)
    _scores(n=50).to_csv(tmp_path / "results" / "run" / "scores.csv", index=False)
    (tmp_path / "results" / "run" / "config.json").write_text(json.dumps({"config": {"model": "tiny"}}))  # as a run writes it
    (tmp_path / "page.md").write_text(f"# A page\n\n{prose}\n")
    claims = [
        _beats("a", "b", paper="+.3"),
        _beats("b", "a", paper="no"),
        {"claim": "something else", "paper": "1", "plan": "later"},
    ]
    (tmp_path / "results" / "claims.json").write_text(json.dumps({"pages": {"page.md": claims}}))
    return tmp_path


def test_tables_are_written_after_the_title_and_then_kept_current(tmp_path: Path) -> None:
    docs = _site(tmp_path, "Our reading: the ordering is not reproduced.")
    assert write_claim_tables(docs, check=True) == [f"page.md: its claim table is stale; run `patchscopes claims {docs}`"]
    assert write_claim_tables(docs) == []
    page = (docs / "page.md").read_text()
    assert page.startswith("# A page\n\n" + BEGIN) and page.count(BEGIN) == 1 and END in page
    rows = page.split(BEGIN)[1].split(END)[0].strip().split("\n")[2:]
    assert rows[0].endswith("| yes |") and "(tiny, n = 50)" in rows[0]
    assert rows[1].endswith("| no |")
    assert rows[2] == "| something else | 1 | not run: later | not run |"
    assert write_claim_tables(docs, check=True) == []
    assert write_claim_tables(docs) == [] and (docs / "page.md").read_text() == page  # idempotent


def test_a_page_may_not_say_reproduces_when_its_table_says_no(tmp_path: Path) -> None:
    docs = _site(tmp_path, "This page reproduces Table 5.")
    problems = write_claim_tables(docs)
    assert len(problems) == 1 and "reproduces Table 5" in problems[0]
    assert unqualified_reproduces("It is not reproduced here; it isn't reproduced.\n") == []


def test_the_projects_results_pages_are_current_and_honest() -> None:
    """What CI checks: `patchscopes claims docs --check` passes on the committed pages and result files."""
    assert write_claim_tables(DOCS, check=True) == []


def test_paired_difference_of_two_columns_of_a_wide_file() -> None:
    wide = pd.DataFrame({"query": range(6), "x": [1, 1, 1, 0, 1, None], "y": [0, 1, 0, 0, 0, 1]})
    got = estimate(wide, {"kind": "paired_difference", "a": "x", "b": "y"})
    assert got.value == pytest.approx(3 / 5) and got.n == 5  # the row without x is not a pair


def test_held_out_best_chooses_on_half_the_units_and_scores_on_the_other() -> None:
    """Twenty cells of pure noise: the best cell on the same data looks far above the truth (0.5), the
    held-out estimate does not; and the chosen cell is scored on the other half exactly as by hand."""
    rng = np.random.default_rng(0)
    noise = pd.DataFrame(
        [{"example": e, "cell": c, "hit": float(rng.random() < 0.5), "floor": 0.5} for e in range(40) for c in range(20)]
    )
    in_sample = noise.groupby("cell")["hit"].mean().max()
    spec = {"kind": "held_out_best", "column": "hit", "cells": ["cell"], "cluster": "example"}
    got = estimate(noise, spec)
    assert in_sample > 0.6 and got.low <= 0.5 <= got.high and got.n == 20
    chosen = noise[noise.example % 2 == 0].groupby("cell")["hit"].mean().idxmax()
    odd = noise[(noise.example % 2 == 1) & (noise.cell == chosen)]
    assert got.value == pytest.approx(odd.hit.mean())
    assert estimate(noise, {**spec, "minus": "floor"}).value == pytest.approx(odd.hit.mean() - 0.5)
    with pytest.raises(ClaimsError, match="at least two units"):
        estimate(noise[noise.example == 0], spec)


def test_a_claim_names_the_model_of_its_run_or_both_models_of_a_cross_model_run(tmp_path: Path) -> None:
    from patchscopes.evals.claims import _model

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {"model": "tiny"}}))
    assert _model(run / "rows.csv") == "tiny"
    (run / "config.json").write_text(json.dumps({"config": {"source": "A", "target": "B", "eval": "cross-model"}}))
    assert _model(run / "rows.csv") == "A → B"
