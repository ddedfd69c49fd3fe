"""``patchscopes serve``: start the explorer on 127.0.0.1 with an allow-list of models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console()


def _check_registry(names: list[str]) -> list[str]:
    from patchscopes.models.registry import REGISTRY, find_registry_model

    out = []
    for name in names:
        entry = find_registry_model(name)
        if entry is None:
            raise typer.BadParameter(f"{name!r} is not a registry model; the explorer serves only: {', '.join(REGISTRY)}")
        if not entry.is_installed():
            raise typer.BadParameter(f"{entry.name} is not installed; run: patchscopes models install {entry.name}")
        out.append(entry.name)
    return out


def serve(
    models: Annotated[
        Optional[list[str]],
        typer.Option("--models", "-m", help="Allow-listed registry models (repeatable; comma-separated works too)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless you mean to share it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    map_dir: Annotated[
        Optional[list[Path]],
        typer.Option("--map", help="A saved AffineMap directory enabling cross-model patching (repeatable)."),
    ] = None,
    queue: Annotated[int, typer.Option(help="Jobs queued or running at once; beyond it requests get 429.")] = 4,
    workers: Annotated[int, typer.Option(help="Threads running model work.")] = 1,
    max_prompt_chars: Annotated[int, typer.Option(help="Longest source prompt accepted.")] = 400,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per cell.")] = 40,
    max_cells: Annotated[int, typer.Option(help="Most source × target layer cells per request.")] = 1024,
    preload: Annotated[bool, typer.Option(help="Load the models before accepting requests.")] = True,
) -> None:
    """Start the Patchscopes explorer (a web page and a JSON API, OpenAPI at /docs)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        message = f"error: the explorer needs the server extra ({exc.name} is missing): pip install 'patchscopes[server]'"
        Console().print(message, markup=False, style="bold red")
        raise typer.Exit(code=2) from None

    from patchscopes.errors import PatchscopeError
    from patchscopes.mappings import AffineMap
    from patchscopes.server.app import create_app
    from patchscopes.server.limits import Limits

    names = _check_registry([n.strip() for item in (models or ["SmolLM2-135M"]) for n in item.split(",") if n.strip()])
    try:
        maps = [AffineMap.load(path) for path in map_dir or []]
        limits = Limits(
            queue_capacity=max(queue, workers),
            workers=workers,
            max_prompt_chars=max_prompt_chars,
            max_new_tokens=max_new_tokens,
            max_cells=max_cells,
        )
        app = create_app(names, maps=maps, limits=limits)
        if preload:
            for name in names:
                with console.status(f"loading {name}"):
                    app.state.pool.get(name)
    except PatchscopeError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=2) from exc
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] binding {host}: anyone who can reach this machine can run models on it")
    console.print(
        f"Patchscopes explorer: http://{host}:{port}/  (API docs: http://{host}:{port}/docs)  models: {', '.join(names)}"
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add ``serve`` to the ``patchscopes`` command."""
    app.command("serve")(serve)
