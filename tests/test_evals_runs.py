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
    config = AttributesConfig(
        task_files=(str(task),),
        screen=None,
        grid_samples=None,
        source_layers=(0, 2),
        target_layers=(1, 3),
        max_new_tokens=4,
        require_answer=False,
    )
    _resume_equals_uninterrupted(
        lambda out, stop: run_attributes(lm, out, config, progress=False, stop_after=stop), tmp_path, ["screen", "probe", "grid"]
    )
    result = run_attributes(lm, tmp_path / "full", config, progress=False)
    assert len(result.grid) == 3 * 2 * 2 and result.screen.source_position.tolist() != []
