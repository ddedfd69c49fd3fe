"""The knowledge-edit view: insert new "X is a kind of Y" facts by fine-tuning only a chosen set of weights
(a circuit, its complement, or a random set of the same size) and measure how readily each set takes them.

Training changes ``w + δ ⊙ selection`` through ``functional_call``: the model's weights are never written,
and weights outside the selection get zero gradient (so Adam never moves them).

>>> from patchscopes.circuits.editing import edit_facts
>>> from patchscopes.circuits.masking import MaskConfig, WeightMask
>>> from patchscopes.circuits.tasks import encode, make_task, new_facts
>>> circuit = WeightMask(lm, MaskConfig(layers=(2, 3))).circuit(0.2)
>>> facts, locality = encode(lm, new_facts(seed=0)[:8]), encode(lm, make_task("hierarchy", n=8).examples)
>>> row = edit_facts(lm, circuit, facts, locality, steps=20)
>>> row["delta_nll_new"] < 0                                   # the new facts became likelier
True
"""

from __future__ import annotations

import time
from typing import Any

import torch

from patchscopes.circuits.circuit import Circuit, CircuitError
from patchscopes.circuits.forward import frozen, last_logits
from patchscopes.circuits.tasks import Encoded


@torch.no_grad()
def _scores(
    lm,  # noqa: ANN001
    data: Encoded,
    overrides: dict[str, torch.Tensor] | None,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, 2] NLL of target and foil first tokens, [n, V] log-probabilities)."""
    nll, logps = [], []
    for start in range(0, len(data), batch_size):
        sub = data.subset(list(range(start, min(start + batch_size, len(data)))))
        lp = torch.log_softmax(last_logits(lm, sub.ids, overrides), dim=-1)
        rows = torch.arange(len(sub))
        nll.append(torch.stack([-lp[rows, torch.tensor(sub.target_ids)], -lp[rows, torch.tensor(sub.foil_ids)]], dim=1))
        logps.append(lp)
    return torch.cat(nll), torch.cat(logps)


def edit_facts(
    lm,  # noqa: ANN001
    selection: Circuit,
    facts: Encoded,
    locality: Encoded,
    steps: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Fine-tune only ``selection``'s weights so each fact's prompt continues with its (new) ``target``.

    ``facts``: target = the new category, foil = the true one (see :func:`tasks.new_facts`).
    ``locality``: unrelated known facts that should not change. Returns one row of metrics:
    NLL of the new and the old target before and after (first token, full vocabulary), ``success`` =
    share of facts with p(new) > p(old) after the edit, ``locality_unchanged`` = share of unrelated
    facts whose two-way choice is the same as before, ``locality_kl`` = mean KL(before ‖ after).
    """
    if steps < 1:
        raise CircuitError(f"an edit needs at least one step, got steps={steps}")
    selection.check_model(lm.model)
    torch.manual_seed(seed)
    params = dict(lm.model.named_parameters())
    names = [n for n, m in selection.masks.items() if bool(m.any())]
    masks = {n: selection.masks[n].to(params[n].dtype) for n in names}
    deltas = {n: torch.zeros_like(params[n], dtype=torch.float32, requires_grad=True) for n in names}

    def overrides() -> dict[str, torch.Tensor]:
        return {n: params[n].detach() + (deltas[n] * masks[n]).to(params[n].dtype) for n in names}

    nll_pre, _ = _scores(lm, facts, None)
    loc_pre, loc_lp_pre = _scores(lm, locality, None)
    opt = torch.optim.Adam(list(deltas.values()), lr=lr) if deltas else None  # an empty selection cannot learn
    targets = torch.tensor(facts.target_ids)
    started = time.perf_counter()
    losses = [float("nan")]
    with frozen(lm.model):
        for _ in range(steps if opt is not None else 0):
            logits = last_logits(lm, facts.ids, overrides())
            loss = torch.nn.functional.cross_entropy(logits, targets)
            opt.zero_grad()  # type: ignore[union-attr]
            loss.backward()
            opt.step()  # type: ignore[union-attr]
            losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    with torch.no_grad():
        final = overrides()
    nll_post, _ = _scores(lm, facts, final)
    loc_post, loc_lp_post = _scores(lm, locality, final)
    changed = sum(float((deltas[n].detach() * masks[n]).abs().sum()) for n in names)
    choice_pre = loc_pre[:, 0] < loc_pre[:, 1]
    choice_post = loc_post[:, 0] < loc_post[:, 1]
    return {
        "n_facts": len(facts),
        "n_trainable": selection.n_kept,
        "steps": steps,
        "lr": lr,
        "nll_new_pre": float(nll_pre[:, 0].mean()),
        "nll_new_post": float(nll_post[:, 0].mean()),
        "nll_old_pre": float(nll_pre[:, 1].mean()),
        "nll_old_post": float(nll_post[:, 1].mean()),
        "delta_nll_new": float((nll_post[:, 0] - nll_pre[:, 0]).mean()),
        "delta_nll_old": float((nll_post[:, 1] - nll_pre[:, 1]).mean()),
        "success_pre": float((nll_pre[:, 0] < nll_pre[:, 1]).float().mean()),
        "success": float((nll_post[:, 0] < nll_post[:, 1]).float().mean()),
        "locality_unchanged": float((choice_pre == choice_post).float().mean()),
        "locality_kl": float((loc_lp_pre.exp() * (loc_lp_pre - loc_lp_post)).sum(-1).mean()),
        "final_loss": losses[-1],
        "total_abs_change": changed,
        "seconds": seconds,
    }


def compare_edits(
    lm,  # noqa: ANN001
    circuit: Circuit,
    facts: Encoded,
    locality: Encoded,
    steps: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The same edit through the circuit, its complement and a random set of the circuit's size."""
    rows = []
    for which, selection in (("circuit", circuit), ("complement", circuit.complement()), ("random", circuit.random_like(seed))):
        row = edit_facts(lm, selection, facts, locality, steps=steps, lr=lr, seed=seed)
        rows.append({"selection": which, "density": circuit.density, **row})
    return rows
