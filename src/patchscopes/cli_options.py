"""The options every CLI command that loads a model shares: ``--device``, ``--dtype`` and ``--device-map``.

One place, so the commands agree on names, defaults and help; the values go straight to
:func:`patchscopes.models.loading.load_model`, which validates them.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, mps, or auto (the first GPU when there is one).")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (float32 on CPU, bfloat16 on a GPU), float32, bfloat16 or float16.")]
DeviceMap = Annotated[
    Optional[str],
    typer.Option("--device-map", help="Passed to from_pretrained (e.g. auto) to spread a large model over devices."),
]

DEFAULT_DEVICE = "auto"
DEFAULT_DTYPE = "auto"


def load(model: str, device: str = DEFAULT_DEVICE, dtype: str = DEFAULT_DTYPE, device_map: str | None = None):  # noqa: ANN201
    """``load_model`` with the CLI's device options."""
    from patchscopes.models.loading import load_model

    return load_model(model, dtype=dtype, device=device, device_map=device_map or None)
