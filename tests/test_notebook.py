"""The quickstart notebook runs top to bottom in a real Jupyter kernel on the default model, and shows what
it promises inline: the result card, a widget progress bar, the static and the interactive heatmap."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / "quickstart.ipynb"


def _mimetypes(cell: dict) -> set[str]:
    return {mime for out in cell.get("outputs", []) for mime in out.get("data", {})}


@pytest.mark.real
def test_quickstart_runs_and_renders_inline(smol, tmp_path) -> None:  # noqa: ANN001
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors

    def cell_with(text: str) -> dict:
        return next(cell for cell in code if text in cell.source)

    card = cell_with("ps.run(scope, lm)")
    html = "".join(out["data"].get("text/html", "") for out in card.outputs if "data" in out)
    assert "patchscope-result" in html and "decoded:" in html
    assert "application/vnd.jupyter.widget-view+json" in _mimetypes(cell_with("ps.sweep(")), "no notebook progress widget"
    assert "image/png" in _mimetypes(cell_with("heatmap(df")), "the static heatmap was not shown inline"
    assert "application/vnd.plotly.v1+json" in _mimetypes(cell_with("interactive_heatmap(df")), "no plotly figure"
    saved = "".join(out.get("text", "") for out in cell_with("save_pretrained").outputs)
    assert "SmolLM2-135M" in saved  # the model card names the source model
