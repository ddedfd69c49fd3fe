"""The options every CLI command that loads a model shares: ``--device``, ``--dtype`` and ``--device-map``;
and the checks of output paths (``--csv``, ``--png``, ``--out``) made before any work starts.

One place, so the commands agree on names, defaults and help; the device values go straight to
:func:`patchscopes.models.loading.load_model`, which validates them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from patchscopes.errors import OptionError

Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, mps, or auto (the first GPU when there is one).")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (float32 on CPU, bfloat16 on a GPU), float32, bfloat16 or float16.")]
DeviceMap = Annotated[
    Optional[str],
    typer.Option("--device-map", help="Passed to from_pretrained (e.g. auto) to spread a large model over devices."),
]

DEFAULT_DEVICE = "auto"
DEFAULT_DTYPE = "auto"


def _chat_callback(ctx: typer.Context, value: str) -> str:
    from patchscopes.chat import parse_chat

    try:
        parse_chat(value)
    except OptionError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


Chat = Annotated[
    str,
    typer.Option(
        "--chat",
        help="Wrap the target prompt as a user turn with the model's chat template: false (as written), true, "
        "or auto (when the tokenizer ships a template).",
        callback=_chat_callback,
    ),
]
DEFAULT_CHAT = "false"


def load(model: str, device: str = DEFAULT_DEVICE, dtype: str = DEFAULT_DTYPE, device_map: str | None = None):  # noqa: ANN201
    """``load_model`` with the CLI's device options."""
    from patchscopes.models.loading import load_model

    return load_model(model, dtype=dtype, device=device, device_map=device_map or None)


def _nearest_existing(path: Path) -> Path:
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _probe_writable(directory: Path, target: Path, what: str) -> None:
    """Create and remove a temporary file in ``directory`` (the nearest existing folder of ``target``)."""
    if not directory.is_dir():
        raise OptionError(f"cannot write {what} {target}: {directory} is a file, not a directory; choose another path")
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".patchscopes-write-check-")
    except OSError as exc:
        raise OptionError(
            f"cannot write {what} {target}: {directory} is not writable ({exc.strerror or exc}); "
            "choose a path in a writable directory"
        ) from None
    os.close(fd)
    os.unlink(name)


def check_output_file(path: str | Path, what: str = "file") -> Path:
    """Refuse, before any work, an output file that could not be written: a directory, a read-only file, or a
    path whose nearest existing folder is not writable (missing folders are created when the file is written)."""
    path = Path(path)
    if path.is_dir():
        raise OptionError(f"cannot write {what} {path}: it is a directory; give a file name such as {path / 'out.csv'}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OptionError(f"cannot write {what} {path}: the file is read-only; choose another path or make it writable")
        return path
    _probe_writable(_nearest_existing(path.parent), path, what)
    return path


def check_run_dir(path: str | Path) -> Path:
    """Refuse, before any work, a run directory (``--out``) that is an existing file or cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(f"run directory {path} is an existing file, not a directory; give another --out, or delete {path}")
    _probe_writable(_nearest_existing(path), path, "run directory")
    return path


def _callback(check: Any) -> Any:
    def callback(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
        if value is None or ctx.resilient_parsing:
            return value
        try:
            return check(value)
        except OptionError as exc:
            raise typer.BadParameter(str(exc)) from None

    return callback


def OutFile(help: str) -> Any:  # noqa: N802, A002
    """A ``typer.Option`` for an output file, checked writable when the command line is read."""
    return typer.Option(help=help, callback=_callback(check_output_file))


def OutDir(help: str) -> Any:  # noqa: N802, A002
    """A ``typer.Option`` for a run directory, checked writable (and not a file) when the command line is read."""
    return typer.Option(help=help, callback=_callback(check_run_dir))


def int_list(text: str, option: str) -> tuple[int, ...]:
    """``"0,6,12"`` → ``(0, 6, 12)``, or :class:`typer.BadParameter` naming ``option`` and the bad text."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated integers such as 0,6,12, not {text!r}") from None


def float_list(text: str, option: str) -> tuple[float, ...]:
    """``"0.5,0.1"`` → ``(0.5, 0.1)``, or :class:`typer.BadParameter` naming ``option`` and the bad text."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated numbers such as 0.5,0.1, not {text!r}") from None
