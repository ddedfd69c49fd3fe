"""Unit tests of the evaluations' building blocks on small fixtures (no real model needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from patchscopes.evals.attribute_data import AttributeSample, load_attribute_task
from patchscopes.evals.attributes import (
    fill_placeholder,
    first_line,
    first_snippets,
    is_correct,
    is_single_answer,
    summarize,
)
from patchscopes.evals.common import EvalError
from patchscopes.evals.entities import load_entities, select_entities
from patchscopes.evals.next_token import read_corpus
from patchscopes.evals.probing import paired_test, probe_accuracy
from patchscopes.positions import resolve_positions
from patchscopes.relations.data import DataFormatError
from patchscopes.report import ReportError, render
from patchscopes.results import ConfigMismatchError, ResultStore


@pytest.mark.parametrize(
    ("generated", "obj", "expected"),
    [
        (" is the Dollar.", "Dollar", True),
        (" is the dollar.", "Dollar", True),  # case-insensitive by default
        (" is New York City", "NewYork", True),  # spaces removed on both sides
        (" is the pound", "Dollar", False),
        ("", "Dollar", False),
        (" is a liquid", "", False),  # an empty object never matches
    ],
)
def test_correctness_rule(generated: str, obj: str, expected: bool) -> None:
    assert is_correct(generated, obj) is expected


def test_correctness_rule_case_sensitive_and_first_line() -> None:
    assert not is_correct(" is the dollar", "Dollar", case_sensitive=True)
    assert is_correct(" is the Dollar", "Dollar", case_sensitive=True)
    text = " is a liquid.\n\nThe transition from solid to liquid"
    assert is_correct(text, "solid") and not is_correct(first_line(text), "solid")


@pytest.mark.parametrize(
    ("generated", "obj", "expected"),
    [
        (" is a fish.", "fish", True),
        (" is one of animal, bird, fish, fruit", "fish", False),  # an echo of the prompt's options
        (" is a liquid. The transition from solid to liquid", "liquid", False),  # names another phase
        (" is New York City", "New York", True),  # "York" is inside the object, not another answer
        (" is the bird", "fish", False),  # the rule of is_correct first
    ],
)
def test_single_answer_rule(generated: str, obj: str, expected: bool) -> None:
    answers = ["animal", "bird", "fish", "fruit", "solid", "liquid", "gas", "New York", "York"]
    assert is_single_answer(generated, obj, answers) is expected


def test_single_answer_rule_follows_case_sensitivity() -> None:
    assert is_single_answer(" is Fish, not Bird", "Fish", ["Fish", "bird"], case_sensitive=True)
    assert not is_single_answer(" is Fish, not Bird", "Fish", ["Fish", "bird"])


def test_single_answer_columns_of_the_summary_and_subject_table() -> None:
    """A sample right only by listing every option scores under the paper's rule and not under the
    single-answer rule; the answers are the screened objects, so an option no grid sample has still counts."""
    import pandas as pd

    from patchscopes.evals.attributes import subject_table, with_single_answer

    texts = {"1": " is a fish", "2": " is animal, bird, fish"}
    grid = pd.DataFrame(
        [
            {"task": "t", "sample_id": sid, "object": obj, "source_layer": 0, "target_layer": 0, "text": texts[sid]}
            for sid, obj in (("1", "fish"), ("2", "bird"))
        ]
    )
    grid = grid.assign(correct=[is_correct(t, o) for t, o in zip(grid.text, grid.object)], correct_first_line=False)
    screen = pd.DataFrame([{"task": "t", "sample_id": "9", "object": "animal", "answered": False}])
    grid = with_single_answer(grid, screen)
    assert grid.correct.tolist() == [True, True] and grid.correct_single_answer.tolist() == [True, False]
    assert with_single_answer(grid.assign(text=" is a bird"), pd.DataFrame()).correct_single_answer.tolist() == [False, True]
    probe = pd.DataFrame([{"task": "t", "layer": 0, "probe_accuracy": 0.5, "n": 2, "correct_ids": ["2"]}])
    table = subject_table(grid, probe).set_index("sample_id")
    assert table.patchscope_single_answer.to_dict() == {"1": 1.0, "2": 0.0}
    assert table.difference_single_answer.to_dict() == {"1": 1.0, "2": -1.0}
    [row] = summarize(grid, probe, n_tasks=1).to_dict("records")
    assert row["patchscope_mean"] == pytest.approx(100.0) and row["patchscope_single_answer_mean"] == pytest.approx(50.0)


def test_fill_placeholder_only_whole_word() -> None:
    assert fill_placeholder("The official currency of x", "Japan") == "The official currency of Japan"
    assert fill_placeholder("Among fox, box: the class of x", "owl") == "Among fox, box: the class of owl"
    with pytest.raises(Exception, match="no placeholder"):
        fill_placeholder("no marker here", "Japan")


def test_paired_t_test_matches_scipy_and_bonferroni() -> None:
    a, b = [50.0, 60.0, 55.0, 70.0], [40.0, 42.0, 47.0, 45.0]
    ref = stats.ttest_rel(a, b)
    test = paired_test(a, b, n_tests=12)
    assert test.t == pytest.approx(ref.statistic)
    assert test.p == pytest.approx(ref.pvalue)
    assert test.p_corrected == pytest.approx(min(1.0, ref.pvalue * 12))
    assert paired_test([1.0, 2.0], [1.0, 2.0]).winner is None  # identical series: undefined, not significant
    assert np.isnan(paired_test([1.0, 2.0, 4.0], [float("nan"), 1.0, 2.0], n_tests=12).p_corrected)  # never min(1, nan) = 1
    assert paired_test([90.0, 91.0, 92.0, 93.0, 95.0], [10.0, 10.0, 11.0, 12.0, 12.0], n_tests=2).winner == "a"


def test_probe_separable_and_chance() -> None:
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"] * 10
    centers = {"a": 0.0, "b": 5.0, "c": 10.0}
    x = np.stack([rng.normal(centers[y], 0.3, size=4) for y in labels])
    assert probe_accuracy(x, labels, folds=3, seed=0) == 1.0
    # unique labels can never be predicted on held-out folds
    assert probe_accuracy(x[:6], ["p", "q", "r", "s", "t", "u"], folds=3, seed=0) == 0.0
    # a training fold holding a single class predicts it
    assert probe_accuracy(np.zeros((6, 2)), ["a"] * 6, folds=3) == 1.0


def test_probe_equals_plain_reference_cross_validation() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    labels = np.array(["u", "v"] * 12)
    x = rng.normal(size=(24, 5)) + (labels == "v")[:, None] * 0.8
    correct = 0
    for train, test in KFold(3, shuffle=True, random_state=7).split(x):
        scaler = StandardScaler().fit(x[train])
        model = LogisticRegression(max_iter=1000).fit(scaler.transform(x[train]), labels[train])
        correct += (model.predict(scaler.transform(x[test])) == labels[test]).sum()
    assert probe_accuracy(x, list(labels), folds=3, seed=7) == pytest.approx(correct / 24)


def test_position_recomputed_from_subject(smol_tokenizer_model) -> None:  # noqa: ANN001
    lm = smol_tokenizer_model
    sample = AttributeSample(
        "t",
        "0",
        "The official currency of x",
        "United States",
        "Dollar",
        " released in the United States on May 2",
        2,
        "United States",
    )
    tok = lm.tokenize(sample.prompt_source)
    [pos] = resolve_positions(sample.source_position, sample.prompt_source, tok.offsets)
    subject_end = sample.prompt_source.index("United States") + len("United States")
    assert tok.offsets[pos][1] == subject_end  # the last token of the subject
    assert tok.offsets[pos + 1][0] >= subject_end  # and the next one starts after it


@pytest.fixture
def smol_tokenizer_model():  # noqa: ANN201
    from tiny import tiny_model

    return tiny_model("llama")


def test_first_snippets_one_per_sample(data_root) -> None:  # noqa: ANN001
    task = load_attribute_task(data_root / "patchscopes/factual/country_currency.tsv")
    firsts = first_snippets(task.samples)
    assert len({s.sample_id for s in firsts}) == len(firsts) < len(task.samples)


def test_summary_any_target_layer_then_mean_over_source_layers() -> None:
    import pandas as pd

    grid = pd.DataFrame(
        [
            # sample 1 correct at ℓ=0 via ℓ*=5 only; at ℓ=5 never
            {"task": "t", "sample_id": "1", "source_layer": 0, "target_layer": 0, "correct": False},
            {"task": "t", "sample_id": "1", "source_layer": 0, "target_layer": 5, "correct": True},
            {"task": "t", "sample_id": "1", "source_layer": 5, "target_layer": 0, "correct": False},
            {"task": "t", "sample_id": "1", "source_layer": 5, "target_layer": 5, "correct": False},
            {"task": "t", "sample_id": "2", "source_layer": 0, "target_layer": 0, "correct": True},
            {"task": "t", "sample_id": "2", "source_layer": 0, "target_layer": 5, "correct": True},
            {"task": "t", "sample_id": "2", "source_layer": 5, "target_layer": 0, "correct": True},
            {"task": "t", "sample_id": "2", "source_layer": 5, "target_layer": 5, "correct": False},
        ]
    ).assign(correct_first_line=False)
    probe = pd.DataFrame(
        [{"task": "t", "layer": 0, "probe_accuracy": 0.5, "n": 2}, {"task": "t", "layer": 5, "probe_accuracy": 0.0, "n": 2}]
    )
    row = summarize(grid, probe, n_tasks=1).iloc[0]
    assert row.patchscope_mean == pytest.approx(75.0)  # ℓ=0: 2/2, ℓ=5: 1/2
    assert row.patchscope_std == pytest.approx(25.0)
    assert row.probe_mean == pytest.approx(25.0)


def test_entities_builtin_list() -> None:
    entities = load_entities()
    assert len(entities) >= 150
    assert sum(e.popularity == "popular" for e in entities) == sum(e.popularity == "rare" for e in entities)
    assert len({e.name for e in entities}) == len(entities)
    chosen = select_entities(entities, 3, seed=1)
    assert [e.popularity for e in chosen] == ["popular"] * 3 + ["rare"] * 3
    assert chosen == select_entities(entities, 3, seed=1)


def test_malformed_entity_file_names_file_line_field(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "mine.tsv"
    path.write_text("entity\tpopularity\tdescription\nAda Lovelace\tpopular\tMathematician\nNobody\tfamous\tSomeone\n")
    with pytest.raises(DataFormatError, match=r"mine.tsv, line 3, field 'popularity'"):
        load_entities(path)
    path.write_text("entity\tdescription\nAda\tMathematician\n")
    with pytest.raises(DataFormatError, match="missing column"):
        load_entities(path)


def test_malformed_task_file_names_file_line_field(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "task.tsv"
    path.write_text("prompt_target\tsubject\tobject\tprompt_source\nThe capital of x\tFrance\t\tin France today\n")
    with pytest.raises(DataFormatError, match=r"task.tsv, line 2, field 'object'"):
        load_attribute_task(path)


def test_read_corpus_text_and_tsv(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "a.txt").write_text("first text\n\nsecond text\nfirst text\n")
    (tmp_path / "b.tsv").write_text("prompt_source\tother\n third\tz\n")
    assert read_corpus([tmp_path / "a.txt", tmp_path / "b.tsv"]) == ["first text", "second text", "third"]
    (tmp_path / "c.tsv").write_text("text\n x\n")
    with pytest.raises(Exception, match="prompt_source"):
        read_corpus([tmp_path / "c.tsv"])


def test_read_corpus_jsonl_keeps_whole_documents(tmp_path) -> None:  # noqa: ANN001
    import gzip

    docs = ["# Title\n\nA first paragraph.\n", "Second document,\nwith two lines."]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d, "meta": 1}) + "\n" for d in docs) + "\n")
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": docs[0]}) + "\n" + json.dumps({"text": "third"}) + "\n")
    assert read_corpus([tmp_path / "d.jsonl", tmp_path / "e.jsonl.gz"]) == [*docs, "third"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(EvalError, match=r"bad.jsonl, line 2: no string field 'text'"):
        read_corpus([tmp_path / "bad.jsonl"])
    (tmp_path / "cut.jsonl").write_text('{"text": "cut')
    with pytest.raises(EvalError, match=r"cut.jsonl, line 1: not JSON"):
        read_corpus([tmp_path / "cut.jsonl"])


def test_changed_config_is_refused(tmp_path) -> None:  # noqa: ANN001
    ResultStore(tmp_path, {"eval": "entities", "seed": 0})
    with pytest.raises(ConfigMismatchError, match="seed"):
        ResultStore(tmp_path, {"eval": "entities", "seed": 1})


def test_report_renders_tables_figures_and_paper(tmp_path, data_root) -> None:  # noqa: ANN001
    import pandas as pd

    from patchscopes import plots

    (tmp_path / "config.json").write_text(json.dumps({"config": {"eval": "attributes", "model": "m"}, "environment": {}}))
    pd.DataFrame(
        [
            {
                "task": "country_currency",
                "grid_samples": 2,
                "probe_samples": 5,
                "patchscope_mean": 40.0,
                "patchscope_std": 5.0,
                "probe_mean": 20.0,
                "probe_std": 2.0,
                "p_bonferroni": 0.5,
            }
        ]
    ).to_csv(tmp_path / "summary.csv", index=False)
    import matplotlib.pyplot as plt

    plots.save(plt.figure(), tmp_path / "heatmap_country_currency.png")
    page = render(tmp_path)
    assert "data:image/png;base64," in page and "51.0 ± 8.9" in page and "40.0 ± 5.0" in page and "country_currency" in page
    with pytest.raises(ReportError, match="config.json"):
        render(tmp_path / "missing")


def test_both_entity_evaluations_score_rouge_l_the_same_stemmed_way():
    from patchscopes.evals.cross_model import rouge_l as cross_model_rouge_l
    from patchscopes.evals.entities import Scorer

    pytest.importorskip("rouge_score")
    scorer = Scorer()
    for prediction, reference in [("British royals", "a British royal"), ("American actor", "American actor and producer")]:
        assert scorer.rouge_l(prediction, reference) == cross_model_rouge_l(prediction, reference)
    # stemming: "royals" and "royal" match, so the F-measure is 2·1·(2/3) / (1 + 2/3) = 0.8, not 0.4
    assert scorer.rouge_l("British royals", "a British royal") == pytest.approx(0.8)


def test_probe_and_patchscope_are_compared_on_the_same_subjects() -> None:
    import pandas as pd

    from patchscopes.evals.attributes import subject_table, summarize

    grid = pd.DataFrame(
        [
            {"task": "t", "sample_id": sid, "source_layer": layer, "target_layer": t, "correct": ok, "correct_first_line": ok}
            for sid, per_layer in (("1", {0: True, 5: True}), ("2", {0: False, 5: True}), ("3", {0: False, 5: False}))
            for layer, ok in per_layer.items()
            for t in (0, 5)
        ]
    )
    # the probe was cross-validated on more samples ("9" is not in the grid); only the grid's are compared
    probe = pd.DataFrame(
        [
            {"task": "t", "layer": 0, "probe_accuracy": 0.5, "n": 4, "n_classes": 2, "correct_ids": ["1", "9"]},
            {"task": "t", "layer": 5, "probe_accuracy": 0.25, "n": 4, "n_classes": 2, "correct_ids": ["3"]},
        ]
    )
    table = subject_table(grid, probe).set_index("sample_id")
    assert table.patchscope.to_dict() == {"1": 1.0, "2": 0.5, "3": 0.0}
    assert table.probe.to_dict() == {"1": 0.5, "2": 0.0, "3": 0.5}
    assert table.difference.to_dict() == {"1": 0.5, "2": 0.5, "3": -0.5}
    [row] = summarize(grid, probe, n_tasks=1, min_samples=15).to_dict("records")
    assert row["subject_difference"] == pytest.approx(100 / 6)  # mean of the three differences, in points
    assert row["subject_difference_low"] <= row["subject_difference"] <= row["subject_difference_high"]
    assert row["data_points"] == 3 and not row["meets_min_samples"]  # 3 data points (one snippet each) < the paper's 15


def test_probe_predictions_are_the_per_sample_form_of_the_accuracy() -> None:
    from patchscopes.evals.probing import probe_predictions

    rng = np.random.default_rng(1)
    labels = ["u", "v"] * 12
    x = rng.normal(size=(24, 5)) + (np.array(labels) == "v")[:, None] * 0.8
    hits = probe_predictions(x, labels, folds=3, seed=7)
    assert hits.shape == (24,) and hits.mean() == pytest.approx(probe_accuracy(x, labels, folds=3, seed=7))


def test_grouped_probe_folds_keep_a_subjects_snippets_together() -> None:
    from patchscopes.evals.probing import probe_predictions

    rng = np.random.default_rng(2)
    labels = ["u", "v", "w"] * 8
    x = rng.normal(size=(24, 5)) + np.array([{"u": 0, "v": 1, "w": 2}[y] for y in labels])[:, None]
    plain = probe_predictions(x, labels, folds=3, seed=4)
    assert (probe_predictions(x, labels, folds=3, seed=4, groups=[f"s{i}" for i in range(24)]) == plain).all()
    # every subject has its own object and two identical snippets: ungrouped, the twin in the training
    # folds gives the answer away; grouped, the object is never seen in training, so never predicted
    twins = np.repeat(rng.normal(size=(12, 5)), 2, axis=0)
    objects = np.repeat([f"o{i}" for i in range(12)], 2).tolist()
    subjects = np.repeat([f"s{i}" for i in range(12)], 2).tolist()
    assert probe_predictions(twins, objects, folds=3, seed=0).mean() > 0.3
    assert not probe_predictions(twins, objects, folds=3, seed=0, groups=subjects).any()


def test_sample_snippets_distinct_in_file_order(data_root) -> None:  # noqa: ANN001
    from patchscopes.evals.attributes import sample_snippets

    task = load_attribute_task(data_root / "patchscopes/factual/company_ceo.tsv")
    five, one = sample_snippets(task.samples, 5), sample_snippets(task.samples, 1)
    assert [s[0] for s in one.values()] == [s[0] for s in five.values()] == first_snippets(task.samples)
    assert all(len(s) == 1 for s in one.values())
    assert all(1 <= len(s) <= 5 and len({x.prompt_source for x in s}) == len(s) for s in five.values())
    assert all([x.line for x in s] == sorted(x.line for x in s) for s in five.values())
    assert any(len(s) == 5 for s in five.values()) and any(len(s) < 5 for s in five.values())


def test_summary_with_several_snippets_scores_each_sample_by_its_share_of_snippets() -> None:
    import pandas as pd

    from patchscopes.evals.attributes import subject_table

    # sample 1: two snippets, one correct at ℓ=0 (via ℓ*=5); sample 2: one snippet, correct at both layers
    correct = {("1", 0, 0, 5), ("2", 0, 0, 0), ("2", 0, 5, 5)}
    grid = pd.DataFrame(
        [
            {"task": "t", "sample_id": sid, "snippet": k, "source_layer": layer, "target_layer": t}
            | {"correct": (sid, k, layer, t) in correct, "correct_first_line": False}
            for sid, snippets in (("1", 2), ("2", 1))
            for k in range(snippets)
            for layer in (0, 5)
            for t in (0, 5)
        ]
    )
    probe = pd.DataFrame(
        [
            {"task": "t", "layer": 0, "probe_accuracy": 0.25, "n": 2, "correct_ids": ["1"], "scores": {"1": 0.5, "2": 0.0}},
            {"task": "t", "layer": 5, "probe_accuracy": 0.5, "n": 2, "correct_ids": ["2"], "scores": {"1": 0.0, "2": 1.0}},
        ]
    )
    [row] = summarize(grid, probe, n_tasks=1).to_dict("records")
    assert row["patchscope_mean"] == pytest.approx(62.5)  # ℓ=0: (1/2 + 1)/2, ℓ=5: (0 + 1)/2
    assert row["patchscope_any_snippet_mean"] == pytest.approx(75.0)  # ℓ=0: 2/2, ℓ=5: 1/2
    assert row["probe_mean"] == pytest.approx(37.5) and row["probe_any_snippet_mean"] == pytest.approx(50.0)
    assert row["grid_snippets"] == 3
    table = subject_table(grid, probe).set_index("sample_id")
    assert table.patchscope.to_dict() == {"1": 0.25, "2": 1.0}
    assert table.probe.to_dict() == {"1": 0.25, "2": 0.5}
    # a grid of runs made before the snippet column reads as one snippet per sample
    single = grid[grid.snippet == 0].drop(columns="snippet")
    assert summarize(single, probe, n_tasks=1).iloc[0].patchscope_mean == pytest.approx(75.0)
