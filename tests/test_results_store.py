"""The run store under concurrency, kills and damage: one configuration per directory, bad units redone, whole files."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

from patchscopes.files import atomic_path, atomic_write_text
from patchscopes.results import ConfigMismatchError, CorruptRunError, ResultStore, write_csv


def _open_and_write(directory: str, seed: int, start, results) -> None:  # noqa: ANN001
    start.wait()
    try:
        store = ResultStore(directory, {"eval": "demo", "seed": seed})
        store.append("rows", f"unit-{seed}", [{"seed": seed}])
        results.put((seed, "ok"))
    except ConfigMismatchError:
        results.put((seed, "mismatch"))
    except Exception as exc:  # noqa: BLE001 - the test reports any other failure by name
        results.put((seed, f"{type(exc).__name__}: {exc}"))


def test_processes_opening_one_store_at_once_agree_on_its_configuration(tmp_path: Path) -> None:
    """Regression: two processes opening one directory within milliseconds mixed their configurations (rows of a
    configuration config.json does not record) or failed on a shared temporary file."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    seeds = [0, 0, 1, 2, 3, 4]  # two processes share a configuration: both must be admitted if it wins
    procs = [ctx.Process(target=_open_and_write, args=(str(tmp_path), seed, start, results)) for seed in seeds]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=60)
    outcomes = [results.get(timeout=5) for _ in procs]
    assert all(outcome in ("ok", "mismatch") for _, outcome in outcomes), outcomes
    recorded = json.loads((tmp_path / "config.json").read_text())["config"]["seed"]
    admitted = sorted(seed for seed, outcome in outcomes if outcome == "ok")
    assert admitted == [s for s in seeds if s == recorded]  # exactly the processes of the recorded configuration
    rows = ResultStore(tmp_path, {"eval": "demo", "seed": recorded}).frame("rows")
    assert set(rows.seed) == {recorded}
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["config.json", "rows.jsonl"]


@pytest.mark.parametrize("content", ["", "{not json", '["a list"]', '{"environment": {}}'])
def test_a_damaged_config_is_an_error_that_says_how_to_recover(tmp_path: Path, content: str) -> None:
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(CorruptRunError, match=r"config\.json is not a run configuration.*delete .* to start over"):
        ResultStore(tmp_path, {"eval": "demo"})
    with pytest.raises(CorruptRunError, match="config.json"):
        ResultStore.reopen(tmp_path)


def test_reopen_needs_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(CorruptRunError, match="not a run directory"):
        ResultStore.reopen(tmp_path)
    ResultStore(tmp_path, {"eval": "demo", "seed": 4})
    assert ResultStore.reopen(tmp_path).config == {"eval": "demo", "seed": 4}


def test_units_that_do_not_match_the_schema_are_redone_with_one_warning(tmp_path: Path) -> None:
    """Regression: a well-formed line with wrong content was taken as a done unit, and the summary silently
    covered 2 of 4 examples."""
    schemas = {"rows": ("example", "score")}
    store = ResultStore(tmp_path, {"eval": "demo"}, schemas=schemas)
    store.append("rows", 0, [{"example": 0, "score": 1.0}])
    with (tmp_path / "rows.jsonl").open("a") as f:
        f.write(json.dumps({"key": "1", "rows": [{"foo": 1}]}) + "\n")  # right shape, wrong content
        f.write("garbage that is not json\n")  # a whole line of garbage
        f.write(json.dumps({"key": 2, "rows": "x"}) + "\n")  # not a unit
    reopened = ResultStore(tmp_path, {"eval": "demo"}, schemas=schemas)
    with pytest.warns(UserWarning, match=r"rows\.jsonl: 3 unit\(s\) do not match the run's schema.*line 2") as seen:
        assert reopened.done_keys("rows") == {"0"}
    assert len(seen) == 1
    assert not reopened.done("rows", 1)
    reopened.append("rows", 1, [{"example": 1, "score": 0.5}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = reopened.frame("rows")
    assert frame.to_dict("records") == [{"example": 0, "score": 1.0}, {"example": 1, "score": 0.5}]


def test_a_torn_last_line_is_redone_without_a_warning(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, {"eval": "demo"})
    store.append("rows", 0, [{"x": 1}])
    with (tmp_path / "rows.jsonl").open("a") as f:
        f.write('{"key": "1", "rows": [{"x"')  # a kill in the middle of a write
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ResultStore(tmp_path, {"eval": "demo"}).done_keys("rows") == {"0"}


def test_outputs_are_whole_or_absent(tmp_path: Path) -> None:
    """Regression: a kill while outputs were written left a 0-byte summary.csv."""
    path = tmp_path / "summary.csv"
    write_csv(path, pd.DataFrame({"a": [1, 2]}))
    before = path.read_text()

    class Killed(Exception):
        pass

    with pytest.raises(Killed), atomic_path(path) as tmp:
        tmp.write_text("a\n")  # half written, then the writer dies
        raise Killed
    assert path.read_text() == before
    atomic_write_text(tmp_path / "summary.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv", "summary.json"]  # no temporary left


def test_a_packed_store_reads_resumes_and_packs_again(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "run", {"seed": 1})
    rows = {k: [{"k": k, "scores": {"a": k / 3, "b": [1, 2]}, "text": "é\n"}] for k in range(4)}
    for k in (0, 1):
        store.append("t", k, rows[k])
    with (tmp_path / "run" / "t.jsonl").open("a") as f:
        f.write('{"key": "9", "rows": [')  # a torn last line: not packed, its unit redone
    assert [p.name for p in store.pack()] == ["t.jsonl.gz"]
    again = ResultStore(tmp_path / "run", {"seed": 1})
    assert again.done("t", 1) and not again.done("t", 2) and not again.done("t", 9)
    for k in (1, 2, 3):
        again.append("t", k, rows[k])  # 1 is already packed: ignored
    assert (tmp_path / "run" / "t.jsonl").is_file()
    expected = pd.DataFrame([r for k in range(4) for r in rows[k]])
    pd.testing.assert_frame_equal(again.frame("t"), expected)
    again.pack()
    assert not (tmp_path / "run" / "t.jsonl").exists()
    packed = (tmp_path / "run" / "t.jsonl.gz").read_bytes()
    time.sleep(1.1)  # gzip headers record seconds
    again.pack()  # nothing new: the same bytes, so a committed packed run does not change when packed again
    assert (tmp_path / "run" / "t.jsonl.gz").read_bytes() == packed
    final = ResultStore.reopen(tmp_path / "run")
    pd.testing.assert_frame_equal(final.frame("t"), expected)
    assert final.frame("t").scores.tolist() == [r[0]["scores"] for r in rows.values()]
    with pytest.raises(ConfigMismatchError):
        ResultStore(tmp_path / "run", {"seed": 2})


def test_write_csv_round_trips_a_lone_carriage_return(tmp_path: Path) -> None:
    """A token that is just "\r" must stay one field of one row, not split the row in two."""
    frame = pd.DataFrame({"example": [0, 1, 2], "token": ["\r", "a\r\nb", "plain"], "p": [0.5, float("nan"), 1.0]})
    back = pd.read_csv(write_csv(tmp_path / "rows.csv", frame))
    assert back["token"].tolist() == frame["token"].tolist()
    assert back["example"].tolist() == [0, 1, 2] and back["p"].isna().tolist() == [False, True, False]
    plain = pd.DataFrame({"a": [1], "b": ["x"]})
    assert write_csv(tmp_path / "plain.csv", plain).read_text() == "a,b\n1,x\n"  # unchanged format otherwise


def test_outputs_get_the_usual_permissions(tmp_path: Path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        path = write_csv(tmp_path / "shared.csv", pd.DataFrame({"a": [1]}))
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by the group and others, like any file the user writes
