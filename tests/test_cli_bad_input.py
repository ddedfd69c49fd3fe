"""Every bad CLI input gives ``error: …`` (or typer's usage error) naming the bad value or file, exit status 2,
and no traceback. Cases that need no model run in a second; the few that load SmolLM2-135M use ``smol``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from patchscopes.cli import app
from patchscopes.errors import MappingError
from patchscopes.lenses import AffineLens
from patchscopes.mappings import AffineMap
from patchscopes.results import ResultStore

runner = CliRunner()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _squash(text: str) -> str:
    """The text without whitespace or box drawing, so a message wrapped at 80 columns still matches."""
    return re.sub(r"[\s│╭╮╰╯─]", "", text)


def _assert_clear_error(result, *names: str) -> None:  # noqa: ANN001
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception), repr(result.exception)  # SystemExit(2) only
    assert "Traceback" not in result.output
    for name in names:
        assert _squash(name) in _squash(result.output), f"{name!r} not named in:\n{result.output}"


def _save_map(directory: Path) -> Path:
    return AffineMap(torch.zeros(3, 2), torch.zeros(3), {"source_model": "a", "target_model": "b"}).save(directory)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


# --- cases that need no model: each builds its arguments under tmp_path and names what must be in the message
def _dtype(tmp: Path) -> tuple[list[str], list[str]]:
    return ["inspect", "Diana", "--dtype", "float64"], ["float64", "float32", "bfloat16", "float16"]


def _csv_proc(tmp: Path) -> tuple[list[str], list[str]]:
    return ["inspect", "Diana", "--csv", "/proc/x.csv"], ["--csv", "/proc/x.csv", "not writable"]


def _csv_under_file(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "afile").write_text("x")
    target = tmp / "afile" / "sub" / "x.csv"
    return ["inspect", "Diana", "--csv", str(target)], [str(target), "is a file, not a directory"]


def _csv_is_dir(tmp: Path) -> tuple[list[str], list[str]]:
    return ["inspect", "Diana", "--png", str(tmp)], ["--png", "it is a directory"]


def _model_empty_dir(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "empty").mkdir()
    return ["inspect", "Diana", "--model", str(tmp / "empty")], [str(tmp / "empty"), "not a model directory", "config.json"]


def _model_random_file(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "rand").mkdir()
    (tmp / "rand" / "blob.bin").write_bytes(os.urandom(64))
    return ["inspect", "Diana", "--model", str(tmp / "rand")], [str(tmp / "rand"), "not a model directory"]


def _model_garbage_config(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "garb").mkdir()
    (tmp / "garb" / "config.json").write_text("this is not json")
    return ["inspect", "Diana", "--model", str(tmp / "garb")], [str(tmp / "garb"), "could not load"]


def _max_new_tokens(tmp: Path) -> tuple[list[str], list[str]]:
    return ["inspect", "Diana", "--max-new-tokens", "-5"], ["--max-new-tokens"]


def _top_k(tmp: Path) -> tuple[list[str], list[str]]:
    return ["lens", "Diana", "--top-k", "0"], ["--top-k"]


def _maps_garbage(tmp: Path) -> tuple[list[str], list[str]]:
    _save_map(tmp / "maps" / "good-map")
    _save_map(tmp / "maps" / "bad-map")
    (tmp / "maps" / "bad-map" / "map.json").write_text("garbage{")
    bad = tmp / "maps" / "bad-map"
    return ["maps", "list", "--root", str(tmp / "maps")], ["good-map", str(bad / "map.json"), f"delete {bad}"]


def _maps_truncated(tmp: Path) -> tuple[list[str], list[str]]:
    _save_map(tmp / "maps" / "cut")
    _truncate(tmp / "maps" / "cut" / "weights.safetensors")
    return ["maps", "list", "--root", str(tmp / "maps")], [str(tmp / "maps" / "cut" / "weights.safetensors"), "truncated"]


def _eval_out_file(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "run").write_text("not a directory")
    return ["eval", "next-token", "--quick", "--out", str(tmp / "run")], ["--out", str(tmp / "run"), "existing file"]


def _eval_out_proc(tmp: Path) -> tuple[list[str], list[str]]:
    return ["eval", "entities", "--quick", "--out", "/proc/run"], ["--out", "/proc/run", "not writable"]


def _eval_out_readonly(tmp: Path) -> tuple[list[str], list[str]]:
    if IS_ROOT:
        pytest.skip("root writes into read-only directories")
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    return ["eval", "next-token", "--quick", "--out", str(tmp / "ro" / "run")], [str(tmp / "ro"), "not writable"]


def _eval_layers(tmp: Path) -> tuple[list[str], list[str]]:
    return ["eval", "next-token", "--quick", "--layers", "a,b", "--out", str(tmp / "r")], ["--layers", "'a,b'"]


def _report_incomplete(tmp: Path) -> tuple[list[str], list[str]]:
    store = ResultStore(tmp / "run", {"eval": "next-token", "model": "SmolLM2-135M"})
    store.append("rows", 0, [{"layer": 0}])
    run = str(tmp / "run")
    return ["report", run], ["incomplete", "patchscopes eval next-token", f"--out {run}"]


def _report_garbage_config(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "run").mkdir()
    (tmp / "run" / "config.json").write_text("{oops")
    return ["report", str(tmp / "run")], [str(tmp / "run" / "config.json"), f"delete {tmp / 'run'}"]


def _report_output_dir(tmp: Path) -> tuple[list[str], list[str]]:
    return ["report", str(tmp), "--output", "/proc/r.html"], ["--output", "/proc/r.html"]


def _circuits_steps(tmp: Path) -> tuple[list[str], list[str]]:
    return ["circuits", "discover", "--steps", "0", "--out", str(tmp / "c")], ["--steps"]


def _circuits_layers(tmp: Path) -> tuple[list[str], list[str]]:
    return ["circuits", "discover", "--layers", "1,x", "--out", str(tmp / "c")], ["--layers", "'1,x'"]


def _cross_model_step(tmp: Path) -> tuple[list[str], list[str]]:
    return ["eval", "cross-model", "--layer-step", "0", "--out", str(tmp / "x")], ["--layer-step"]


def _lrc_seeds(tmp: Path) -> tuple[list[str], list[str]]:
    return ["eval", "lrc", "--seeds", "4x", "--out", str(tmp / "lrc")], ["--seeds", "'4x'"]


def _dist_shards(tmp: Path) -> tuple[list[str], list[str]]:
    return ["distributed-sweep", "Paris", "--shards", "0", "--out", str(tmp / "d")], ["--shards"]


def _dist_prompts_file(tmp: Path) -> tuple[list[str], list[str]]:
    missing = tmp / "no-such-prompts.txt"
    return ["distributed-sweep", "--prompts-file", str(missing), "--out", str(tmp / "d")], [str(missing)]


def _pack_not_a_run(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "notes").mkdir()
    return ["pack", str(tmp / "notes")], ["not a run directory", "--out"]


CASES: dict[str, Callable[[Path], tuple[list[str], list[str]]]] = {
    "inspect-dtype-float64": _dtype,
    "inspect-csv-proc": _csv_proc,
    "inspect-csv-under-a-file": _csv_under_file,
    "inspect-png-is-a-directory": _csv_is_dir,
    "inspect-model-empty-dir": _model_empty_dir,
    "inspect-model-dir-random-file": _model_random_file,
    "inspect-model-garbage-config": _model_garbage_config,
    "inspect-max-new-tokens-negative": _max_new_tokens,
    "lens-top-k-zero": _top_k,
    "maps-list-garbage-map-json": _maps_garbage,
    "maps-list-truncated-weights": _maps_truncated,
    "eval-out-is-a-file": _eval_out_file,
    "eval-out-in-proc": _eval_out_proc,
    "eval-out-read-only": _eval_out_readonly,
    "eval-layers-not-ints": _eval_layers,
    "report-run-incomplete": _report_incomplete,
    "report-garbage-config": _report_garbage_config,
    "report-output-unwritable": _report_output_dir,
    "circuits-steps-zero": _circuits_steps,
    "circuits-layers-not-ints": _circuits_layers,
    "cross-model-layer-step-zero": _cross_model_step,
    "lrc-seeds-not-ints": _lrc_seeds,
    "distributed-shards-zero": _dist_shards,
    "distributed-prompts-file-missing": _dist_prompts_file,
    "pack-not-a-run-directory": _pack_not_a_run,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_without_a_model(case: str, tmp_path: Path) -> None:
    args, names = CASES[case](tmp_path)
    _assert_clear_error(runner.invoke(app, args), *names)


def test_maps_list_shows_the_readable_maps_beside_the_damaged_one(tmp_path: Path) -> None:
    args, _ = _maps_garbage(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and _squash("(1, 1 damaged)") in _squash(result.output)


@pytest.mark.parametrize(
    "layers, named",
    [("abc", ["'abc'", "cannot read"]), ("0-29:0", ["'0-29:0'", "step 0"]), ("29-0", ["'29-0'", "runs backwards"])],
)
def test_inspect_bad_layers(smol, layers: str, named: list[str]) -> None:  # noqa: ANN001
    _assert_clear_error(runner.invoke(app, ["inspect", "Diana", "--layers", layers]), *named)


def test_truncated_lens_in_a_run_directory(smol, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    lens_dir = out / "affine_lens"
    _save_map(lens_dir / "layer0")
    (lens_dir / "lens.json").write_text(json.dumps({"type": "affine-lens", "model": smol.name, "layers": [0]}))
    _truncate(lens_dir / "layer0" / "weights.safetensors")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f"Sentence number {i} is a plain line of English text about the weather today." for i in range(6))
    )
    args = ["eval", "next-token", "--quick", "--n-eval", "1", "--layers", "0", "--corpus", str(corpus), "--out", str(out)]
    result = runner.invoke(app, [*args, "--no-progress"])
    _assert_clear_error(result, str(lens_dir / "layer0" / "weights.safetensors"), f"delete {lens_dir}")


def test_damaged_lens_and_map_files_raise_mapping_error(tmp_path: Path) -> None:
    AffineLens({0: AffineMap(torch.eye(2), torch.zeros(2))}, "m").save(tmp_path / "lens")
    (tmp_path / "lens" / "layer0" / "map.json").write_text("[1, 2")
    with pytest.raises(MappingError, match=re.escape(str(tmp_path / "lens" / "layer0" / "map.json"))):
        AffineLens.load(tmp_path / "lens")
    (tmp_path / "lens" / "lens.json").write_text('{"layers": 3}')
    with pytest.raises(MappingError, match="lens.json is damaged"):
        AffineLens.load(tmp_path / "lens")


def test_a_real_process_prints_no_traceback(tmp_path: Path) -> None:
    """The installed entry point, not CliRunner: typer's pretty traceback handler must never be reached."""
    args, names = _maps_truncated(tmp_path)
    code = "from patchscopes.cli import main; main()"
    env = {**os.environ, "COLUMNS": "400"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output and names[0] in output
