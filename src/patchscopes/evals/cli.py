"""CLI for the evaluations: ``patchscopes eval next-token | attributes | entities``, ``patchscopes report DIR`` and
``patchscopes pack DIR``.

The commands parse options and print; the computing is in :mod:`patchscopes.evals`.

    $ patchscopes eval next-token --out runs/ntp --quick
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from patchscopes.cli_options import DEFAULT_DEVICE, DEFAULT_DTYPE, Device, DeviceMap, Dtype, OutDir, OutFile, int_list, load

console = Console()
DEFAULT_MODEL = "SmolLM2-135M"

Model = Annotated[str, typer.Option(help="Registry name, local directory or hub id.")]
Out = Annotated[Path, OutDir("Run directory (resumable: the same --out continues an interrupted run).")]
Seed = Annotated[int, typer.Option(help="Seed of every random choice (positions, samples).")]
Quick = Annotated[bool, typer.Option(help="A small profile that runs in a minute or two (for CI and smoke tests).")]
Progress = Annotated[bool, typer.Option(help="Show progress bars.")]


def _layers(text: Optional[str]) -> Optional[tuple[int, ...]]:
    return None if text is None else int_list(text, "--layers")


def _print_frame(df, title: str, limit: int = 40) -> None:  # noqa: ANN001
    table = Table(title=title)
    for column in df.columns:
        table.add_column(str(column))
    for row in df.head(limit).itertuples(index=False):
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)


def next_token(
    model: Model = DEFAULT_MODEL,
    out: Out = Path("runs/next-token"),
    seed: Seed = 0,
    quick: Quick = False,
    paper: Annotated[
        bool, typer.Option(help="The paper's protocol: 2,000 positions, the lens fitted on one position of every other text.")
    ] = False,
    n_eval: Annotated[Optional[int], typer.Option(min=1, help="Evaluated positions (one per text).")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Comma-separated layers (default: all).")] = None,
    corpus: Annotated[
        Optional[list[Path]],
        typer.Option(help="Text files (one text per line), .jsonl files of {'text': document}, or TSVs with prompt_source."),
    ] = None,
    max_tokens: Annotated[
        Optional[int], typer.Option(min=2, help="Keep each text's first N tokens; positions are drawn among them (default 64).")
    ] = None,
    progress: Progress = True,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    device_map: DeviceMap = None,
) -> None:
    """Next-token prediction (paper Fig. 2): Precision@1 and surprisal of logit lens, affine lens, token identity."""
    from patchscopes.evals.next_token import (
        DEFAULT_NEXT_TOKEN,
        PAPER_NEXT_TOKEN,
        QUICK_NEXT_TOKEN,
        run_next_token,
        summary_table,
    )

    if quick and paper:
        raise typer.BadParameter("--quick and --paper are two profiles; pass one of them")
    config = replace(QUICK_NEXT_TOKEN if quick else PAPER_NEXT_TOKEN if paper else DEFAULT_NEXT_TOKEN, seed=seed)
    if n_eval is not None:
        config = replace(config, n_eval=n_eval)
    if layers is not None:
        config = replace(config, layers=_layers(layers))
    if corpus:
        config = replace(config, corpus=tuple(str(p) for p in corpus))
    if max_tokens is not None:
        config = replace(config, max_tokens=max_tokens)
    result = run_next_token(load(model, device, dtype, device_map), out, config, progress=progress)
    _print_frame(summary_table(result.summary), f"next-token prediction, {model}")
    console.print(f"wrote {out}/summary.csv, {out}/next_token.png")


def attributes(
    model: Model = DEFAULT_MODEL,
    out: Out = Path("runs/attributes"),
    seed: Seed = 0,
    quick: Quick = False,
    task: Annotated[
        Optional[list[str]], typer.Option(help="Task name(s) under <data>/patchscopes (default: Table 2's 12).")
    ] = None,
    task_file: Annotated[Optional[list[Path]], typer.Option(help="Your own task TSV file(s) in the same format.")] = None,
    screen: Annotated[Optional[int], typer.Option(min=1, help="Samples screened per task.")] = None,
    grid_samples: Annotated[Optional[int], typer.Option(min=1, help="Answered samples per task in the (ℓ, ℓ*) grid.")] = None,
    layer_step: Annotated[Optional[int], typer.Option(min=1, help="Grid source layers: every n-th block from 0.")] = None,
    target_layer_step: Annotated[Optional[int], typer.Option(min=1, help="Grid target layers: every n-th block from 0.")] = None,
    snippets: Annotated[
        Optional[int], typer.Option(min=1, max=5, help="Source snippets per sample (1-5; the paper uses up to 5).")
    ] = None,
    case_sensitive: Annotated[bool, typer.Option(help="Compare object and generation case-sensitively.")] = False,
    progress: Progress = True,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    device_map: DeviceMap = None,
) -> None:
    """Attribute extraction vs linear probing (paper Table 2), with heatmaps over (ℓ, ℓ*)."""
    from patchscopes.evals.attributes import DEFAULT_ATTRIBUTES, QUICK_ATTRIBUTES, run_attributes

    config = replace(QUICK_ATTRIBUTES if quick else DEFAULT_ATTRIBUTES, seed=seed, case_sensitive=case_sensitive)
    options = {
        "screen": screen,
        "grid_samples": grid_samples,
        "layer_step": layer_step,
        "target_layer_step": target_layer_step,
        "snippets": snippets,
    }
    for name, value in options.items():
        if value is not None:
            config = replace(config, **{name: value})  # type: ignore[arg-type]
    if task:
        config = replace(config, tasks=tuple(task))
    if task_file:
        config = replace(config, task_files=tuple(str(p) for p in task_file))
    result = run_attributes(load(model, device, dtype, device_map), out, config, progress=progress)
    _print_frame(result.summary, f"attribute extraction vs probing, {model} (accuracy %)")
    console.print(f"wrote {out}/summary.csv and heatmaps")


def entities(
    model: Model = DEFAULT_MODEL,
    out: Out = Path("runs/entities"),
    seed: Seed = 0,
    quick: Quick = False,
    per_group: Annotated[Optional[int], typer.Option(min=1, help="Entities drawn from each of popular and rare.")] = None,
    layer_step: Annotated[Optional[int], typer.Option(min=1, help="Layers: every n-th block from 0 (1 = all).")] = None,
    entities_file: Annotated[Optional[Path], typer.Option(help="Your own TSV: entity, popularity, description.")] = None,
    progress: Progress = True,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    device_map: DeviceMap = None,
) -> None:
    """Entity resolution (paper Fig. 3): RougeL and embedding similarity of descriptions, popular vs rare."""
    from patchscopes.evals.entities import DEFAULT_ENTITIES, QUICK_ENTITIES, run_entities

    config = replace(QUICK_ENTITIES if quick else DEFAULT_ENTITIES, seed=seed)
    if per_group is not None:
        config = replace(config, per_group=per_group)
    if layer_step is not None:
        config = replace(config, layer_step=layer_step, layers=None)
    if entities_file is not None:
        config = replace(config, entities_file=str(entities_file))
    result = run_entities(load(model, device, dtype, device_map), out, config, progress=progress)
    _print_frame(result.summary, f"entity resolution, {model}")
    console.print(f"wrote {out}/summary.csv, {out}/entities.png")


def report(
    directory: Annotated[Path, typer.Argument(help="A run directory written by `patchscopes eval …`.")],
    output: Annotated[Optional[Path], OutFile("HTML file (default: DIRECTORY/report.html).")] = None,
    paper: Annotated[Optional[Path], typer.Option(help="A JSON of paper numbers (default: <data>/paper_tables).")] = None,
) -> None:
    """Render one run directory as a self-contained HTML page: plots, tables, configuration, the paper's numbers."""
    from patchscopes.report import write_report

    path = write_report(directory, output, paper)
    console.print(f"wrote {path}")


def pack(
    directory: Annotated[Path, typer.Argument(help="A run directory written by `patchscopes eval …` (no run writing to it).")],
) -> None:
    """Fold a run directory's tables into compressed <table>.jsonl.gz files, to commit or share; the same
    command with the same --out resumes from them."""
    from patchscopes.results import ResultStore

    for path in ResultStore.reopen(directory).pack():
        console.print(f"packed {path} ({path.stat().st_size / 1e6:.1f} MB)")


def claims(
    docs: Annotated[Path, typer.Argument(help="The docs directory holding results/claims.json and the pages.")] = Path("docs"),
    check: Annotated[bool, typer.Option(help="Change nothing; fail if a page's claim table is stale.")] = False,
) -> None:
    """Write the claim table (paper claim, paper number, ours with n and 95% CI, verdict) atop each results page."""
    from patchscopes.evals.claims import write_claim_tables

    problems = write_claim_tables(docs, check=check)
    for problem in problems:
        console.print(f"[red]error:[/red] {problem}")
    if problems:
        raise typer.Exit(1)
    console.print(f"claim tables of {docs} are {'up to date' if check else 'written'}")


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add the evaluation commands under ``eval``, and ``report``, ``pack`` and ``claims`` at the top level."""
    eval_app.command("next-token")(next_token)
    eval_app.command("attributes")(attributes)
    eval_app.command("entities")(entities)
    app.command("report")(report)
    app.command("pack")(pack)
    app.command("claims")(claims)
