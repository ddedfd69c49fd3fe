"""Notebook displays and exports: a result's HTML card, the interactive heatmap's cells and hovers, Parquet
that keeps list columns, and the GGUF reader as an extra of its own."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from patchscopes import ENTITY_DESCRIPTION, TOKEN_IDENTITY, run, sweep
from patchscopes.errors import ModelNotInstalledError, OptionError
from patchscopes.results import write_csv, write_parquet
from tiny import tiny_model


@pytest.fixture(scope="module")
def lm():  # noqa: ANN201
    return tiny_model("llama")


def test_a_result_renders_as_an_html_card(lm) -> None:  # noqa: ANN001
    result = run(ENTITY_DESCRIPTION.scope("Diana, Princess of <Wales>", layer=2), lm)
    html = result._repr_html_()
    assert "patchscope-result" in html and "layer 2 → 2" in html
    assert "&lt;Wales&gt;" in html and "<Wales>" not in html  # text is escaped
    for token in result.top_tokens[:5]:
        assert repr(token).replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#x27;") in html
    assert html.count("<tr>") == 1 + min(5, len(result.top_tokens))  # header + one row per top token


def test_interactive_heatmap_cells_and_hovers_match_the_sweep(lm) -> None:  # noqa: ANN001
    pytest.importorskip("plotly")
    from patchscopes.interactive import interactive_heatmap

    df = sweep(lm, ["The capital of France", "cat -> cat"], TOKEN_IDENTITY, [0, 2, 3], [1, 3], progress=False)
    fig = interactive_heatmap(df)
    trace = fig.data[0]
    assert list(trace.x) == ["0", "2", "3"] and list(trace.y) == ["1", "3"]
    for r, target in enumerate([1, 3]):
        for c, source in enumerate([0, 2, 3]):
            cell = df[(df.source_layer == source) & (df.target_layer == target)]
            assert trace.z[r][c] == pytest.approx(cell.top1_prob.mean(), abs=1e-12)
            first = cell.sort_values("example").iloc[0]
            hover = trace.text[r][c]
            assert f"ℓ = {source}, ℓ* = {target}" in hover and "(n = 2)" in hover
            assert f"{first.top_probs[0]:.3f}" in hover
    assert "<html" in fig.to_html()[:200].lower()
    with pytest.raises(OptionError, match="no column 'answer_prob'"):
        interactive_heatmap(df, value="answer_prob")


def test_parquet_keeps_list_columns_where_csv_flattens_them(lm, tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("pyarrow")
    df = sweep(lm, ["The capital of France"], TOKEN_IDENTITY, [0, 1], progress=False)
    back = pd.read_parquet(write_parquet(tmp_path / "rows.parquet", df))
    assert list(back.top_tokens.iloc[0]) == list(df.top_tokens.iloc[0])
    assert back.top_probs.iloc[1].tolist() == pytest.approx(df.top_probs.iloc[1])
    flat = pd.read_csv(write_csv(tmp_path / "rows.csv", df))
    assert isinstance(flat.top_tokens.iloc[0], str)  # why Parquet is offered


@pytest.mark.real
def test_cli_inspect_writes_parquet(smol, tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("pyarrow")
    from patchscopes.cli import app

    out = tmp_path / "rows.parquet"
    result = CliRunner().invoke(app, ["inspect", "Paris", "--preset", "token-identity", "--layers", "0,5", "--parquet", str(out)])
    assert result.exit_code == 0, result.output
    rows = pd.read_parquet(out)
    assert len(rows) == 2 and len(rows.top_tokens.iloc[0]) > 1


def test_a_first_conversion_without_the_gguf_reader_says_how_to_install_it(monkeypatch) -> None:  # noqa: ANN001
    import importlib.util

    from patchscopes.models import cache
    from patchscopes.models.registry import REGISTRY

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    assert not cache.gguf_available()
    with pytest.raises(ModelNotInstalledError, match=r'pip install "patchscopes\[gguf\]"'):
        cache.build_cache(REGISTRY["SmolLM2-135M"])
