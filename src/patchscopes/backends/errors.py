"""Errors of the execution backends (nnsight, NDIF, multi-device, Ray)."""

from __future__ import annotations

from patchscopes.errors import PatchscopeError


class BackendError(PatchscopeError, RuntimeError):
    """A backend cannot run this request (missing package, unsupported option, bad wrapper)."""


class MissingAPIKeyError(BackendError):
    """Remote execution on NDIF was asked for but no API key is set."""


class ModelNotHostedError(BackendError):
    """The model named for a remote run is not among the models NDIF hosts."""


class DeviceMapError(BackendError):
    """A ``device_map`` that does not place every block of the model, or names an unknown device."""


class ShardFailedError(BackendError):
    """A distributed-sweep shard still failed after all its retries."""
