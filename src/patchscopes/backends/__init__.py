"""Execution backends behind the Patchscope and sweep API.

- :mod:`patchscopes.backends.nnsight_backend`: Patchscopes compiled into nnsight traces, run locally or on NDIF;
- :mod:`patchscopes.backends.remote`: NDIF's API key, hosted-model check, and offline request building;
- :mod:`patchscopes.backends.devices`: models spread over several devices (or offloaded) with accelerate;
- :mod:`patchscopes.backends.ray_sweep`: a sweep split into shards that run as Ray tasks into one results store.

Each submodule imports its heavy dependency (nnsight, accelerate, ray) only when used.
"""

from __future__ import annotations

from patchscopes.backends.errors import BackendError, DeviceMapError, MissingAPIKeyError, ModelNotHostedError, ShardFailedError

__all__ = ["BackendError", "DeviceMapError", "MissingAPIKeyError", "ModelNotHostedError", "ShardFailedError"]
