"""Models spread over several devices, or offloaded to CPU memory and disk, with accelerate.

A model too large for one device is loaded with a ``device_map`` (``"auto"``, or a dict from module
names to ``"cuda:0"``, ``"cpu"`` or ``"disk"``). Accelerate's hooks move activations between blocks,
so the native engine needs nothing else: a block's hook sees the hidden state on the device that block
runs on, and :func:`patchscopes.patching.run_patched` moves each patch vector to that device before
writing it. This module loads or dispatches such models, reports what runs where, and places a mapping
and its output next to the weights that use them.

    >>> from patchscopes.backends.devices import load_sharded, placement
    >>> lm = load_sharded("SmolLM2-135M", device_map="auto", max_memory={"cpu": "200MiB"},
    ...                   offload_folder="offload")                            # doctest: +SKIP
    >>> placement(lm)["blocks"][:3]                                            # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patchscopes.backends.errors import DeviceMapError
from patchscopes.layers import EMBEDDINGS, Location
from patchscopes.mappings import apply_mapping, mapping_device  # noqa: F401  (re-exported)
from patchscopes.models.loading import ModelHandle, from_model, load_model

DeviceMap = Mapping[str, int | str | torch.device]
_TARGETS = ("cpu", "disk", "meta")


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's hook device for dispatched/offloaded modules, else its weights' device."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _storage(module: nn.Module) -> str:
    """Where ``module``'s weights rest between calls: a device, or ``"offloaded"`` (weights on meta, streamed in)."""
    devices = {p.device.type if p.device.type != "meta" else "offloaded" for p in module.parameters(recurse=True)}
    if not devices:
        return "none"
    return "+".join(sorted(devices))


def layer_device(lm: ModelHandle, layer: Location) -> torch.device:
    """The device a resolved layer's hidden state lives on (block ``layer``; block 0's input for embeddings)."""
    return execution_device(lm.adapter.blocks[0 if layer == EMBEDDINGS else int(layer)])


def input_device(lm: ModelHandle) -> torch.device:
    """The device token ids must be on: where the embedding runs (not the first parameter, which may be offloaded)."""
    return execution_device(lm.adapter.embed)


@dataclass(repr=False)
class ShardedHandle(ModelHandle):
    """A :class:`ModelHandle` whose ``device`` is where the embedding runs, not where its first weight rests.

    With the embedding offloaded, the first parameter sits on the meta device; inputs still belong on the
    embedding's execution device, which accelerate's hook knows.
    """

    @property
    def device(self) -> torch.device:
        return input_device(self)


def _sharded(handle: ModelHandle) -> ShardedHandle:
    fields = {f.name: getattr(handle, f.name) for f in dataclasses.fields(handle)}
    return ShardedHandle(**fields)


def placement(lm: ModelHandle) -> dict[str, Any]:
    """What runs where: per block its execution device and where its weights rest, plus embed/unembed.

    ``storage`` is ``"offloaded"`` for a block whose weights sit on disk or in CPU memory and are loaded by
    accelerate for each call.
    """
    blocks = [{"layer": i, "device": str(execution_device(b)), "storage": _storage(b)} for i, b in enumerate(lm.adapter.blocks)]
    return {
        "model": lm.name,
        "embed": str(execution_device(lm.adapter.embed)),
        "unembed": str(execution_device(lm.adapter.unembed)),
        "blocks": blocks,
        "device_map": dict(getattr(lm.model, "hf_device_map", {}) or {}),
    }


def check_device_map(device_map: DeviceMap | str) -> None:
    """Refuse a device map that names an unknown strategy or device, or a GPU this machine does not have."""
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise DeviceMapError(f"device_map {device_map!r} is not 'auto', 'balanced', 'balanced_low_0', 'sequential' or a dict")
        return
    cuda = torch.cuda.device_count()
    for name, device in device_map.items():
        text = str(device)
        if isinstance(device, int) or text.startswith("cuda"):
            index = device if isinstance(device, int) else int(text.split(":")[1]) if ":" in text else 0
            if index >= cuda:
                raise DeviceMapError(
                    f"device_map puts {name!r} on cuda:{index} but this machine has {cuda} GPU(s); use 'cpu' or 'disk' instead"
                )
        elif text not in _TARGETS:
            raise DeviceMapError(f"device_map puts {name!r} on {text!r}; valid: a GPU index, 'cuda:N', 'cpu' or 'disk'")


def split_map(lm: ModelHandle, devices: Mapping[int, str], default: str = "cpu") -> dict[str, str]:
    """A device map placing blocks by index (``{15: "disk"}``: block 15 on disk), every other module on ``default``.

    >>> split_map(lm, {i: "disk" for i in range(15, 30)})    # doctest: +SKIP
    """
    prefix = lm.adapter.spec.blocks.split("|")[0]
    for i in devices:
        if not 0 <= i < lm.n_layers:
            raise DeviceMapError(f"block {i} is out of range for {lm.name} with {lm.n_layers} blocks")
    device_map = {f"{prefix}.{i}": str(devices.get(i, default)) for i in range(lm.n_layers)}
    for name, module in lm.model.named_modules():
        if name and not (name == prefix or name.startswith(prefix + ".")):
            if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
                device_map[name] = default
    check_device_map(device_map)
    return device_map


def dispatch(
    lm: ModelHandle, device_map: DeviceMap, offload_folder: str | Path | None = None, copy_model: bool = True
) -> ModelHandle:
    """Spread an already-loaded model over devices (and disk) with ``accelerate.dispatch_model``.

    A module mapped to ``"disk"`` has its weights written to ``offload_folder`` and streamed in for each call.
    The original handle is left untouched unless ``copy_model=False``.

    >>> off = dispatch(lm, split_map(lm, {2: "disk", 3: "disk"}), offload_folder="offload")   # doctest: +SKIP
    """
    from accelerate import dispatch_model

    check_device_map(device_map)
    if any(str(d) == "disk" for d in device_map.values()) and offload_folder is None:
        raise DeviceMapError("the device map offloads to 'disk' but no offload_folder was given; pass offload_folder=a directory")
    model = copy.deepcopy(lm.model) if copy_model else lm.model
    main = next((str(d) for d in device_map.values() if str(d) not in ("disk", "cpu")), "cpu")
    folder = str(offload_folder) if offload_folder is not None else None
    dispatched = dispatch_model(model, device_map=dict(device_map), main_device=main, offload_dir=folder)
    handle = from_model(dispatched, lm.tokenizer, name=lm.name, adapter=lm.adapter.spec, source=lm.source)
    handle.weights_sha256 = lm.weights_sha256
    return _sharded(handle)


def load_sharded(
    name_or_path: str,
    device_map: DeviceMap | str = "auto",
    max_memory: Mapping[int | str, str] | None = None,
    offload_folder: str | Path | None = None,
    dtype: str = "float32",
) -> ModelHandle:
    """Load a model with accelerate's ``device_map`` (GPUs, CPU and disk offload) as a :class:`ModelHandle`.

    >>> lm = load_sharded("SmolLM2-135M", device_map={"": "cpu"})   # doctest: +SKIP
    """
    check_device_map(device_map)
    kwargs: dict[str, Any] = {"device_map": device_map if isinstance(device_map, str) else dict(device_map)}
    if max_memory is not None:
        kwargs["max_memory"] = dict(max_memory)
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    return _sharded(load_model(name_or_path, dtype=dtype, **kwargs))


__all__ = [
    "apply_mapping",
    "check_device_map",
    "dispatch",
    "execution_device",
    "input_device",
    "layer_device",
    "load_sharded",
    "mapping_device",
    "placement",
    "ShardedHandle",
    "split_map",
]
