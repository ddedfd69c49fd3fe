"""``patchscopes serve``: start the explorer on 127.0.0.1 with an allow-list of models (see docs/security.md)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from patchscopes.mappings import AffineMap

console = Console()


def _check_registry(names: list[str]) -> list[str]:
    from patchscopes.models.cache import is_loadable
    from patchscopes.models.registry import REGISTRY, find_registry_model

    out = []
    for name in names:
        entry = find_registry_model(name)
        if entry is None:
            raise typer.BadParameter(f"{name!r} is not a registry model; the explorer serves only: {', '.join(REGISTRY)}")
        if not is_loadable(entry):
            raise typer.BadParameter(f"{entry.name} is not installed; run: patchscopes models install {entry.name}")
        out.append(entry.name)
    return out


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=2)


def _load_maps(paths: list[Path]) -> list[AffineMap]:
    from patchscopes.errors import PatchscopeError
    from patchscopes.mappings import AffineMap

    maps = []
    for path in paths:
        try:
            maps.append(AffineMap.load(path))
        except PatchscopeError as exc:
            _fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - a damaged file: name it instead of a traceback
            _fail(
                f"--map {path}: could not read the saved map ({type(exc).__name__}: {exc}); "
                "its map.json or weights.safetensors is damaged: save the map again with AffineMap.save"
            )
    return maps


def serve(
    models: Annotated[
        Optional[list[str]],
        typer.Option("--models", "-m", help="Allow-listed registry models (repeatable; comma-separated works too)."),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to bind; anything but loopback needs --expose (no authentication!).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8000,
    expose: Annotated[
        bool,
        typer.Option(
            "--expose", help="Allow a non-loopback --host: anyone who can reach it can run models here (no auth, no TLS)."
        ),
    ] = False,
    allow_host: Annotated[
        Optional[list[str]],
        typer.Option("--allow-host", help="Another Host header name to answer to besides loopback (repeatable)."),
    ] = None,
    map_dir: Annotated[
        Optional[list[Path]],
        typer.Option("--map", help="A saved AffineMap directory enabling cross-model patching (repeatable)."),
    ] = None,
    queue: Annotated[int, typer.Option(min=1, help="Jobs queued or running at once; beyond it requests get 429.")] = 4,
    workers: Annotated[int, typer.Option(min=1, help="Threads running model work.")] = 1,
    max_prompt_chars: Annotated[int, typer.Option(min=1, help="Longest source prompt accepted.")] = 400,
    max_new_tokens: Annotated[int, typer.Option(min=0, help="Most tokens generated per cell.")] = 40,
    max_cells: Annotated[int, typer.Option(min=1, help="Most source × target layer cells per request.")] = 1024,
    request_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds an inspection may queue and run before it is stopped (504).")
    ] = 120.0,
    body_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a request body may take to arrive (408).")] = 10.0,
    header_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a connection may take to send a request's headers (then closed).")
    ] = 10.0,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body accepted (413).")] = 65536,
    max_connections: Annotated[int, typer.Option(min=1, help="Open connections; beyond it requests get 503.")] = 100,
    keep_alive_timeout: Annotated[int, typer.Option(min=1, help="Seconds an idle keep-alive connection stays open.")] = 5,
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

    import matplotlib

    matplotlib.use("Agg")  # the explorer's own process draws exports from worker threads: no GUI backend there
    from patchscopes.errors import PatchscopeError
    from patchscopes.server.app import create_app
    from patchscopes.server.limits import Limits, uvicorn_options

    hosts = [h.strip() for h in allow_host or [] if h.strip()]
    if not _is_loopback(host):
        if not expose:
            _fail(
                f"--host {host} is not a loopback address: anyone who can reach it could run models on this machine "
                "(the explorer has no authentication). Keep --host 127.0.0.1, or add --expose if you mean it"
            )
        if host not in ("0.0.0.0", "::", ""):
            hosts.append(host)
    names = _check_registry([n.strip() for item in (models or ["SmolLM2-135M"]) for n in item.split(",") if n.strip()])
    maps = _load_maps(map_dir or [])
    limits = Limits(
        queue_capacity=max(queue, workers),
        workers=workers,
        max_prompt_chars=max_prompt_chars,
        max_new_tokens=max_new_tokens,
        max_cells=max_cells,
        request_timeout=request_timeout,
        body_timeout=body_timeout,
        header_timeout=header_timeout,
        max_body_bytes=max_body_bytes,
        max_connections=max_connections,
        keep_alive_timeout=keep_alive_timeout,
    )
    try:
        app = create_app(names, maps=maps, limits=limits, allowed_hosts=hosts)
        if preload:
            for name in names:
                with console.status(f"loading {name}"):
                    app.state.pool.get(name)
    except PatchscopeError as exc:
        _fail(str(exc))
    if not _is_loopback(host):
        console.print(f"[yellow]warning:[/] binding {host}: anyone who can reach this machine can run models on it")
        if not hosts:
            console.print("[yellow]note:[/] name this machine with --allow-host NAME, or its requests get 400 (bad host)")
    shown = f"[{host}]" if ":" in host else host
    console.print(
        f"Patchscopes explorer: http://{shown}:{port}/  (API docs: http://{shown}:{port}/docs)  models: {', '.join(names)}",
        highlight=False,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", **uvicorn_options(limits))


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add ``serve`` to the ``patchscopes`` command."""
    app.command("serve")(serve)
