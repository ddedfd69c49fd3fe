"""Weight masks: exactness at all-ones / all-zeros, the density schedule, save/reload, faithfulness."""

from __future__ import annotations

import copy

import pytest
import torch

from patchscopes.circuits.circuit import Circuit, CircuitError
from patchscopes.circuits.forward import last_logits
from patchscopes.circuits.masking import MaskConfig, WeightMask, faithfulness, masked_parameter_names, schedule, train_mask
from patchscopes.circuits.tasks import Encoded, Example
from tiny import tiny_model


def toy_task(lm, n: int = 24, seed: int = 0) -> Encoded:  # noqa: ANN001
    """Random prompts whose 'target' is the full model's own favourite of two random tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(2, 300, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    with torch.no_grad():
        logits = last_logits(lm, ids)
    a, b = torch.randint(2, 300, (n,), generator=g).tolist(), torch.randint(2, 300, (n,), generator=g).tolist()
    targets, foils = [], []
    for i in range(n):
        x, y = a[i], b[i] if b[i] != a[i] else (a[i] + 1)
        better = x if logits[i, x] >= logits[i, y] else y
        targets.append(better)
        foils.append(y if better == x else x)
    examples = [Example(str(i), "t", "f", str(i)) for i in range(n)]
    return Encoded(examples, ids, ids, targets, foils)


def test_mask_covers_every_block_parameter_and_norms():
    lm = tiny_model("llama")
    names = masked_parameter_names(lm, MaskConfig())
    block_params = sum(p.numel() for p in lm.adapter.blocks.parameters())
    params = dict(lm.model.named_parameters())
    assert any("norm" in n for n in names) and "model.norm.weight" in names
    assert sum(params[n].numel() for n in names) == block_params + params["model.norm.weight"].numel()
    only = masked_parameter_names(lm, MaskConfig(layers=(1,), final_norm=False))
    assert all(n.startswith("model.layers.1.") for n in only)
    with pytest.raises(CircuitError, match="outside"):
        masked_parameter_names(lm, MaskConfig(layers=(9,)))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_all_ones_reproduces_model_exactly_and_all_zeros_removes_weights(arch):
    lm = tiny_model(arch)
    ids = [[5, 9, 17, 33], [7, 8]]
    mask = WeightMask(lm, MaskConfig(embeddings=True))
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    with torch.no_grad():
        plain = last_logits(lm, ids)
        ones = last_logits(lm, ids, mask.overrides(lm, mask.constant(1.0)))
        zeros = last_logits(lm, ids, mask.overrides(lm, mask.constant(0.0)))
    assert torch.equal(plain, ones)
    # reference: a copy of the model with the masked parameters set to zero by hand
    ref = copy.deepcopy(lm.model)
    with torch.no_grad():
        ref_params = dict(ref.named_parameters())
        for n in mask.names:
            ref_params[n].zero_()
        from patchscopes.batching import left_pad

        b = left_pad(ids, lm.pad_id)
        expected = ref(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits[:, -1]
    torch.testing.assert_close(zeros, expected.float(), rtol=0, atol=1e-6)
    assert not torch.allclose(zeros, plain)
    for n, p in lm.model.named_parameters():  # the model's own weights are untouched
        assert torch.equal(p, before[n])


def test_schedule_is_monotone_and_ends_at_each_density():
    plan = schedule([0.5, 0.1], 10)
    assert len(plan) == 20
    targets = [t for _, t in plan]
    assert all(a >= b for a, b in zip(targets, targets[1:]))
    assert targets[9] == pytest.approx(0.5) and targets[-1] == pytest.approx(0.1)


def test_training_reaches_target_densities_without_touching_weights(tmp_path):
    lm = tiny_model("llama")
    data = toy_task(lm)
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    result = train_mask(
        lm,
        data,
        MaskConfig(init_logit=3.0),  # near the targets from the start: 60 steps at lr 0.1 then settle within 0.03
        densities=(0.5, 0.2),
        steps_per_stage=60,
        lr=0.1,
        penalty=20.0,
        batch_size=12,
        metadata={"task": "toy"},
    )
    last = result.history[-1]
    assert last["expected_density"] == pytest.approx(0.2, abs=0.03)
    at_half = [h for h in result.history if h["stage"] == 0.5][-1]
    assert at_half["expected_density"] == pytest.approx(0.5, abs=0.03)
    for d, c in result.circuits.items():
        assert c.density == pytest.approx(d, abs=1e-4)
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n])
    # the trained circuit keeps the choices better than a random one of the same size
    trained = faithfulness(lm, result.circuits[0.5], data)
    rand = faithfulness(lm, result.circuits[0.5].random_like(0), data)
    assert trained["agreement"] >= rand["agreement"]
    assert trained["kl"] < rand["kl"]
    # save and reload: the mask and the circuit
    result.mask.save(tmp_path / "mask")
    again = WeightMask.load(lm, tmp_path / "mask")
    c1, c2 = result.mask.circuit(0.2), again.circuit(0.2)
    assert all(torch.equal(c1.masks[n], c2.masks[n]) for n in c1.names)


def test_full_model_is_perfectly_faithful_to_itself():
    lm = tiny_model("llama")
    data = toy_task(lm, n=10)
    out = faithfulness(lm, None, data)
    assert out["agreement"] == 1.0 and out["kl"] == pytest.approx(0.0, abs=1e-7)
    assert out["accuracy"] == 1.0  # targets are the model's own favourites


def test_circuit_save_reload_and_complement(tmp_path):
    g = torch.Generator().manual_seed(0)
    c = Circuit({"a.weight": torch.rand(7, 5, generator=g) > 0.6, "b.bias": torch.rand(3, generator=g) > 0.5}, {"label": "x"})
    c.save(tmp_path / "c")
    d = Circuit.load(tmp_path / "c")
    assert all(torch.equal(c.masks[n], d.masks[n]) for n in c.names) and d.metadata["label"] == "x"
    comp = c.complement()
    assert comp.n_kept == c.n_total - c.n_kept
    r = c.random_like(3)
    assert r.n_kept == c.n_kept and r.n_total == c.n_total
    with pytest.raises(CircuitError, match="circuit.json"):
        Circuit.load(tmp_path)


def test_hard_mask_samples_are_zero_or_one_with_straight_through_gradients():
    lm = tiny_model("llama")
    mask = WeightMask(lm, MaskConfig(layers=(0,), init_logit=0.0, hard=True))
    torch.manual_seed(0)
    values = mask.sample()
    assert all(set(torch.unique(v).tolist()) <= {0.0, 1.0} for v in values)
    kept = sum(float(v.detach().sum()) for v in values) / mask.n_total
    assert 0.4 < kept < 0.6  # logit 0: the noisy logit is above 0 half of the time
    sum(v.sum() for v in values).backward()  # type: ignore[union-attr]
    # the gradient is the soft sample's, d sigmoid(z / T) / d logit: never negative, and 0 only where it saturates
    grads = torch.cat([p.grad.flatten() for p in mask.logits])
    assert bool((grads >= 0).all()) and float((grads > 0).float().mean()) > 0.9
    deterministic = mask.sample(stochastic=False)  # no noise: exactly the logits above 0 (none at logit 0)
    assert all(not bool(v.any()) for v in deterministic)


def test_hard_mask_training_defines_circuits_as_the_positive_logits():
    lm = tiny_model("llama")
    data = toy_task(lm)
    result = train_mask(lm, data, MaskConfig(init_logit=3.0, hard=True), densities=(0.5, 0.2), steps_per_stage=40,
                        lr=0.1, penalty=20.0, batch_size=12)  # fmt: skip
    final = result.circuits[0.2]
    reference = {n: p > 0 for n, p in zip(result.mask.names, result.mask.logits)}
    assert all(torch.equal(final.masks[n], reference[n]) for n in final.names)
    assert final.density == pytest.approx(result.mask.positive_density())
    assert final.density < 0.6  # the penalty moved the hard mask's own density down from 1 (init logit 3)
