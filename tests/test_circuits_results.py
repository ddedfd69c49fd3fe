"""The committed circuits results: the report tables beside the packed seeds are what the report makes of them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from patchscopes.circuits.pipeline import report

PAPER = Path(__file__).resolve().parents[1] / "docs" / "results" / "circuits" / "paper"


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    out = tmp_path_factory.mktemp("paper")
    for item in PAPER.iterdir():  # a copy: the report must not touch the committed files
        (shutil.copytree if item.is_dir() else shutil.copy)(item, out / item.name)
    return report(out)


@pytest.mark.parametrize("name", ["edits", "edit_summary", "edit_contrasts", "faithfulness", "composition"])
def test_committed_report_tables_match_the_packed_seeds(tables: dict[str, pd.DataFrame], name: str) -> None:
    committed = pd.read_csv(PAPER / f"{name}.csv", index_col=0)
    made = tables[name].reset_index(drop=True)
    assert list(committed.columns) == list(made.columns)
    pd.testing.assert_frame_equal(committed, made, check_dtype=False, check_exact=False, rtol=1e-9, atol=1e-12)


def test_every_edit_unit_of_the_profile_is_committed(tables: dict[str, pd.DataFrame]) -> None:
    edits = tables["edits"]
    units = edits.groupby(["seed", "task", "target_density"]).selection.apply(sorted)
    assert len(units) == 3 * 3 * 4  # seeds × tasks × densities
    assert all(selections == ["circuit", "complement", "random"] for selections in units)
