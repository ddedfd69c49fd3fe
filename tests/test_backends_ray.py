"""Distributed sweeps with Ray: a local two-worker cluster, one worker killed mid-way, same table as one process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from patchscopes.backends.errors import BackendError
from patchscopes.backends.ray_sweep import distributed_sweep, shard_indices
from patchscopes.models.loading import load_model
from patchscopes.presets import TOKEN_IDENTITY
from patchscopes.results import ConfigMismatchError
from patchscopes.sweep import sweep
from tiny import tiny_model

PROMPTS = [
    "The capital of France is Paris",
    "Diana, Princess of Wales",
    "cat -> cat",
    "The official currency of Japan",
    "Apples are red or green",
    "Leonardo DiCaprio: American actor",
]


def test_shard_indices_cover_every_item_once() -> None:
    for n, k in [(0, 3), (1, 4), (5, 2), (6, 4), (7, 7), (3, 10)]:
        shards = shard_indices(n, k)
        assert sorted(i for s in shards for i in s) == list(range(n))
        assert all(shards) and len(shards) <= k
    with pytest.raises(BackendError, match="n_shards"):
        shard_indices(3, 0)


@pytest.fixture(scope="module")
def ray_cluster():  # noqa: ANN201
    ray = pytest.importorskip("ray")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"a local Ray cluster cannot start in this sandbox: {exc}")
    yield ray
    ray.shutdown()


def _checkpoint(tmp_path: Path) -> str:
    """The tiny Llama saved as a checkpoint directory, loadable by name in every Ray worker."""
    lm = tiny_model("llama")
    path = tmp_path / "tiny-llama"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def _normalised(df: pd.DataFrame) -> pd.DataFrame:
    """A frame as the results store gives it back (one JSON round trip)."""
    return pd.DataFrame(json.loads(json.dumps(df.to_dict(orient="records"))))


def assert_same_table(got: pd.DataFrame, reference: pd.DataFrame) -> None:
    """Equal rows; probabilities to float tolerance (a different batch composition changes the last digits)."""
    floats = ["top_probs", "top1_prob"]
    exact = [c for c in reference.columns if c not in floats]
    pd.testing.assert_frame_equal(got[exact].reset_index(drop=True), reference[exact].reset_index(drop=True))
    for column in floats:
        a = np.array(got[column].tolist(), dtype=float)
        b = np.array(reference[column].tolist(), dtype=float)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def _kill_first_attempt(marker_dir: str, shard: int, after: int):  # noqa: ANN202
    def after_unit(s: int, example: int) -> None:
        marker = Path(marker_dir) / f"killed-{s}"
        if s == shard and example == after and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # the worker process dies without cleanup, mid-shard

    return after_unit


def test_killed_worker_is_retried_and_table_equals_single_process(ray_cluster, tmp_path: Path) -> None:  # noqa: ANN001
    checkpoint = _checkpoint(tmp_path)
    kwargs = dict(source_layers=[0, 2, 3], target_layers=[1, 3])
    out = tmp_path / "run"
    # shard 0 holds examples 0-2: its worker dies after storing example 0, the retry must skip it
    df = distributed_sweep(
        checkpoint,
        PROMPTS,
        TOKEN_IDENTITY,
        out,
        n_shards=2,
        max_retries=2,
        after_unit=_kill_first_attempt(str(tmp_path), shard=0, after=0),
        **kwargs,
    )
    assert (tmp_path / "killed-0").exists(), "the worker was never killed: the test did not test a failure"
    reference = _normalised(sweep(load_model(checkpoint), PROMPTS, TOKEN_IDENTITY, progress=False, **kwargs))
    assert len(df) == len(PROMPTS) * 3 * 2
    assert_same_table(df, reference)
    lines = (out / "rows.jsonl").read_text().splitlines()
    keys = [json.loads(line)["key"] for line in lines if line.strip()]
    assert len(keys) == len(set(keys)) == len(PROMPTS), "a unit was written twice"
    # a second call on the same directory has nothing left to do and returns the same table
    again = distributed_sweep(checkpoint, PROMPTS, TOKEN_IDENTITY, out, n_shards=2, **kwargs)
    pd.testing.assert_frame_equal(again, df)
    assert (out / "rows.jsonl").read_text().splitlines() == lines
    with pytest.raises(ConfigMismatchError):
        distributed_sweep(checkpoint, PROMPTS, TOKEN_IDENTITY, out, source_layers=[1], n_shards=2)


def test_run_configuration_records_prompts_and_options() -> None:
    from patchscopes.backends.ray_sweep import sweep_config

    base = sweep_config("m", ["a", "b"], [-1, -1], {"preset": "token-identity", "source_layers": [1]})
    assert base["n_prompts"] == 2 and base["source_layers"] == [1]
    assert sweep_config("m", ["a", "c"], [-1, -1], {"preset": "token-identity", "source_layers": [1]}) != base
    options = {"preset": "token-identity", "source_layers": [1], "engine": "plain"}
    assert sweep_config("m", ["a", "b"], [-1, -1], options)["engine"] == "plain"
