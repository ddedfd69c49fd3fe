"""The LRC evaluation's quick profile end to end on SmolLM2-135M (CLI, resume, saved artifacts, Patchscope bridges)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from patchscopes.cli import app
from patchscopes.relations.bridges import attribute_lens_scope, describe_concept
from patchscopes.relations.data import load_relations
from patchscopes.relations.lrc import ConceptSet, subject_states
from patchscopes.relations.lre import LinearRelationalEmbedding
from patchscopes.relations.prompts import zero_shot_prompts
from patchscopes.runner import run

METHODS = ["LRC", "LRC (first token, final layer)", "SVM", "input averaging"]


@pytest.fixture(scope="module")
def quick_run(smol, data_root, tmp_path_factory) -> Path:  # noqa: ANN001
    out = tmp_path_factory.mktemp("lrc") / "run"
    result = CliRunner().invoke(app, ["eval", "lrc", "--profile", "quick", "--no-sweep", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def test_quick_profile_table_and_concepts_beat_chance(quick_run) -> None:  # noqa: ANN001
    summary = json.loads((quick_run / "eval" / "summary.json").read_text())
    assert set(summary["table"]) == set(METHODS)
    for method in METHODS:
        assert set(summary["table"][method]) == {"accuracy", "causality"}
    # word sentiment: three values (chance 1/3); fixed seed 42, deterministic
    assert summary["table"]["LRC"]["accuracy"]["mean"] > 1 / 3
    assert "| LRC |" in (quick_run / "table.md").read_text()


def test_rerun_resumes_without_recomputing(quick_run) -> None:  # noqa: ANN001
    before = json.loads((quick_run / "eval" / "summary.json").read_text())
    args = ["eval", "lrc", "--profile", "quick", "--no-sweep", "--out", str(quick_run), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    after = json.loads((quick_run / "eval" / "summary.json").read_text())
    assert after["table"] == before["table"]
    assert after["jacobians"]["computed"] == 0
    other = CliRunner().invoke(app, ["eval", "lrc", "--profile", "quick", "--no-sweep", "--rank", "8", "--out", str(quick_run)])
    assert other.exit_code == 2 and "configuration" in other.output and "rank" in other.output


def test_saved_lre_and_concepts_reload_and_bridge_to_patchscopes(quick_run, smol) -> None:  # noqa: ANN001
    folder = quick_run / "eval" / "artifacts" / "word-sentiment" / "seed-42"
    lre = LinearRelationalEmbedding.load(folder / "lre")
    assert (lre.metadata["model"], lre.metadata["relation"]) == ("SmolLM2-135M", "word sentiment")
    assert (lre.subject_layer, lre.object_layer, lre.metadata["aggregation"]) == (26, 27, "mean")
    concepts = ConceptSet.load(folder / "concepts-lrc")
    assert concepts.metadata["rank"] == 64 and set(concepts.names) <= {"positive", "negative", "neutral"}
    torch.testing.assert_close(concepts.vectors.norm(dim=-1), torch.ones(len(concepts)))

    relation = load_relations()["word sentiment"]
    prompt = zero_shot_prompts(relation, relation.samples[0])[0]
    result = run(attribute_lens_scope(lre, prompt.text, prompt.subject), smol)
    assert result.source_layer == 26 and result.target_layer == 27 and len(result.top_tokens) == 10
    # with the final-layer LRE the Patchscope writes W s + b into the last block's output: exactly the attribute lens
    final = LinearRelationalEmbedding.load(folder / "lre-first-token-final-layer")
    assert final.object_layer == smol.n_layers - 1
    lens = run(attribute_lens_scope(final, prompt.text, prompt.subject), smol)
    state = subject_states(smol, [prompt], final.subject_layer)[0]
    torch.testing.assert_close(lens.logits.float(), final.attribute_lens(smol, state).float(), atol=1e-3, rtol=1e-3)
    description = describe_concept(smol, concepts, concepts.names[0])
    assert description.top_tokens and isinstance(description.text, str)
