"""One self-contained HTML page for a run directory of ``patchscopes eval …``: plots, tables, configuration,
and the paper's numbers beside ours.

    >>> path = write_report("runs/attributes")       # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from patchscopes.datasets import data_dir
from patchscopes.errors import PatchscopeError
from patchscopes.files import atomic_write_text
from patchscopes.results import read_config

PAPER_FILE = "paper_tables/patchscopes_tables.json"


class ReportError(PatchscopeError, ValueError):
    """A directory that holds no evaluation run, or a paper-numbers file that cannot be read."""


def load_paper_tables(path: str | Path | None = None) -> dict[str, Any] | None:
    """The transcribed paper numbers (``<data>/paper_tables/patchscopes_tables.json`` or a user's JSON); None if absent."""
    if path is None:
        path = data_dir() / PAPER_FILE
        if not path.is_file():
            return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read paper numbers from {path}: {exc}") from exc


def _table(df: pd.DataFrame, digits: int = 3) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.{digits}f}", border=0, classes="t", na_rep="–")


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name)
    return f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'


def paper_next_token(paper: dict[str, Any], ours: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """Precision@1 at the paper's layers 10 and 20, beside ours at the same relative depth."""
    fig = paper["next_token_prediction_fig2"]
    rows = []
    for model, depth in fig["models"].items():
        for key, values in fig["approx_precision_at_1"][model].items():
            layer = int(key.removeprefix("layer"))
            rows.append({"model": f"{model} (paper)", "layer": f"{layer}/{depth}", **{m: values[m] for m in values}})
    for key in ("layer10", "layer20"):
        fraction = int(key.removeprefix("layer")) / 40
        layer = round(fraction * n_layers)
        part = ours[ours.layer == layer].set_index("method")["precision_at_1"] if len(ours) else pd.Series(dtype=float)
        rows.append(
            {
                "model": "ours",
                "layer": f"{layer}/{n_layers}",
                "logit_lens": part.get("logit_lens"),
                "tuned_lens": part.get("affine_lens"),
                "token_identity": part.get("token_identity"),
            }
        )
    return pd.DataFrame(rows)


def _pm(mean: Any, std: Any) -> str:
    """``mean ± std`` with one decimal, or ``–`` when missing."""
    if mean is None or pd.isna(mean):
        return "–"
    return f"{mean:.1f} ± {std:.1f}" if std is not None and not pd.isna(std) else f"{mean:.1f}"


def paper_attributes(paper: dict[str, Any], ours: pd.DataFrame) -> pd.DataFrame:
    """Table 2 (GPT-J, % mean ± std over ℓ) beside our per-task summary."""
    rows = []
    table = paper["table2_feature_extraction_main"]
    known = {task: values for group in table.values() for task, values in group.items()}
    mine = ours.set_index("task") if "task" in ours else pd.DataFrame()
    for task in list(known) + [t for t in mine.index if t not in known]:
        p = known.get(task)
        row: dict[str, Any] = {
            "task": task,
            "paper probe": _pm(*p["probe"]) if p else "",
            "paper patchscope": _pm(*p["patchscope"]) if p else "",
            "paper sig.": (p.get("sig") or "") if p else "",
        }
        if task in mine.index and "patchscope_mean" in mine:
            m = mine.loc[task]
            row["our probe"] = _pm(m.probe_mean, m.probe_std)
            row["our patchscope"] = _pm(m.patchscope_mean, m.patchscope_std)
            row["our p (Bonferroni)"] = m.p_bonferroni
            row["our samples (grid/probe)"] = "–" if pd.isna(m.grid_samples) else f"{m.grid_samples:.0f}/{m.probe_samples:.0f}"
        rows.append(row)
    return pd.DataFrame(rows)


def paper_entities(paper: dict[str, Any], ours: pd.DataFrame) -> pd.DataFrame:
    """Fig. 3 RougeL of popular entities (Vicuna 13B, layers 0–9) beside our popular and rare curves."""
    fig = paper["entity_resolution_fig3_rougeL_popular_vicuna"]
    curve = fig["M13B->M*13B"]
    layers = sorted(set(range(len(curve))) | set(ours.layer if len(ours) else []))
    rows = []
    for layer in layers:
        row: dict[str, Any] = {"layer": layer, "paper popular (Vicuna-13B)": curve[layer] if layer < len(curve) else None}
        for group in ("popular", "rare"):
            hit = ours[(ours.popularity == group) & (ours.layer == layer)] if len(ours) else ours
            row[f"our {group} RougeL"] = float(hit.rougeL.iloc[0]) if len(hit) else None
            row[f"our {group} similarity"] = float(hit.similarity.iloc[0]) if len(hit) else None
        rows.append(row)
    return pd.DataFrame(rows)


def render(directory: str | Path, paper_path: str | Path | None = None) -> str:
    """The HTML page for one run directory."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ReportError(f"{directory} holds no config.json: pass a directory written by `patchscopes eval …`")
    config = read_config(config_path)  # a damaged config.json: CorruptRunError saying how to recover
    record = json.loads(config_path.read_text())
    kind = config.get("eval", "unknown")
    summary_path = directory / "summary.csv"
    if not summary_path.is_file() and not (directory / "summary.json").is_file():
        raise ReportError(
            f"the run in {directory} is incomplete: it has no summary yet (it was stopped before it finished). "
            f"Finish it by running the same `patchscopes eval {kind} …` command again with --out {directory} "
            f"(it resumes where it stopped), then run `patchscopes report {directory}`"
        )
    try:
        summary = pd.read_csv(summary_path) if summary_path.is_file() else pd.DataFrame()
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise ReportError(
            f"{summary_path} is damaged ({exc}); delete it and run the same `patchscopes eval {kind} …` command "
            f"again with --out {directory} to rewrite it"
        ) from None
    paper = load_paper_tables(paper_path)
    parts = [
        f"<h1>patchscopes: {html.escape(kind)} — {html.escape(str(config.get('model')))}</h1>",
        "<h2>Results</h2>",
        _table(summary) if len(summary) else "<p>No summary table for this run (see summary.json).</p>",
    ]
    comparison, note = None, ""
    if paper is not None:
        try:
            if kind == "next-token":
                n_layers = int(summary.layer.max()) + 1 if len(summary) else 0
                comparison = paper_next_token(paper, summary, n_layers)
                note = paper["next_token_prediction_fig2"].get("_note", "")
            elif kind == "attributes":
                comparison = paper_attributes(paper, summary)
                note = paper.get("_source", "")
            elif kind == "entities":
                comparison = paper_entities(paper, summary)
                note = paper["entity_resolution_fig3_rougeL_popular_vicuna"].get("_note", "")
        except KeyError as exc:
            raise ReportError(f"the paper-numbers file lacks the entry {exc} needed for a {kind} report") from exc
    parts.append("<h2>The paper's numbers beside ours</h2>")
    if comparison is not None:
        parts += [_table(comparison, 2), f"<p class='note'>{html.escape(note)}</p>"]
    else:
        parts.append("<p>No paper numbers available (no paper_tables file in the data directory).</p>")
    parts.append("<h2>Figures</h2>")
    parts += [_image(p) for p in sorted(directory.glob("*.png"))]
    parts += [
        "<h2>Configuration</h2>",
        f"<pre>{html.escape(json.dumps(record, indent=2))}</pre>",
    ]
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table.t{border-collapse:collapse;font-size:13px}table.t td,table.t th{padding:2px 8px;border-bottom:1px solid #ddd}"
        "img{max-width:100%}figure{margin:1em 0}.note{color:#666;font-size:12px}pre{background:#f6f6f6;padding:1em;overflow:auto}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(kind)} report</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )


def write_report(directory: str | Path, output: str | Path | None = None, paper_path: str | Path | None = None) -> Path:
    """Write the page (default ``<directory>/report.html``) and return its path."""
    path = Path(output) if output is not None else Path(directory) / "report.html"
    text = render(directory, paper_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path
