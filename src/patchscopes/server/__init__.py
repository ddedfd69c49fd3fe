"""The Patchscopes explorer: a local web page and JSON API (``patchscopes serve``).

>>> from patchscopes.server import create_app, Limits
>>> app = create_app(["SmolLM2-135M"], limits=Limits(queue_capacity=8))   # doctest: +SKIP
"""

from patchscopes.server.app import create_app
from patchscopes.server.limits import Limits

__all__ = ["Limits", "create_app"]
