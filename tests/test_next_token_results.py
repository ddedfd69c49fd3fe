"""The committed next-token runs (Fig. 2): the protocol's sizes hold, and each summary is what its scores give."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from patchscopes.evals.next_token import PAPER_NEXT_TOKEN, summarize

RUNS = Path(__file__).resolve().parents[1] / "docs" / "results" / "next-token"


@pytest.mark.parametrize("run", ["documents/SmolLM2-135M", "SmolLM2-135M"])
def test_committed_summary_is_the_scores_summary(run: str) -> None:
    scores = pd.read_csv(RUNS / run / "scores.csv.gz")
    committed = pd.read_csv(RUNS / run / "summary.csv")
    pd.testing.assert_frame_equal(committed, summarize(scores), check_dtype=False, rtol=1e-9)


def test_document_run_follows_the_paper_protocol() -> None:
    run = RUNS / "documents" / "SmolLM2-135M"
    params = json.loads((run / "config.json").read_text())["config"]["params"]
    summary = json.loads((run / "summary.json").read_text())
    scores = pd.read_csv(run / "scores.csv.gz")
    assert params["corpus"] == ["pypi-descriptions.jsonl"] and params["max_tokens"] == 128
    assert params["train_positions_per_text"] == PAPER_NEXT_TOKEN.train_positions_per_text == 1
    assert summary["n_examples"] == scores.example.nunique() == 2000  # positions from 2,000 whole documents
    assert summary["n_train_texts"] >= 10_000  # the lens: one position of each of at least 10k other texts
    assert len(scores) == 2000 * 30 * 3  # every position, layer and method
