"""Circuit discovery by a differentiable weight mask (Gumbel-sigmoid) over every parameter of the
transformer blocks, norms included, trained to keep the full model's choices on a task while a
sparsity penalty drives the expected density down through a schedule of target densities.

One mask logit per weight; a sample is ``sigmoid((logit + logistic noise) / temperature)``; the masked
model is run with ``torch.func.functional_call`` so the model's weights are never written. Densities
are reached in one decreasing schedule (e.g. 50 → 35 → 15 → 5 %): each stage moves the target linearly
to its density, holds it, and snapshots the circuit as the top ``density × N`` mask logits (exactly the
target size; the JSON also records how many logits are positive, the mask's own density).
With ``MaskConfig(hard=True)`` the forward pass uses a hard 0/1 sample (straight-through gradients of the
soft one), and the circuit at each stage is the weights whose logit is above 0, the reference practice.

>>> from patchscopes.circuits.masking import MaskConfig, WeightMask
>>> from patchscopes.circuits.tasks import encode, make_task
>>> train = encode(lm, make_task("subj_verb", n=16, seed=0).examples)
>>> mask = WeightMask(lm, MaskConfig(layers=(2, 3)))              # the last two blocks (of lm's 4)
>>> result = train_mask(lm, train, MaskConfig(layers=(2, 3)), densities=(0.5, 0.05), steps_per_stage=10)
>>> round(result.circuits[0.05].density, 3)
0.05
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patchscopes.circuits.circuit import Circuit, CircuitError
from patchscopes.circuits.forward import choice_logits
from patchscopes.circuits.tasks import Encoded
from patchscopes.models.gradients import frozen


@dataclass(frozen=True)
class MaskConfig:
    """Which parameters the mask covers and how it is sampled.

    ``layers``: block indices (``None`` = every block); ``final_norm`` / ``embeddings``: mask those too.
    ``hard``: straight-through hard samples, and circuits defined as the positive logits (not the top-k).
    """

    layers: tuple[int, ...] | None = None
    final_norm: bool = True
    embeddings: bool = False
    init_logit: float = 6.0
    temperature: float = 0.5
    hard: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


def masked_parameter_names(lm, config: MaskConfig) -> list[str]:  # noqa: ANN001
    """Names (as in ``lm.model.named_parameters()``) of the parameters the mask covers."""
    by_id = {id(p): n for n, p in lm.model.named_parameters()}
    n_layers = lm.n_layers
    layers = range(n_layers) if config.layers is None else config.layers
    names: list[str] = []
    for layer in layers:
        if not -n_layers <= layer < n_layers:
            raise CircuitError(f"mask layer {layer} is outside the model's blocks 0..{n_layers - 1}")
        names += [by_id[id(p)] for p in lm.adapter.blocks[layer % n_layers].parameters() if id(p) in by_id]
    if config.final_norm and lm.adapter.final_norm is not None:
        names += [by_id[id(p)] for p in lm.adapter.final_norm.parameters() if id(p) in by_id]
    if config.embeddings:
        names += [by_id[id(p)] for p in lm.adapter.embed.parameters() if id(p) in by_id]
    return list(dict.fromkeys(names))


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard values, exactly 0 or 1 (``hard + soft - soft.detach()`` is off by rounding).
    Backward: the gradient goes to the soft values unchanged."""

    @staticmethod
    def forward(ctx: Any, soft: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return hard

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ARG004
        return grad, None


class WeightMask(nn.Module):
    """One learnable logit per masked weight."""

    def __init__(self, lm, config: MaskConfig | None = None) -> None:  # noqa: ANN001
        super().__init__()
        self.config = config or MaskConfig()
        self.names = masked_parameter_names(lm, self.config)
        params = dict(lm.model.named_parameters())
        self.logits = nn.ParameterList(
            [nn.Parameter(torch.full_like(params[n], self.config.init_logit, dtype=torch.float32)) for n in self.names]
        )

    @property
    def n_total(self) -> int:
        return sum(p.numel() for p in self.logits)

    def sample(self, stochastic: bool = True) -> list[torch.Tensor]:
        """Mask values: Gumbel-sigmoid samples in (0, 1), or plain ``sigmoid(logit / T)`` when not stochastic.

        With ``config.hard`` each value is exactly 0 or 1 (the soft value rounded at 0.5, i.e. a noisy logit
        above 0) in the forward pass, while its gradient is the soft value's (straight-through)."""
        out = []
        for logit in self.logits:
            z = logit
            if stochastic:
                u = torch.rand_like(logit).clamp_(1e-6, 1 - 1e-6)
                z = logit + torch.log(u) - torch.log1p(-u)
            soft = torch.sigmoid(z / self.config.temperature)
            out.append(_StraightThrough.apply(soft, (z > 0).to(soft.dtype)) if self.config.hard else soft)
        return out

    def expected_density(self) -> torch.Tensor:
        """Mean keep probability ``sigmoid(logit)`` over every masked weight (differentiable)."""
        total = sum(torch.sigmoid(p).sum() for p in self.logits)
        return total / self.n_total  # type: ignore[operator,return-value]

    def positive_density(self) -> float:
        """Share of logits above 0 (the weights the mask itself keeps at the deterministic threshold)."""
        with torch.no_grad():
            return float(sum(int((p > 0).sum()) for p in self.logits)) / self.n_total

    def overrides(self, lm, values: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:  # noqa: ANN001
        """Masked parameter replacements ``w * m`` for ``functional_call`` (the weights themselves are untouched)."""
        params = dict(lm.model.named_parameters())
        return {n: params[n].detach() * v.to(params[n].dtype) for n, v in zip(self.names, values)}

    def constant(self, value: float) -> list[torch.Tensor]:
        """A mask of one constant value (1 = full model, 0 = every masked weight removed)."""
        return [torch.full_like(p, value) for p in self.logits]

    def circuit(self, density: float | None = None, metadata: dict[str, Any] | None = None) -> Circuit:
        """The top ``density × N`` weights by logit (exact size), or the positive logits when ``density`` is None."""
        with torch.no_grad():
            if density is None:
                masks = {n: p > 0 for n, p in zip(self.names, self.logits)}
            else:
                if not 0 < density <= 1:
                    raise CircuitError(f"density must be in (0, 1], got {density}")
                k = max(1, int(round(density * self.n_total)))
                flat = torch.cat([p.flatten() for p in self.logits])
                threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
                keep = flat > threshold
                ties = torch.nonzero(flat == threshold).flatten()
                keep[ties[: k - int(keep.sum())]] = True  # exactly k, ties broken by position
                masks, start = {}, 0
                for n, p in zip(self.names, self.logits):
                    masks[n] = keep[start : start + p.numel()].view(p.shape)
                    start += p.numel()
        meta = {"mask_config": self.config.to_dict(), "positive_density": self.positive_density(), **(metadata or {})}
        return Circuit(masks, meta)

    def save(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """``mask.safetensors`` (logits, float32) and ``mask.json`` (config, names, metadata)."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().float().contiguous() for n, p in zip(self.names, self.logits)}, str(path / "mask.safetensors"))
        info = {"config": self.config.to_dict(), "names": self.names, "metadata": metadata or {}}
        (path / "mask.json").write_text(json.dumps(info, indent=2, default=str))
        return path

    @classmethod
    def load(cls, lm, directory: str | Path) -> WeightMask:  # noqa: ANN001
        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / "mask.json").is_file():
            raise CircuitError(f"no mask.json in {path}; give a directory written by WeightMask.save")
        info = json.loads((path / "mask.json").read_text())
        cfg = dict(info["config"])
        cfg["layers"] = tuple(cfg["layers"]) if cfg["layers"] is not None else None
        mask = cls(lm, MaskConfig(**cfg))
        if mask.names != info["names"]:
            raise CircuitError(f"{path} masks other parameters than this model has; load it on the model it was trained on")
        saved = load_file(str(path / "mask.safetensors"))
        with torch.no_grad():
            for n, p in zip(mask.names, mask.logits):
                p.copy_(saved[n].float())
        return mask


def choice_loss(pair: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ masked) over the two-way (target, foil) choice; ``reference`` = full model's pair logits."""
    ref = torch.log_softmax(reference, dim=-1)
    return (ref.exp() * (ref - torch.log_softmax(pair, dim=-1))).sum(-1).mean()


@dataclass
class MaskResult:
    mask: WeightMask
    circuits: dict[float, Circuit]
    history: list[dict[str, Any]]
    seconds: float


def schedule(densities: Sequence[float], steps_per_stage: int, start: float = 1.0) -> list[tuple[float, float]]:
    """(stage density, target at this step) for every step: each stage moves linearly from the previous
    density to its own over its first half, then holds it."""
    out: list[tuple[float, float]] = []
    prev = start
    for d in densities:
        ramp = max(1, steps_per_stage // 2)
        for step in range(steps_per_stage):
            t = min(1.0, (step + 1) / ramp)
            out.append((d, prev + (d - prev) * t))
        prev = d
    return out


def train_mask(
    lm,  # noqa: ANN001
    train: Encoded,
    config: MaskConfig | None = None,
    densities: Sequence[float] = (0.5, 0.35, 0.15, 0.05),
    steps_per_stage: int = 50,
    batch_size: int = 16,
    lr: float = 0.1,
    penalty: float = 10000.0,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> MaskResult:
    """Train a :class:`WeightMask` on ``train`` through decreasing ``densities``; snapshot a circuit at each.

    Loss = KL to the full model's two-way choice + ``penalty × |expected density − scheduled target|`` (two-sided, so
    Adam's momentum cannot carry the mask far below the target). The density is a mean over all N masked weights,
    so the penalty's pull on one logit is ``penalty / N``: 10,000 kept up with the schedule over all 30 blocks of
    SmolLM2-135M (106 M weights, 50 steps per stage), where 1,000 lagged behind it.
    """
    order = sorted(densities, reverse=True)
    if not order or not all(0 < d < 1 for d in order):
        raise CircuitError(f"densities must lie strictly between 0 and 1, got {list(densities)}")
    torch.manual_seed(seed)
    mask = WeightMask(lm, config)
    with torch.no_grad():
        reference, _ = choice_logits(lm, train.ids, train.target_ids, train.foil_ids)
    opt = torch.optim.Adam(mask.parameters(), lr=lr)
    plan = schedule(order, steps_per_stage)
    g = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    circuits: dict[float, Circuit] = {}
    started = time.perf_counter()
    with frozen(lm.model):
        for step, (stage, target) in enumerate(plan):
            idx = torch.randperm(len(train), generator=g)[:batch_size].tolist()
            sub = train.subset(idx)
            pair, _ = choice_logits(lm, sub.ids, sub.target_ids, sub.foil_ids, mask.overrides(lm, mask.sample()))
            task = choice_loss(pair, reference[idx])
            density = mask.expected_density()
            sparsity = penalty * (density - target).abs()
            loss = task + sparsity
            opt.zero_grad()
            loss.backward()
            opt.step()
            row = {
                "step": step,
                "stage": stage,
                "target": target,
                "task_loss": float(task.detach()),
                "expected_density": float(density.detach()),
                "positive_density": mask.positive_density(),
            }
            history.append(row)
            if on_step:
                on_step(row)
            last_of_stage = step + 1 == len(plan) or plan[step + 1][0] != stage
            if last_of_stage:
                meta = {
                    "density": stage,
                    "label": f"{(metadata or {}).get('task', 'task')}@{stage:g}",
                    "model": lm.name,
                    "weights_sha256": lm.weights_sha256,
                    "steps": step + 1,
                    **(metadata or {}),
                }
                circuits[stage] = mask.circuit(None if mask.config.hard else stage, meta)
    return MaskResult(mask, circuits, history, time.perf_counter() - started)


def balanced_agreement(full: torch.Tensor, masked: torch.Tensor) -> float:
    """Agreement with the full model's answers, averaged over the answers it gives (token ids per example).

    Plain agreement rewards a circuit that always gives the answer the full model gives most often (a
    sentiment model that says " positive" on 80 % of the examples: 0.80 for a circuit that always does).
    Averaged over the full model's answers, a circuit that always gives one answer of a two-way task scores
    0.5, however unbalanced the full model's answers are.

    >>> full = torch.tensor([7, 7, 7, 9])  # the full model says token 7 three times, token 9 once
    >>> balanced_agreement(full, torch.tensor([7, 7, 7, 7]))  # plain agreement: 0.75
    0.5
    >>> balanced_agreement(full, full)
    1.0
    """
    rates = [float((masked[full == a] == a).float().mean()) for a in torch.unique(full)]
    return sum(rates) / len(rates) if rates else math.nan


@torch.no_grad()
def faithfulness(lm, circuit: Circuit | None, held_out: Encoded, batch_size: int = 32, seed: int = 0) -> dict[str, float]:  # noqa: ANN001
    """How well the circuit alone (masked-out weights zeroed) keeps the full model's behaviour on held-out examples.

    ``agreement``: same two-way choice as the full model; ``balanced_agreement``: the same averaged over the
    answers the full model gives (:func:`balanced_agreement`); ``accuracy`` / ``full_accuracy``: right answer;
    ``logit_diff_recovered``: mean masked logit difference / mean full one; ``kl``: mean full-vocabulary
    KL(full ‖ masked) at the answer position. ``circuit=None`` evaluates the full model against itself.
    """
    overrides = circuit.overrides(lm.model) if circuit is not None else None
    full_pairs, masked_pairs, kls = [], [], []
    for start in range(0, len(held_out), batch_size):
        sub = held_out.subset(list(range(start, min(start + batch_size, len(held_out)))))
        fp, flp = choice_logits(lm, sub.ids, sub.target_ids, sub.foil_ids)
        mp, mlp = choice_logits(lm, sub.ids, sub.target_ids, sub.foil_ids, overrides)
        full_pairs.append(fp)
        masked_pairs.append(mp)
        kls.append((flp.exp() * (flp - mlp)).sum(-1))
    fp, mp, kl = torch.cat(full_pairs), torch.cat(masked_pairs), torch.cat(kls)
    fd, md = fp[:, 0] - fp[:, 1], mp[:, 0] - mp[:, 1]
    targets, foils = torch.tensor(held_out.target_ids), torch.tensor(held_out.foil_ids)
    return {
        "n": len(held_out),
        "agreement": float(((fd > 0) == (md > 0)).float().mean()),
        "balanced_agreement": balanced_agreement(torch.where(fd > 0, targets, foils), torch.where(md > 0, targets, foils)),
        "accuracy": float((md > 0).float().mean()),
        "full_accuracy": float((fd > 0).float().mean()),
        "logit_diff": float(md.mean()),
        "full_logit_diff": float(fd.mean()),
        "logit_diff_recovered": float(md.mean() / fd.mean()) if abs(float(fd.mean())) > 1e-9 else math.nan,
        "kl": float(kl.mean()),
    }
