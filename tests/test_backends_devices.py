"""Multi-device models with accelerate: blocks offloaded to disk (and the embedding), CPU-only.

What ran where in these tests: every block computes on the CPU; the blocks mapped to "disk" keep their
weights in an offload folder (on the meta device at rest) and accelerate streams them in for each call.
A CPU + GPU split needs a GPU; the same code paths run there, with each hook on its block's device.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from patchscopes.backends.devices import (
    apply_mapping,
    check_device_map,
    dispatch,
    layer_device,
    load_sharded,
    mapping_device,
    placement,
    split_map,
)
from patchscopes.backends.errors import DeviceMapError
from patchscopes.capture import capture
from patchscopes.hooks import at_locations
from patchscopes.positions import Placeholder
from patchscopes.presets import TOKEN_IDENTITY
from patchscopes.runner import run_many as native_run_many
from patchscopes.scope import Generate, NextToken, Patchscope, Source, Target
from tiny import tiny_model

TARGET = "cat -> cat\n1135 -> 1135\nx"


def run_many(scopes, model, target_model=None, batch_size=16):  # noqa: ANN001, ANN201
    """The native engine's plain padded-batch path (the reference this backend mirrors), on any core version."""
    if "executor" in inspect.signature(native_run_many).parameters:
        return native_run_many(scopes, model, target_model, batch_size=batch_size, executor="plain")
    return native_run_many(scopes, model, target_model, batch_size=batch_size)


def _scopes() -> list[Patchscope]:
    out = []
    for decoding in (NextToken(), Generate(max_new_tokens=4)):
        for sl, tl in [(1, 2), ("embeddings", 3), (3, 0), (2, "embeddings")]:
            target = Target(TARGET, tl, Placeholder("x"))
            out.append(Patchscope(Source("The capital of France is", sl), target, decoding=decoding))
    return out


def _same(a, b) -> None:  # noqa: ANN001
    for x, y in zip(a, b):
        torch.testing.assert_close(y.logits, x.logits, rtol=0, atol=1e-6)
        assert y.generated_ids == x.generated_ids


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_disk_offloaded_blocks_equal_single_device(arch: str, tmp_path: Path) -> None:
    lm = tiny_model(arch)
    off = dispatch(lm, split_map(lm, {2: "disk", 3: "disk"}), offload_folder=tmp_path)
    where = placement(off)
    assert [b["storage"] for b in where["blocks"]] == ["cpu", "cpu", "offloaded", "offloaded"]
    assert next(off.adapter.blocks[3].parameters()).device.type == "meta"  # really not resident
    assert next(lm.adapter.blocks[3].parameters()).device.type == "cpu"  # the original is untouched
    # captured states at offloaded layers land on the block's execution device and equal the single-device ones
    ids = [off.tokenize(p).ids for p in ["The capital of France is", "cat -> cat"]]
    seen: dict[int, torch.device] = {}
    with at_locations(off.adapter.blocks, [1, 3], lambda layer, h: seen.setdefault(layer, h.device) and None):
        got = capture(off, ids, [[0, len(i) - 1] for i in ids], [-1, 1, 3])
    assert seen == {1: layer_device(off, 1), 3: layer_device(off, 3)}
    for a, b in zip(capture(lm, ids, [[0, len(i) - 1] for i in ids], [-1, 1, 3]), got):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # patches into offloaded blocks: next token and generation equal the single-device run
    _same(run_many(_scopes(), lm, batch_size=3), run_many(_scopes(), off, batch_size=3))


def test_offloaded_embedding_and_nnsight_backend(tmp_path: Path) -> None:
    """Embedding and unembedding on disk too: inputs still go to where the embedding runs (not to meta)."""
    pytest.importorskip("nnsight")
    from patchscopes.backends.nnsight_backend import run_many_nnsight

    lm = tiny_model("qwen2")
    device_map = split_map(lm, {1: "disk", 3: "disk"})
    device_map.update({"model.embed_tokens": "disk", "lm_head": "disk"})
    off = dispatch(lm, device_map, offload_folder=tmp_path)
    assert next(off.model.parameters()).device.type == "meta"
    assert off.device.type == "cpu"
    native = run_many(_scopes(), lm, batch_size=4)
    _same(native, run_many(_scopes(), off, batch_size=4))
    _same(native, run_many_nnsight(_scopes(), off, batch_size=4))


def test_mapping_runs_where_its_weights_live() -> None:
    from patchscopes.mappings import AffineMap

    amap = AffineMap(2 * torch.eye(4), torch.ones(4)).to(torch.float64)
    assert mapping_device(amap) == torch.device("cpu")
    assert mapping_device(lambda h: h, "cpu") == torch.device("cpu")
    out = apply_mapping(amap, torch.ones(2, 4), "cpu")
    torch.testing.assert_close(out, torch.full((2, 4), 3.0))


def test_bad_device_maps_are_refused(tmp_path: Path) -> None:
    lm = tiny_model("llama")
    with pytest.raises(DeviceMapError, match="'tpu'"):
        check_device_map({"model.layers.0": "tpu"})
    if torch.cuda.device_count() < 8:
        with pytest.raises(DeviceMapError, match="GPU"):
            check_device_map({"model.layers.0": "cuda:7"})
    with pytest.raises(DeviceMapError, match="everywhere"):
        check_device_map("everywhere")
    with pytest.raises(DeviceMapError, match="out of range"):
        split_map(lm, {9: "disk"})
    with pytest.raises(DeviceMapError, match="offload_folder"):
        dispatch(lm, split_map(lm, {1: "disk"}))


def test_smollm2_half_on_disk_equals_single_device(smol, tmp_path: Path) -> None:  # noqa: ANN001
    """SmolLM2-135M loaded by accelerate with blocks 15-29 offloaded to disk."""
    device_map = split_map(smol, {i: "disk" for i in range(15, 30)})
    sharded = load_sharded("SmolLM2-135M", device_map=device_map, offload_folder=tmp_path)
    assert [b["storage"] for b in placement(sharded)["blocks"]] == ["cpu"] * 15 + ["offloaded"] * 15
    # source before the offloaded half, target inside it: next-token logits and a short generation
    scopes = [TOKEN_IDENTITY.scope("Diana, Princess of Wales", layer=3, position=-1, target_layer=20, decoding=Generate(3))]
    _same(run_many(scopes, smol), run_many(scopes, sharded))
