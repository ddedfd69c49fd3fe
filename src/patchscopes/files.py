"""Files that are whole or absent: atomic writes, and one inter-process lock.

Every output is written to a temporary file beside its destination, flushed, then renamed over it, so a kill
leaves either the old file or the new one, never a torn or empty one. Locks are ``filelock``'s, released by
the operating system when their holder dies.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "summary.csv"
    >>> _ = atomic_write_text(out, "a,b\\n1,2\\n")
    >>> out.read_text()
    'a,b\\n1,2\\n'
    >>> sorted(p.name for p in out.parent.iterdir())
    ['summary.csv']
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from filelock import FileLock


def _umask() -> int:
    """The process's umask, read without setting it (``os.umask`` would change it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """A temporary path beside ``path``; it replaces ``path`` when the block ends without an error.

    For writers that want a file name (``DataFrame.to_csv``, ``Figure.savefig``, ``torch.save``).
    ``suffix`` keeps the extension that a writer reads its format from (defaults to ``path``'s)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix if suffix is None else suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes the file private; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[IO[Any]], Any], binary: bool = False) -> Path:
    """Write ``path`` through ``write(file)``, atomically."""
    with atomic_path(path) as tmp, tmp.open("wb" if binary else "w") as f:
        write(f)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path``, atomically."""
    return atomic_write(path, lambda f: f.write(text))


def file_lock(path: str | Path, timeout: float = -1) -> FileLock:
    """An exclusive inter-process lock on ``path`` (a sidecar file; ``timeout`` < 0 waits for ever)."""
    return FileLock(str(path), timeout=timeout)


__all__ = ["atomic_path", "atomic_write", "atomic_write_text", "file_lock"]
