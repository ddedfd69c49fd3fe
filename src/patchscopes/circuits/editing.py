"""The knowledge-edit view: insert new "X is a kind of Y" facts by fine-tuning only a chosen set of weights
(a circuit, its complement, or a random set of the same size) and measure how readily each set takes them.

Training changes ``w + δ ⊙ selection`` through ``functional_call``: the model's weights are never written,
and weights outside the selection get zero gradient (so Adam never moves them). An edit is judged on

- the trained prompts (``facts``): does the new category now beat the true one, and by how much did the
  NLL of each move;
- paraphrases of the same facts (other wordings, never trained on);
- locality: known facts that were not edited (one or more named sets), whose two-way choice should stay
  the same and whose next-token distribution should not move (KL, ΔNLL of their right answer).

A matched update budget (``max_norm``) projects δ back onto the L2 ball of that radius after every step,
so a larger weight set cannot win by moving more: circuit, complement and random set get the same steps,
learning rate and bound, and each row records the final ‖δ‖.

>>> from patchscopes.circuits.editing import edit_facts
>>> from patchscopes.circuits.masking import MaskConfig, WeightMask
>>> from patchscopes.circuits.tasks import encode, make_task, new_facts
>>> circuit = WeightMask(lm, MaskConfig(layers=(2, 3))).circuit(0.2)
>>> facts, locality = encode(lm, new_facts(seed=0)[:8]), encode(lm, make_task("hierarchy", n=8).examples)
>>> row = edit_facts(lm, circuit, facts, locality, steps=20, max_norm=0.5)
>>> row["delta_nll_new"] < 0, round(row["delta_norm"], 3)      # the new facts became likelier, within the budget
(True, 0.5)
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from patchscopes.circuits.circuit import Circuit, CircuitError
from patchscopes.circuits.forward import last_logits
from patchscopes.circuits.tasks import Encoded
from patchscopes.models.gradients import frozen

#: The name given to a single, unnamed locality set.
DEFAULT_LOCALITY = "known"
#: ‖δ‖ within this relative distance of ``max_norm`` counts as "the bound binds".
BINDS_RTOL = 1e-6


@torch.no_grad()
def _scores(
    lm,  # noqa: ANN001
    data: Encoded,
    overrides: dict[str, torch.Tensor] | None,
    batch_size: int = 32,
    keep_logp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([n, 2] NLL of target and foil first tokens, [n, V] log-probabilities or None without ``keep_logp``)."""
    nll, logps = [], []
    for start in range(0, len(data), batch_size):
        sub = data.subset(list(range(start, min(start + batch_size, len(data)))))
        lp = torch.log_softmax(last_logits(lm, sub.ids, overrides), dim=-1)
        rows = torch.arange(len(sub))
        nll.append(torch.stack([-lp[rows, torch.tensor(sub.target_ids)], -lp[rows, torch.tensor(sub.foil_ids)]], dim=1))
        if keep_logp:
            logps.append(lp)
    return torch.cat(nll), (torch.cat(logps) if keep_logp else None)


@dataclass
class Snapshot:
    """Scores of every evaluation set under one set of weights (before or after an edit)."""

    facts: torch.Tensor  # [n, 2] NLL of (new target, true category)
    paraphrases: torch.Tensor | None  # [m, 2], or None without paraphrases
    locality: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name → (NLL [k, 2], logp [k, V])


def _named(locality: Encoded | Mapping[str, Encoded]) -> dict[str, Encoded]:
    sets = {DEFAULT_LOCALITY: locality} if isinstance(locality, Encoded) else dict(locality)
    if not sets:
        raise CircuitError("an edit needs at least one locality set (known facts that are not edited)")
    bad = [name for name, data in sets.items() if not isinstance(data, Encoded) or len(data) == 0]
    if bad:
        raise CircuitError(f"locality set(s) {bad} are empty or not encoded examples; give tasks.encode(...) output")
    return sets


def evaluate(
    lm,  # noqa: ANN001
    facts: Encoded,
    locality: Encoded | Mapping[str, Encoded],
    paraphrases: Encoded | None = None,
    overrides: dict[str, torch.Tensor] | None = None,
) -> Snapshot:
    """Score the trained prompts, the paraphrases and every locality set under ``overrides`` (None: the model)."""
    fact_nll, _ = _scores(lm, facts, overrides, keep_logp=False)
    para_nll = _scores(lm, paraphrases, overrides, keep_logp=False)[0] if paraphrases is not None else None
    loc: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, data in _named(locality).items():
        nll, lp = _scores(lm, data, overrides)
        assert lp is not None
        loc[name] = (nll, lp)
    return Snapshot(fact_nll, para_nll, loc)


def fact_metrics(pre: torch.Tensor, post: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Edit success from ``[n, 2]`` NLLs of (new target, true category) before and after.

    ``success``: share with p(new) > p(true) after; ``delta_nll_new`` / ``delta_nll_old``: mean change of
    each NLL (negative = likelier). ``prefix`` names the set (``""`` for the trained prompts)."""
    if pre.shape != post.shape or pre.ndim != 2 or pre.shape[1] != 2:
        raise CircuitError(f"fact scores must both be [n, 2], got {tuple(pre.shape)} and {tuple(post.shape)}")
    return {
        f"{prefix}nll_new_pre": float(pre[:, 0].mean()),
        f"{prefix}nll_new_post": float(post[:, 0].mean()),
        f"{prefix}nll_old_pre": float(pre[:, 1].mean()),
        f"{prefix}nll_old_post": float(post[:, 1].mean()),
        f"{prefix}delta_nll_new": float((post[:, 0] - pre[:, 0]).mean()),
        f"{prefix}delta_nll_old": float((post[:, 1] - pre[:, 1]).mean()),
        f"{prefix}success_pre": float((pre[:, 0] < pre[:, 1]).float().mean()),
        f"{prefix}success": float((post[:, 0] < post[:, 1]).float().mean()),
    }


def locality_items(
    pre_nll: torch.Tensor, pre_lp: torch.Tensor, post_nll: torch.Tensor, post_lp: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per known fact: ``unchanged`` (1 if the two-way choice target vs foil is the same after the edit),
    ``kl`` = KL(before ‖ after) of the next-token distribution, ``delta_nll`` = change of the target's NLL."""
    choice_pre, choice_post = pre_nll[:, 0] < pre_nll[:, 1], post_nll[:, 0] < post_nll[:, 1]
    return {
        "unchanged": (choice_pre == choice_post).float(),
        "kl": (pre_lp.exp() * (pre_lp - post_lp)).sum(-1),
        "delta_nll": post_nll[:, 0] - pre_nll[:, 0],
    }


def locality_metrics(
    pre_nll: torch.Tensor, pre_lp: torch.Tensor, post_nll: torch.Tensor, post_lp: torch.Tensor, prefix: str = "locality_"
) -> dict[str, float]:
    """Means of :func:`locality_items`: ``{prefix}unchanged``, ``{prefix}kl``, ``{prefix}delta_nll``."""
    items = locality_items(pre_nll, pre_lp, post_nll, post_lp)
    return {f"{prefix}{name}": float(values.mean()) for name, values in items.items()}


LOCALITY_METRICS = ("unchanged", "kl", "delta_nll")


def pool_locality(row: Mapping[str, Any]) -> dict[str, float]:
    """``n_locality`` and ``locality_{unchanged,kl,delta_nll}`` over every example of the named locality sets in
    ``row`` (the means of the ``locality_<name>_...`` columns, weighted by ``n_locality_<name>``); ``{}`` when
    the row has no named set. Rows stored before these columns were pooled held the first set's values.

    >>> pool_locality({"n_locality_a": 3, "locality_a_unchanged": 1.0, "locality_a_kl": 0.0, "locality_a_delta_nll": 0.0,
    ...                "n_locality_b": 1, "locality_b_unchanged": 0.0, "locality_b_kl": 4.0, "locality_b_delta_nll": 2.0})
    {'n_locality': 4, 'locality_unchanged': 0.75, 'locality_kl': 1.0, 'locality_delta_nll': 0.5}
    """
    sizes = {
        key.removeprefix("n_locality_"): int(value)
        for key, value in row.items()
        if key.startswith("n_locality_") and value == value and value is not None  # NaN: a set this row lacks
    }
    total = sum(sizes.values())
    if not total:
        return {}
    pooled: dict[str, Any] = {"n_locality": total}
    for metric in LOCALITY_METRICS:
        pooled[f"locality_{metric}"] = sum(n * float(row[f"locality_{name}_{metric}"]) for name, n in sizes.items()) / total
    return pooled


@dataclass
class Update:
    """A trained edit: δ per parameter (float32, zero outside the selection) and how training went."""

    deltas: dict[str, torch.Tensor]
    losses: list[float]
    norm: float  # final ‖δ‖₂ over every selected weight
    n_projected: int  # steps after which δ was scaled back onto the ‖δ‖ ≤ max_norm ball
    seconds: float

    def overrides(self, lm) -> dict[str, torch.Tensor]:  # noqa: ANN001
        """Parameter replacements ``w + δ`` for ``functional_call`` (the model's weights are untouched)."""
        params = dict(lm.model.named_parameters())
        return {n: params[n].detach() + d.detach().to(params[n].dtype) for n, d in self.deltas.items()}


def delta_norm(deltas: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all deltas together, accumulated in float64."""
    return math.sqrt(sum(float(d.detach().double().pow(2).sum()) for d in deltas.values()))


@torch.no_grad()
def project_(deltas: Mapping[str, torch.Tensor], max_norm: float) -> bool:
    """Scale every delta in place so their joint L2 norm is at most ``max_norm``; True if it was scaled."""
    norm = delta_norm(deltas)
    if norm <= max_norm or norm == 0.0:
        return False
    for d in deltas.values():
        d.mul_(max_norm / norm)
    return True


def train_delta(
    lm,  # noqa: ANN001
    selection: Circuit,
    facts: Encoded,
    steps: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
    max_norm: float | None = None,
    batch_size: int = 32,
) -> Update:
    """Adam on δ so each fact's prompt continues with its (new) ``target``; only ``selection``'s weights move.

    Only ``facts`` is trained on: each step is one full-batch step on the mean cross-entropy of every fact's
    target (first token), its gradient accumulated over chunks of ``batch_size`` facts to bound memory. With
    ``max_norm`` δ is projected onto ‖δ‖₂ ≤ ``max_norm`` after every step (projected Adam): the matched budget."""
    if steps < 1:
        raise CircuitError(f"an edit needs at least one step, got steps={steps}")
    if not lr > 0:
        raise CircuitError(f"the edit learning rate must be positive, got lr={lr}")
    if max_norm is not None and not max_norm > 0:
        raise CircuitError(f"max_norm bounds ‖δ‖ and must be positive (or None for no bound), got {max_norm}")
    if len(facts) == 0 or batch_size < 1:
        raise CircuitError(f"an edit needs at least one fact and batch_size ≥ 1, got {len(facts)} facts, batch_size={batch_size}")
    selection.check_model(lm.model)
    torch.manual_seed(seed)
    params = dict(lm.model.named_parameters())
    names = [n for n, m in selection.masks.items() if bool(m.any())]
    masks = {n: selection.masks[n].to(params[n].device) for n in names}
    deltas = {n: torch.zeros_like(params[n], dtype=torch.float32, requires_grad=True) for n in names}
    opt = torch.optim.Adam(list(deltas.values()), lr=lr) if deltas else None  # an empty selection cannot learn
    targets = torch.tensor(facts.target_ids, device=lm.device)
    chunks = [list(range(i, min(i + batch_size, len(facts)))) for i in range(0, len(facts), batch_size)]
    losses: list[float] = []
    projected = 0
    started = time.perf_counter()
    with frozen(lm.model):
        for _ in range(steps if opt is not None else 0):
            opt.zero_grad()  # type: ignore[union-attr]
            total = 0.0
            for index in chunks:
                overrides = {n: params[n].detach() + (deltas[n] * masks[n]).to(params[n].dtype) for n in names}
                logits = last_logits(lm, [facts.ids[i] for i in index], overrides)
                loss = torch.nn.functional.cross_entropy(logits, targets[index], reduction="sum") / len(facts)
                loss.backward()
                total += float(loss.detach())
            opt.step()  # type: ignore[union-attr]
            with torch.no_grad():
                for n in names:
                    deltas[n].mul_(masks[n])  # Adam leaves zero-gradient entries at 0; this makes it exact
            if max_norm is not None:
                projected += project_(deltas, max_norm)
            losses.append(total)
    final = {n: d.detach() for n, d in deltas.items()}
    return Update(final, losses, delta_norm(final), projected, time.perf_counter() - started)


def _item_rows(
    kind: str, data: Encoded, values: Mapping[str, torch.Tensor], names: tuple[str, ...] = ("hyponym", "template")
) -> list[dict[str, Any]]:
    rows = []
    for i, ex in enumerate(data.examples):
        row: dict[str, Any] = {"set": kind, "item": i, **{k: ex.meta[k] for k in names if k in ex.meta}}
        row.update({metric: float(v[i]) for metric, v in values.items()})
        rows.append(row)
    return rows


def _fact_items(pre: torch.Tensor, post: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "success": (post[:, 0] < post[:, 1]).float(),
        "delta_nll_new": post[:, 0] - pre[:, 0],
        "delta_nll_old": post[:, 1] - pre[:, 1],
    }


def edit_facts(
    lm,  # noqa: ANN001
    selection: Circuit,
    facts: Encoded,
    locality: Encoded | Mapping[str, Encoded],
    steps: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
    paraphrases: Encoded | None = None,
    max_norm: float | None = None,
    before: Snapshot | None = None,
    per_item: bool = False,
) -> dict[str, Any]:
    """Fine-tune only ``selection``'s weights so each fact's prompt continues with its (new) ``target``.

    ``facts``: target = the new category, foil = the true one (see :func:`tasks.new_facts`); the only data
    trained on. ``paraphrases``: the same facts in other wordings (:func:`tasks.paraphrases`), evaluated only.
    ``locality``: known facts that should not change, one set or several by name. ``max_norm``: the update
    budget (see :func:`train_delta`). ``before``: the unedited :func:`evaluate` snapshot, to share it between
    edits. Returns one row of metrics: :func:`fact_metrics` of the trained prompts (no prefix) and of the
    paraphrases (``paraphrase_``); ``locality_unchanged`` / ``locality_kl`` / ``locality_delta_nll`` over every
    locality example (:func:`pool_locality`), and ``locality_<name>_...`` of every named set; ``delta_norm`` (final ‖δ‖₂),
    ``budget_binds`` and ``n_projected``. With ``per_item`` the row also holds ``items``: one dict per fact,
    paraphrase and locality example (set, item, metrics).
    """
    sets = _named(locality)
    update = train_delta(lm, selection, facts, steps=steps, lr=lr, seed=seed, max_norm=max_norm)
    if before is None:
        before = evaluate(lm, facts, sets, paraphrases)
    after = evaluate(lm, facts, sets, paraphrases, update.overrides(lm))
    row: dict[str, Any] = {"n_facts": len(facts), "n_trainable": selection.n_kept, "steps": steps, "lr": lr}
    row.update(fact_metrics(before.facts, after.facts))
    items = _item_rows("facts", facts, _fact_items(before.facts, after.facts)) if per_item else []
    if paraphrases is not None:
        if before.paraphrases is None or after.paraphrases is None:
            raise CircuitError("the 'before' snapshot was taken without paraphrases; evaluate it with the same sets")
        row["n_paraphrases"] = len(paraphrases)
        row.update(fact_metrics(before.paraphrases, after.paraphrases, prefix="paraphrase_"))
        if per_item:
            items += _item_rows("paraphrases", paraphrases, _fact_items(before.paraphrases, after.paraphrases))
    for name, data in sets.items():
        if name not in before.locality:
            raise CircuitError(f"the 'before' snapshot has no locality set {name!r}; evaluate it with the same sets")
        scores = (*before.locality[name], *after.locality[name])
        if name == DEFAULT_LOCALITY:
            row.update(locality_metrics(*scores))
        else:
            row[f"n_locality_{name}"] = len(data)
            row.update(locality_metrics(*scores, prefix=f"locality_{name}_"))
        if per_item:
            items += _item_rows(f"locality:{name}", data, locality_items(*scores), names=("hyponym",))
    row.update(pool_locality(row))
    row.update(
        {
            "max_norm": max_norm,
            "delta_norm": update.norm,
            "budget_binds": max_norm is not None and update.norm >= max_norm * (1 - BINDS_RTOL),
            "n_projected": update.n_projected,
            "final_loss": update.losses[-1] if update.losses else float("nan"),
            "total_abs_change": sum(float(d.abs().sum()) for d in update.deltas.values()),
            "seconds": update.seconds,
        }
    )
    if per_item:
        row["items"] = items
    return row


SELECTIONS = ("circuit", "complement", "random")


def selections(circuit: Circuit, seed: int = 0) -> dict[str, Circuit]:
    """The three weight sets an edit is compared on: the circuit, its complement, a random set of its size."""
    return {"circuit": circuit, "complement": circuit.complement(), "random": circuit.random_like(seed)}


def compare_edits(
    lm,  # noqa: ANN001
    circuit: Circuit,
    facts: Encoded,
    locality: Encoded | Mapping[str, Encoded],
    steps: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
    paraphrases: Encoded | None = None,
    max_norm: float | None = None,
    per_item: bool = False,
) -> list[dict[str, Any]]:
    """The same edit through the circuit, its complement and a random set of the circuit's size: the same
    facts, steps, learning rate, seed and update bound ``max_norm`` for each (a matched budget)."""
    sets = _named(locality)
    before = evaluate(lm, facts, sets, paraphrases)
    rows = []
    for which, selection in selections(circuit, seed).items():
        row = edit_facts(
            lm, selection, facts, sets, steps=steps, lr=lr, seed=seed, paraphrases=paraphrases, max_norm=max_norm,
            before=before, per_item=per_item,
        )  # fmt: skip
        rows.append({"selection": which, "density": circuit.density, **row})
    return rows
