"""NDIF's serialisation, run in this process: nnsight's local simulation, minus one side effect.

nnsight deserialises each request with the process's non-server modules hidden, as on NDIF. It also hides
installed packages it does not expect there (matplotlib, kiwisolver, ...); one imported again while hidden
re-runs its C extension's initialisation, which breaks the copy this process already holds (kiwisolver's types,
then every constrained-layout figure drawn afterwards). Only this package and local modules need hiding to check
that a request ships what it uses, so installed third-party packages stay visible.
"""

from __future__ import annotations

import sys
from functools import cache
from typing import Any


def installed_elsewhere(name: str, module: Any) -> bool:
    """A third-party package installed in site-packages, not this package or a local script."""
    path = str(getattr(module, "__file__", None) or "")
    return name.split(".")[0] != "patchscopes" and ("site-packages" in path or "dist-packages" in path)


def keep_installed_visible(hidden: dict) -> dict:
    """Put the installed third-party packages nnsight hid back into ``sys.modules``; return what stays hidden."""
    keep = {n: m for n, m in hidden["modules"].items() if installed_elsewhere(n, m)}
    for name in keep:
        del hidden["modules"][name]
    sys.modules.update(keep)
    return hidden


@cache
def dry_run_backend() -> Any:
    """nnsight's ``LocalSimulationBackend``, hiding only this package and local modules while deserialising."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    class DryRunBackend(LocalSimulationBackend):
        def _hide_local_modules(self) -> dict:
            # no zero-argument super(): nnsight may ship this class by value
            return keep_installed_visible(LocalSimulationBackend._hide_local_modules(self))

    return DryRunBackend


__all__ = ["dry_run_backend", "installed_elsewhere", "keep_installed_visible"]
