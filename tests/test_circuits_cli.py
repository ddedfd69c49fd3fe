"""The quick profile of `patchscopes circuits discover | edit | report` on the real SmolLM2-135M."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from patchscopes.cli import app


@pytest.mark.usefixtures("smol")
def test_quick_profile_end_to_end(tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["circuits", "discover", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["quick"] and config["layers"] == [-1]
    circuits = sorted(p.name for p in (out / "circuits").iterdir())
    assert circuits == ["hierarchy@0.05", "hierarchy@0.5"]
    again = runner.invoke(app, ["circuits", "discover", "--quick", "--out", str(out)])  # resumes: nothing redone
    assert again.exit_code == 0 and "training" not in again.output
    result = runner.invoke(
        app, ["circuits", "edit", "--quick", "--out", str(out), "--edit-steps", "1", "--edit-densities", "0.05"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["circuits", "report", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("composition", "overlap", "faithfulness", "eap", "edits"):
        assert (out / f"{name}.csv").is_file(), name
    for name in ("composition", "overlap", "faithfulness", "eap_faithfulness", "edits"):
        assert (out / "figures" / f"{name}.png").is_file(), name
    edits = (out / "edits.csv").read_text()
    assert "complement" in edits and "random" in edits


def test_bad_inputs_give_clear_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["circuits", "discover", "--quick", "--task", "blimp", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown task" in result.output
    result = runner.invoke(app, ["circuits", "report", "--out", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not a circuits run directory" in result.output


def test_run_profile_dry_run_shows_the_full_experiment_without_a_model(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["circuits", "run", "--profile", "paper", "--dry-run", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    profile = json.loads(result.output)
    run, edit = profile["run"], profile["edit"]
    assert run["layers"] is None and run["hard_mask"] and run["densities"] == [0.5, 0.35, 0.15, 0.05]
    assert run["tasks"] == ["subj_verb", "sentiment", "hierarchy"] and edit["max_norm"] > 0
    assert profile["plan"]["seeds"] == [0, 1, 2] and profile["plan"]["facts"] >= 100 and profile["plan"]["edits"] == 108
    assert not (tmp_path / "p").exists()  # nothing ran
    seeds = runner.invoke(app, ["circuits", "run", "--profile", "paper", "--dry-run", "--seeds", "5,6"])
    assert seeds.exit_code == 0 and json.loads(seeds.output)["plan"]["seeds"] == [5, 6]
    bad = runner.invoke(app, ["circuits", "run", "--profile", "gpt-4", "--dry-run", "--out", str(tmp_path / "q")])
    assert bad.exit_code == 2 and "unknown profile" in bad.output
