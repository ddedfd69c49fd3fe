"""CLI commands of the backends: ``patchscopes distributed-sweep`` and ``patchscopes ndif-check``.

$ patchscopes distributed-sweep "Diana, Princess of Wales" "The capital of France" --layers 0-29:3 --shards 2 --out runs/dist
$ NDIF_API_KEY=... patchscopes ndif-check meta-llama/Llama-3.1-70B
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from patchscopes.cli_options import OutDir, OutFile
from patchscopes.errors import PatchscopeError
from patchscopes.results import write_csv

console = Console()


def _layers(text: str) -> list[int] | None:
    """``all`` → every block (resolved by each worker); else non-negative ``0-10``, ``0-29:3``, ``1,5,9``."""
    from patchscopes.validate import parse_layers

    if text.strip() == "all":
        return None
    if any(part.strip().startswith("-") for part in text.split(",")):
        raise typer.BadParameter("give non-negative layers here (the model is not loaded to resolve negative ones)")
    try:
        return parse_layers(text, 1 << 20)
    except PatchscopeError as exc:
        raise typer.BadParameter(str(exc)) from None


def distributed_sweep_command(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Source prompts (or use --prompts-file).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="A text file with one source prompt per line.")] = None,
    model: Annotated[str, typer.Option(help="Registry name, checkpoint directory or cached hub id (loaded by every worker).")] = (
        "SmolLM2-135M"
    ),
    preset: Annotated[str, typer.Option(help="logit-lens, token-identity, entity-description, or a target prompt with x.")] = (
        "token-identity"
    ),
    layers: Annotated[str, typer.Option(help="Source layers: all, 0-10, 0-29:3, 1,5,9 …")] = "all",
    shards: Annotated[int, typer.Option(min=1, help="How many Ray tasks the prompts are split into.")] = 4,
    retries: Annotated[int, typer.Option(min=0, help="Retries of a failed shard (a killed worker included).")] = 3,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address ('auto'); default: a local cluster.")] = None,
    out: Annotated[Path, OutDir("Resumable run directory (re-run the same command to resume).")] = Path("runs/distributed-sweep"),
    csv: Annotated[Optional[Path], OutFile("Also write the table to this CSV file.")] = None,
) -> None:
    """Run a sweep as Ray tasks over prompt shards, into one resumable results store."""
    from patchscopes.backends.ray_sweep import distributed_sweep

    texts = list(prompts or [])
    if prompts_file is not None:
        texts += [line for line in prompts_file.read_text().splitlines() if line.strip()]
    if not texts:
        raise typer.BadParameter("give at least one prompt (arguments or --prompts-file)")
    source_layers = _layers(layers)
    df = distributed_sweep(
        model, texts, preset, out, source_layers=source_layers, n_shards=shards, max_retries=retries, address=address
    )
    console.print(f"{len(df)} rows from {len(texts)} prompts in {out}")
    if csv is not None:
        write_csv(csv, df)
        console.print(f"wrote {csv}")


def ndif_check_command(
    model: Annotated[str, typer.Argument(help="A hub repo id, e.g. meta-llama/Llama-3.1-70B.")],
) -> None:
    """Check that remote execution on NDIF can run MODEL: the API key is set and the model is hosted."""
    from patchscopes.backends.remote import api_key, check_hosted, hosted_models

    api_key()
    check_hosted(model, hosted_models())
    console.print(f"{model} is hosted on NDIF and running; the API key is set")


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add the backend commands to the ``patchscopes`` CLI."""
    app.command("distributed-sweep")(distributed_sweep_command)
    app.command("ndif-check")(ndif_check_command)
