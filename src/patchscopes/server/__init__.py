"""The Patchscopes explorer: a local web page and JSON API (``patchscopes serve``).

Needs the ``server`` extra (``pip install "patchscopes[server]"``); importing this package does not, so the
CLI works without it.

>>> from patchscopes.server import create_app, Limits
>>> app = create_app(["SmolLM2-135M"], limits=Limits(queue_capacity=8))   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__all__ = ["Limits", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from patchscopes.server.app import create_app

        return create_app
    if name == "Limits":
        from patchscopes.server.limits import Limits

        return Limits
    raise AttributeError(f"module 'patchscopes.server' has no attribute {name!r}")
