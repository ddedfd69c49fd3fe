"""The evaluations end to end: real-model sanity on SmolLM2-135M, the --quick CLI profiles, and exact resume."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from patchscopes.evals.attributes import AttributesConfig, run_attributes
from patchscopes.evals.common import StopAfter
from patchscopes.evals.entities import EntitiesConfig, Scorer, run_entities
from patchscopes.evals.next_token import NextTokenConfig, run_next_token, split_examples
from patchscopes.results import ConfigMismatchError

TEXTS = [
    "The capital of France is Paris and the capital of Japan is Tokyo.",
    "Diana, Princess of Wales, was a member of the British royal family.",
    "Apples are red or green, and bananas are yellow when they are ripe.",
    "The official currency of the United Kingdom is the pound sterling.",
    "Water boils at one hundred degrees at sea level on a normal day.",
    "In 1969 two astronauts walked on the surface of the Moon for hours.",
]
CORPUS = [f"{text} (note {i})" for i in range(4) for text in TEXTS]


def test_last_layer_precision_is_one_and_logit_lens_matches_reference(smol, tmp_path) -> None:  # noqa: ANN001
    config = NextTokenConfig(n_eval=5, layers=(15, -1), unit_size=5, seed=3)
    result = run_next_token(smol, tmp_path / "ntp", config, progress=False, texts=CORPUS)
    last = result.summary[result.summary.layer == smol.n_layers - 1].set_index("method")
    assert last.precision_at_1.to_dict() == {"affine_lens": 1.0, "logit_lens": 1.0, "token_identity": 1.0}
    # plain reference: the model's own argmax, and HF hidden states → final norm → unembedding → argmax
    examples, _ = split_examples(smol, CORPUS, config)
    rows = result.rows[result.rows.method == "logit_lens"]
    for e in examples:
        with torch.no_grad():
            out = smol.model(torch.tensor([list(e.ids)]), output_hidden_states=True)
        own = smol.token_strings([int(out.logits[0, e.position].argmax())])[0]
        h = out.hidden_states[16][0, e.position]  # hidden_states[0] is the embeddings: block 15 is entry 16
        lens = smol.token_strings([int(smol.adapter.unembed(smol.adapter.final_norm(h)).argmax())])[0]
        row = rows[(rows.example == e.index) & (rows.layer == 15)].iloc[0]
        assert (row.position, row.model_top1, row.top1) == (e.position, own, lens)
        assert row.precision_at_1 == float(own == lens)


def test_quick_profiles_end_to_end(smol, data_root, tmp_path) -> None:  # noqa: ANN001
    from patchscopes.cli import app

    runner = CliRunner()
    for name, files in (
        ("next-token", ["summary.csv", "next_token.png"]),
        ("entities", ["summary.csv", "entities.png"]),
        ("attributes", ["summary.csv", "grid.csv", "heatmaps.png"]),
    ):
        out = tmp_path / name
        result = runner.invoke(app, ["eval", name, "--quick", "--out", str(out), "--no-progress"])
        assert result.exit_code == 0, result.output
        for f in ["config.json", *files]:
            assert (out / f).is_file(), f"{name}: {f} missing"
        report = runner.invoke(app, ["report", str(out)])
        assert report.exit_code == 0, report.output
        assert "data:image/png;base64," in (out / "report.html").read_text()
    summary = pd.read_csv(tmp_path / "attributes" / "summary.csv")
    assert summary.screened.iloc[0] == 4
    # the same --out with a changed configuration is refused with a clear message
    result = runner.invoke(
        app, ["eval", "entities", "--quick", "--seed", "5", "--out", str(tmp_path / "entities"), "--no-progress"]
    )
    assert result.exit_code == 2 and "another configuration" in result.output


class _FakeScorer(Scorer):
    """Scores without loading the sentence-embedding model (resume mechanics only)."""

    def similarity(self, predictions, reference):  # noqa: ANN001, ANN201
        return [float(len(p) % 7) for p in predictions]


def _resume_equals_uninterrupted(run, tmp_path, tables) -> None:  # noqa: ANN001
    full = run(tmp_path / "full", None)
    with pytest.raises(StopAfter):
        run(tmp_path / "cut", 2)
    resumed = run(tmp_path / "cut", None)
    for table in tables:
        a, b = getattr(full, table), getattr(resumed, table)
        assert len(a) > 0
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def test_next_token_resume_is_exact(tmp_path) -> None:  # noqa: ANN001
    from tiny import tiny_model

    lm = tiny_model("llama")
    config = NextTokenConfig(n_eval=6, unit_size=2, train_positions=200, layers=None)
    _resume_equals_uninterrupted(
        lambda out, stop: run_next_token(lm, out, config, texts=CORPUS, progress=False, stop_after=stop), tmp_path, ["rows"]
    )
    with pytest.raises(ConfigMismatchError):
        run_next_token(lm, tmp_path / "full", replace(config, seed=9), texts=CORPUS, progress=False)


def test_next_token_fits_its_lens_on_the_tokens_it_evaluates(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from patchscopes import lenses
    from tiny import tiny_model

    lm = tiny_model("llama")
    documents = [f"{k}. 📖 素数 " + " ".join(TEXTS) * 5 for k in range(12)]  # several hundred tokens each
    seen: list[int] = []

    def spy(model, ids, positions, layers, batch_size=16):  # noqa: ANN001, ANN202
        seen.extend(len(i) for i in ids)
        return lenses_capture(model, ids, positions, layers, batch_size)

    lenses_capture = lenses.capture
    monkeypatch.setattr(lenses, "capture", spy)
    config = NextTokenConfig(n_eval=2, unit_size=2, train_positions=100, train_positions_per_text=1, layers=(1, -1))
    run_next_token(lm, tmp_path, config, texts=documents, progress=False)
    assert len(seen) == 10 and max(seen) <= config.max_tokens  # the 10 training texts, cut as the evaluation cuts
    examples, _ = split_examples(lm, documents, config)
    for e in examples:  # the token-identity source run stops at the evaluated position, on the same tokens
        ids = lm.tokenize(e.text).ids
        assert ids[: e.position + 1] == list(e.ids[: e.position + 1]) and len(ids) <= e.position + 8


def test_a_run_resumed_in_another_dtype_is_refused(tmp_path) -> None:  # noqa: ANN001
    import copy
    import json

    from patchscopes.models.loading import from_model
    from tiny import tiny_model

    lm = tiny_model("llama")
    config = NextTokenConfig(n_eval=2, unit_size=2, train_positions=50, layers=None)
    with pytest.raises(StopAfter):
        run_next_token(lm, tmp_path, config, texts=CORPUS, progress=False, stop_after=1)
    # float32 records no dtype, so run directories made before the dtype was recorded resume unchanged
    assert "dtype" not in json.loads((tmp_path / "config.json").read_text())["config"]
    half = from_model(copy.deepcopy(lm.model).to(torch.bfloat16), lm.tokenizer, name=lm.name)  # tiny models are shared
    with pytest.raises(ConfigMismatchError, match=r"differs in: dtype\)"):
        run_next_token(half, tmp_path, config, texts=CORPUS, progress=False)
    assert lm.dtype == torch.float32  # the shared tiny model is left as it was


def test_entities_resume_is_exact(tmp_path) -> None:  # noqa: ANN001
    from tiny import tiny_model

    lm = tiny_model("llama")
    config = EntitiesConfig(per_group=2, layers=(0, 2), max_new_tokens=4)
    _resume_equals_uninterrupted(
        lambda out, stop: run_entities(lm, out, config, progress=False, stop_after=stop, scorer_factory=_FakeScorer),
        tmp_path,
        ["rows"],
    )


def test_attributes_resume_is_exact(tmp_path) -> None:  # noqa: ANN001
    from tiny import tiny_model

    task = tmp_path / "capitals.tsv"
    task.write_text(
        "sample_id\tprompt_target\tsubject\tobject\tprompt_source\n"
        "0\tThe capital of x\tFrance\tParis\tThe capital of France is Paris.\n"
        "0\tThe capital of x\tFrance\tParis\tIn France, the capital is Paris.\n"
        "1\tThe capital of x\tJapan\tTokyo\tThe capital of Japan is Tokyo.\n"
        "2\tThe capital of x\tWales\tCardiff\tDiana, Princess of Wales, was royal.\n"
    )
    lm = tiny_model("llama")
    config = _tiny_grid_config(task, snippets=1)
    _resume_equals_uninterrupted(
        lambda out, stop: run_attributes(lm, out, config, progress=False, stop_after=stop), tmp_path, ["screen", "probe", "grid"]
    )
    result = run_attributes(lm, tmp_path / "full", config, progress=False)
    assert len(result.grid) == 3 * 2 * 2 and result.screen.source_position.tolist() != []


def test_an_unfinished_attribute_run_packed_and_moved_resumes_exactly(tmp_path) -> None:  # noqa: ANN001
    """A run stopped early holds samples of every task (the grid units are interleaved), and its packed
    directory, copied elsewhere as a commit would carry it, resumes to the uninterrupted result."""
    import shutil

    from patchscopes.cli import app
    from patchscopes.results import ResultStore
    from tiny import tiny_model

    rows = "".join(
        f"{i}\tThe capital of x\t{s}\t{o}\tThe capital of {s} is {o}.\n"
        for i, (s, o) in enumerate([("France", "Paris"), ("Japan", "Tokyo"), ("Wales", "Cardiff"), ("Peru", "Lima")])
    )
    header = "sample_id\tprompt_target\tsubject\tobject\tprompt_source\n"
    files = [tmp_path / "capitals.tsv", tmp_path / "cities.tsv"]
    for f in files:
        f.write_text(header + rows)
    lm = tiny_model("llama")
    config = replace(_tiny_grid_config(files[0], snippets=1), task_files=tuple(str(f) for f in files))
    full = run_attributes(lm, tmp_path / "full", config, progress=False)
    units = full.grid.drop_duplicates(["task", "sample_id"]).task.tolist()
    assert units != sorted(units) and len(units) == 8  # interleaved, not task after task
    with pytest.raises(StopAfter):  # 2 tasks × (screen + probe), then 3 of the 8 grid units
        run_attributes(lm, tmp_path / "cut", config, progress=False, stop_after=7)
    packed = CliRunner().invoke(app, ["pack", str(tmp_path / "cut")])
    assert packed.exit_code == 0 and packed.output.count("packed ") == 3, packed.output
    assert sorted(p.name for p in (tmp_path / "cut").glob("*.jsonl*")) == ["grid.jsonl.gz", "probe.jsonl.gz", "screen.jsonl.gz"]
    shutil.copytree(tmp_path / "cut", tmp_path / "elsewhere")
    partial = ResultStore.reopen(tmp_path / "elsewhere").frame("grid")
    assert partial.drop_duplicates(["task", "sample_id"]).task.tolist() == units[:3]
    resumed = run_attributes(lm, tmp_path / "elsewhere", config, progress=False)
    for table in ("screen", "probe", "grid"):
        pd.testing.assert_frame_equal(getattr(full, table), getattr(resumed, table))
    assert resumed.probe.scores.tolist() == full.probe.scores.tolist()  # per-sample dicts survive the round trip


SNIPPET_TASK = (
    "sample_id\tprompt_target\tsubject\tobject\tprompt_source\n"
    "0\tThe capital of x\tFrance\te\tThe capital of France is Paris.\n"
    "0\tThe capital of x\tFrance\te\tIn France, the capital is Paris.\n"
    "0\tThe capital of x\tFrance\te\tThe capital of France is Paris.\n"  # a repeated text counts once
    "0\tThe capital of x\tFrance\te\tapples from france are red or green.\n"
    "0\tThe capital of x\tFrance\te\tDiana of Wales was in France.\n"
    "1\tThe capital of x\tJapan\ta\tThe capital of Japan is Tokyo.\n"
    "1\tThe capital of x\tJapan\ta\tJapan: Country in the East\n"
    "1\tThe capital of x\tJapan\ta\tThe official currency of Japan.\n"
    "2\tThe capital of x\tWales\te\tDiana, Princess of Wales, was royal.\n"
    "3\tThe capital of x\tTokyo\ta\tThe capital of Japan is Tokyo.\n"
    "3\tThe capital of x\tTokyo\ta\tTokyo is a city. Tokyo is big.\n"
    "3\tThe capital of x\tTokyo\ta\tIn 1969 Tokyo grew.\n"
    "4\tThe capital of x\tParis\te\tParis is red or green.\n"
    "4\tThe capital of x\tParis\te\tThe capital of France is Paris.\n"
)


def _tiny_grid_config(task, snippets: int) -> AttributesConfig:  # noqa: ANN001
    """Every sample of ``task`` on a 2 × 2 grid of a tiny model, 4 new tokens, no answer filter."""
    return AttributesConfig(
        task_files=(str(task),),
        screen=None,
        grid_samples=None,
        source_layers=(0, 2),
        target_layers=(1, 3),
        max_new_tokens=4,
        require_answer=False,
        snippets=snippets,
    )


def test_attributes_with_several_snippets_per_sample(tmp_path) -> None:  # noqa: ANN001
    from patchscopes.evals.attribute_data import load_attribute_task
    from patchscopes.evals.attributes import sample_snippets
    from tiny import tiny_model

    task = tmp_path / "capitals.tsv"
    task.write_text(SNIPPET_TASK)
    lm = tiny_model("llama")
    result = run_attributes(lm, tmp_path / "three", _tiny_grid_config(task, 3), progress=False)
    grid = result.grid
    # every sample has min(3, its distinct snippets) snippets, each on the whole 2 × 2 grid
    available = {"0": 4, "1": 3, "2": 1, "3": 3, "4": 2}
    for sid, part in grid.groupby("sample_id"):
        n = min(3, available[str(sid)])
        assert sorted(set(part.snippet)) == list(range(n))
        assert part.groupby(["source_layer", "target_layer"]).size().tolist() == [n] * 4
        texts = part.drop_duplicates("snippet").source_prompt.tolist()
        assert len(set(texts)) == n  # distinct source texts
        expected = [s.prompt_source for s in sample_snippets(load_attribute_task(task).samples, 3)[str(sid)]]
        assert texts == expected
    # the source position is the subject's last token in each snippet (its last occurrence)
    for row in grid.drop_duplicates(["sample_id", "snippet"]).to_dict("records"):
        subject = {"0": "France", "1": "Japan", "2": "Wales", "3": "Tokyo", "4": "Paris"}[str(row["sample_id"])]
        text = row["source_prompt"]
        end = text.lower().rfind(subject.lower()) + len(subject)
        start, stop = lm.tokenize(text).offsets[row["source_position"]]
        assert start < end <= stop, (text, row["source_position"])
    # the rows are not all alike, so the aggregation below is not checked on a constant
    assert 0 < grid.correct.mean() < 1
    # the per-sample rule recomputed from the rows: a snippet counts at ℓ if correct for some ℓ*, a sample
    # scores the share of its snippets that count, a task's accuracy is the mean over samples
    per_layer: dict[int, list[float]] = {}
    for (_sid, layer), part in grid.groupby(["sample_id", "source_layer"]):
        counts = [bool(p.correct.any()) for _, p in part.groupby("snippet")]
        per_layer.setdefault(int(layer), []).append(sum(counts) / len(counts))
    accuracy = [100 * sum(v) / len(v) for v in per_layer.values()]
    [row] = result.summary.to_dict("records")
    assert row["patchscope_mean"] == pytest.approx(sum(accuracy) / len(accuracy))
    assert row["grid_snippets"] == sum(min(3, n) for n in available.values())
    any_snippet = [100 * grid[grid.source_layer == layer].groupby("sample_id").correct.any().mean() for layer in per_layer]
    assert row["patchscope_any_snippet_mean"] == pytest.approx(sum(any_snippet) / len(any_snippet))
    # the probe: one input per snippet, each sample scored by its share of snippets, the accuracy their mean
    for probe_row in result.probe.to_dict("records"):
        scores = probe_row["scores"]
        assert set(scores) == set(available) and probe_row["n"] == 5
        assert probe_row["probe_accuracy"] == pytest.approx(sum(scores.values()) / 5)
        assert all(round(s * min(3, available[sid])) == s * min(3, available[sid]) for sid, s in scores.items())
        assert sorted(probe_row["correct_ids"]) == sorted(sid for sid, s in scores.items() if s > 0)
    probe_layers = result.probe.set_index("layer").probe_accuracy.reindex(sorted(per_layer))
    assert row["probe_mean"] == pytest.approx(100 * probe_layers.mean())
    # the subject-level comparison uses the same per-sample scores on both sides
    table = pd.read_csv(tmp_path / "three" / "subjects.csv", dtype={"sample_id": str}).set_index("sample_id")
    probe_scores = {int(r["layer"]): r["scores"] for r in result.probe.to_dict("records")}
    for sid in available:
        ours = [
            grid[(grid.sample_id == sid) & (grid.source_layer == layer)].groupby("snippet").correct.any().mean()
            for layer in per_layer
        ]
        theirs = [probe_scores[layer][sid] for layer in per_layer]
        assert table.loc[sid, "patchscope"] == pytest.approx(sum(ours) / len(ours))
        assert table.loc[sid, "probe"] == pytest.approx(sum(theirs) / len(theirs))


def test_one_snippet_reproduces_the_first_snippet_rows_and_the_old_config(tmp_path) -> None:  # noqa: ANN001
    import json

    import numpy as np

    from patchscopes.capture import capture
    from patchscopes.evals.attribute_data import load_attribute_task
    from patchscopes.evals.attributes import first_snippets, source_position
    from patchscopes.evals.common import EvalError, seeded_sample
    from patchscopes.evals.probing import probe_predictions
    from tiny import tiny_model

    task = tmp_path / "capitals.tsv"
    task.write_text(SNIPPET_TASK)
    lm = tiny_model("llama")
    one = run_attributes(lm, tmp_path / "one", _tiny_grid_config(task, 1), progress=False)
    three = run_attributes(lm, tmp_path / "three", _tiny_grid_config(task, 3), progress=False)
    assert set(one.grid.snippet) == {0}
    first = three.grid[three.grid.snippet == 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(one.grid.reset_index(drop=True), first)
    pd.testing.assert_frame_equal(one.screen, three.screen)
    # one snippet: the probe is the plain per-sample probe of the first snippets (ungrouped folds), 0/1 scores
    firsts = seeded_sample(first_snippets(load_attribute_task(task).samples), None, 0)  # the run's order
    states = capture(lm, [lm.tokenize(s.prompt_source).ids for s in firsts], [[source_position(lm, s)] for s in firsts], [2])
    hits = probe_predictions(np.stack([st[0, 0].float().numpy() for st in states]), [s.object for s in firsts])
    [layer2] = one.probe[one.probe.layer == 2].to_dict("records")
    assert layer2["correct_ids"] == [s.sample_id for s, hit in zip(firsts, hits) if hit]
    assert layer2["probe_accuracy"] == hits.mean()
    assert all(set(r.values()) <= {0.0, 1.0} for r in one.probe.scores)
    # the default is not recorded, so directories of runs made before the option resume unchanged;
    # another value is recorded and refused in a directory of the other configuration
    params = json.loads((tmp_path / "one" / "config.json").read_text())["config"]["params"]
    assert "snippets" not in params
    assert json.loads((tmp_path / "three" / "config.json").read_text())["config"]["params"]["snippets"] == 3
    with pytest.raises(ConfigMismatchError):
        run_attributes(lm, tmp_path / "one", _tiny_grid_config(task, 3), progress=False)
    with pytest.raises(EvalError, match="between 1 and 5"):
        run_attributes(lm, tmp_path / "six", _tiny_grid_config(task, 6), progress=False)


def test_quick_attributes_cli_with_three_snippets(smol, data_root, tmp_path) -> None:  # noqa: ANN001
    import json

    from patchscopes.cli import app
    from patchscopes.evals.attribute_data import load_attribute_task
    from patchscopes.evals.attributes import sample_snippets

    runner = CliRunner()
    out = tmp_path / "attributes"
    result = runner.invoke(app, ["eval", "attributes", "--quick", "--snippets", "3", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["config"]["params"]["snippets"] == 3
    grid = pd.read_csv(out / "grid.csv", dtype={"sample_id": str})
    snippets = sample_snippets(load_attribute_task(data_root / "patchscopes/factual/country_currency.tsv").samples, 3)
    assert sorted(set(grid.snippet)) == [0, 1, 2]  # the quick profile's grid sample has three snippets or more
    for sid, part in grid.groupby("sample_id"):
        chosen = snippets[sid]
        assert part.drop_duplicates("snippet").source_prompt.tolist() == [s.prompt_source for s in chosen]
        assert len(part) == len(chosen) * part.source_layer.nunique() * part.target_layer.nunique()
        for row in part.drop_duplicates("snippet").to_dict("records"):
            sample = chosen[row["snippet"]]
            end = sample.prompt_source.lower().rfind(sample.subject.lower()) + len(sample.subject)
            start, stop = smol.tokenize(sample.prompt_source).offsets[row["source_position"]]
            assert start < end <= stop
    # the single-answer rule, recomputed plainly: the object appears, no other screened object of the task does
    screened = pd.read_csv(out / "screen.csv")
    squeezed = lambda s: "".join(str(s).lower().split())  # noqa: E731
    answers = {t: {squeezed(o) for o in p.object} for t, p in screened.groupby("task")}
    for row in grid.to_dict("records"):
        text = "" if pd.isna(row["text"]) else squeezed(row["text"])
        obj = squeezed(row["object"])
        others = [a for a in answers[row["task"]] if a not in obj]
        assert row["correct_single_answer"] == (obj in text and not any(a in text for a in others)), row["text"]
    summary = pd.read_csv(out / "summary.csv")
    assert (summary.patchscope_single_answer_mean <= summary.patchscope_mean).all()
    bad = runner.invoke(app, ["eval", "attributes", "--quick", "--snippets", "6", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2
