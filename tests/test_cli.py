"""The CLI on the real default model: the layer table, CSV and PNG outputs, listing, errors."""

from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from patchscopes.cli import app
from patchscopes.validate import parse_layers

runner = CliRunner()


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0-29:10", 30) == [0, 10, 20]
    assert parse_layers("1,3,-1", 30) == [1, 3, 29]


def test_inspect_table_csv_png(smol, tmp_path):
    result = runner.invoke(
        app,
        [
            "inspect",
            "Diana, Princess of Wales",
            "--layers",
            "0-29:7",
            "--max-new-tokens",
            "6",
            "--csv",
            str(tmp_path / "out.csv"),
            "--png",
            str(tmp_path / "out.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "entity-description" in result.output and "token-identity" in result.output
    df = pd.read_csv(tmp_path / "out.csv")
    assert set(df.preset) == {"entity-description", "token-identity"}
    assert sorted(set(df.source_layer)) == [0, 7, 14, 21, 28]
    assert (tmp_path / "out.png").stat().st_size > 5000


def test_inspect_grid_and_custom_prompt(smol, tmp_path):
    result = runner.invoke(
        app,
        [
            "inspect",
            "Paris",
            "--target-prompt",
            "The country whose capital is x",
            "--layers",
            "3,6",
            "--target-layers",
            "3,6",
            "--max-new-tokens",
            "3",
            "--png",
            str(tmp_path / "grid.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "4 layer pairs" in result.output and (tmp_path / "grid.png").exists()


def test_inspect_errors_are_clear(smol):
    result = runner.invoke(app, ["inspect", "Diana", "--layers", "40"])
    assert result.exit_code != 0 and "out of range" in result.output
    result = runner.invoke(app, ["inspect", "Diana", "--target-prompt", "no placeholder here"])
    assert result.exit_code == 2 and "placeholder 'x' not found" in result.output
    result = runner.invoke(app, ["inspect", "Diana", "--model", "not-a-model-xyz"])
    assert result.exit_code == 2 and "SmolLM2-135M" in result.output


def test_models_listing():
    result = runner.invoke(app, ["models"], terminal_width=250)
    assert result.exit_code == 0 and "SmolLM2-135M" in result.output and "Gemma-3-270M" in result.output
    # honest descriptions: the default is an instruct model from a Q4_1 GGUF, Gemma a base model, and each
    # model says where its bytes come from
    assert "SmolLM2-135M: instruct (SmolLM2-135M-Instruct, as the GGUF is named); Q4_1 GGUF" in result.output
    assert "Gemma-3-270M: base (Gemma 3 270M)" in result.output
    assert result.output.count("sha256 checked") + result.output.count("sha256 is checked") == 4


def test_every_builtin_model_describes_its_weights():
    from patchscopes.models.registry import REGISTRY

    for entry in REGISTRY.values():
        assert entry.variant.split(" ")[0] in ("base", "instruct") and "GGUF" in entry.quantisation and entry.provenance


def _commands_that_load_a_model() -> list[list[str]]:
    return [
        ["inspect"], ["lens"], ["eval", "next-token"], ["eval", "attributes"], ["eval", "entities"],
        ["circuits", "discover"], ["circuits", "edit"], ["maps", "fit"], ["eval", "lrc"],
        ["eval", "cross-model"], ["eval", "multihop"],
    ]  # fmt: skip


def test_every_model_loading_command_takes_device_and_dtype():
    for command in _commands_that_load_a_model():
        result = runner.invoke(app, [*command, "--help"], terminal_width=200)
        assert result.exit_code == 0, (command, result.output)
        for option in ("--device", "--dtype", "--device-map"):
            assert option in result.output, (command, option)


def test_bad_device_and_dtype_are_clear_errors():
    result = runner.invoke(app, ["inspect", "Diana", "--dtype", "float64"])
    assert result.exit_code == 2 and "unknown dtype 'float64'" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["lens", "Diana", "--device", "gpu7"])
    assert result.exit_code == 2 and "unknown device 'gpu7'" in result.output


def test_lens_in_bfloat16_on_the_cpu(smol):
    result = runner.invoke(app, ["lens", "The Eiffel Tower is in", "--dtype", "bfloat16", "--device", "cpu", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output
