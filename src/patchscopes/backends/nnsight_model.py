"""A loaded model wrapped for nnsight, and the nnsight side of the hook primitive.

:func:`hidden_at` is, inside an nnsight invoke, what :func:`patchscopes.hooks.at_locations` is natively: the
hidden state at a location (a block's output, or the input of block 0 for the embeddings), to read or to
write with :func:`patchscopes.hooks.write`.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from patchscopes.backends.devices import execution_device
from patchscopes.backends.errors import BackendError
from patchscopes.layers import EMBEDDINGS, Location
from patchscopes.models.loading import ModelHandle

Remote = bool | str  # False: in this process; True: NDIF; "local": NDIF's serialisation, run here


@dataclass
class NNsightModel:
    """A model handle (tokenizer, adapter, name) together with its nnsight wrapper.

    ``remote`` says where its traces run: ``False`` here, ``True`` on NDIF, ``"local"`` through the exact
    serialise/deserialise path of a remote request but executed here (a dry run of the request).
    ``backend``, when given, makes the nnsight backend of each trace instead (used to record requests).
    """

    handle: ModelHandle
    envoy: Any
    remote: Remote = False
    backend: Callable[[Any, str], Any] | None = None  # (envoy, "source"|"target"|"session") -> an nnsight Backend

    @property
    def name(self) -> str:
        return self.handle.name


# id(model) -> its nnsight wrapper, while some NNsightModel holds it (the wrapper keeps the model alive, so the
# id cannot be reused meanwhile); weak, so that wrapping never keeps a model in memory
_WRAPPERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def require_nnsight() -> Any:
    """Import nnsight, or fail with how to install it."""
    try:
        import nnsight
    except ImportError as exc:  # pragma: no cover - nnsight is a dependency of this backend
        raise BackendError("the nnsight backend needs the nnsight package: pip install nnsight") from exc
    return nnsight


def wrap(lm: ModelHandle, remote: Remote = False) -> NNsightModel:
    """Wrap a loaded model for the nnsight backend (reused while a wrapper of the same model is alive).

    The tokenizer is copied, since nnsight sets padding options on the one it holds.

    >>> nm = wrap(load_model("SmolLM2-135M"))   # doctest: +SKIP
    """
    require_nnsight()
    from nnsight.modeling.transformers import TransformersModel

    envoy = _WRAPPERS.get(id(lm.model))
    if envoy is None:
        first = next(lm.model.parameters(), None)
        cls = TransformersModel
        if first is not None and first.device.type == "meta" and lm.device.type != "meta":
            cls = _offloaded_class()  # embedding offloaded: nnsight would send the inputs to the meta device
        envoy = cls(lm.model, tokenizer=copy.deepcopy(lm.tokenizer))
        if getattr(envoy.tokenizer, "padding_side", "left") != "left":
            raise BackendError(f"nnsight pads {lm.name} on the {envoy.tokenizer.padding_side}; the backend needs left padding")
        _WRAPPERS[id(lm.model)] = envoy
    return NNsightModel(lm, envoy, remote)


def _offloaded_class() -> type:
    """nnsight's wrapper, sending inputs to where the embedding runs rather than to the first weight's device."""
    from nnsight.modeling.transformers import TransformersModel

    class OffloadedTransformersModel(TransformersModel):
        @property
        def device(self) -> torch.device:
            return execution_device(self._module.get_input_embeddings())

        def _remoteable_class(self) -> type:
            return TransformersModel

    return OffloadedTransformersModel


def as_nnsight(model: ModelHandle | NNsightModel, remote: Remote | None = None) -> NNsightModel:
    """An :class:`NNsightModel` for a handle or an existing wrapper (``remote`` overrides its setting)."""
    if isinstance(model, NNsightModel):
        return model if remote is None else NNsightModel(model.handle, model.envoy, remote, model.backend)
    if isinstance(model, ModelHandle):
        return wrap(model, remote=False if remote is None else remote)
    raise BackendError(f"expected a ModelHandle or NNsightModel, got {type(model).__name__}; load one with load_model(name)")


def blocks_envoy(nm: NNsightModel) -> Any:
    """The envoy of the model's block list, found through the adapter's dotted ``blocks`` path."""
    path = nm.handle.adapter.spec.blocks
    for alternative in path.split("|"):
        node = nm.envoy
        try:
            for part in alternative.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        return node
    raise BackendError(f"the nnsight wrapper of {nm.name} has no module at {path!r}; check the adapter's ArchSpec.blocks")


def hidden_at(blocks: Any, location: Location) -> Any:
    """Inside an nnsight invoke: the hidden state at ``location`` (``[1, padded length, d]``), to read or write."""
    if location == EMBEDDINGS:
        return blocks[0].input
    output = blocks[int(location)].output
    return output[0] if isinstance(output, tuple) else output


def touch(blocks: Any, location: Location) -> None:
    """Inside an nnsight invoke: reach ``location`` (so that a following ``tracer.stop()`` stops after it)."""
    _ = hidden_at(blocks, location)


__all__ = ["NNsightModel", "Remote", "as_nnsight", "blocks_envoy", "hidden_at", "require_nnsight", "touch", "wrap"]
