"""What a circuit is made of and how circuits overlap.

Composition by module type is reported three ways, because "up to 60 % of the circuits consist of layer
normalization modules" (Ge et al. 2024) can mean more than one thing:

- ``share_of_kept_params``: of all kept weights, the share in modules of this type;
- ``share_of_circuit_modules``: of all modules (weight matrices, norm vectors) with at least one kept
  weight, the share of this type — a norm vector with one kept entry counts as much as a full matrix;
- ``type_density``: kept weights of this type / all weights of this type (how much of the norms is kept).

>>> from patchscopes.circuits.masking import MaskConfig, WeightMask
>>> mask = WeightMask(lm, MaskConfig(layers=(2, 3)))
>>> c1, c2 = mask.circuit(0.2), mask.circuit(0.05)      # the top 20 % and the top 5 % of one mask
>>> rows = composition(c1)
>>> rows.columns.tolist()[:3]
['module_type', 'n_params', 'kept_params']
>>> round(float(overlap({"a": c1, "b": c2}).loc["a", "b"]), 2)   # Jaccard: nested, so 0.05 / 0.2
0.25
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
import torch

from patchscopes.circuits.circuit import Circuit, CircuitError

MODULE_TYPES = ("attention", "mlp", "norm", "embedding", "other")


def module_type(name: str) -> str:
    """The module type of a parameter name: attention, mlp, norm, embedding or other."""
    parts = name.lower().split(".")
    module = ".".join(parts[:-1])
    if "norm" in module or any(p.startswith("ln") for p in parts):
        return "norm"
    if "embed" in module or any(p in ("wte", "wpe") for p in parts):
        return "embedding"
    if "attn" in module or "attention" in module:
        return "attention"
    if "mlp" in module or "feed_forward" in module or "ffn" in module or module.endswith(("fc1", "fc2")):
        return "mlp"
    return "other"


def composition(circuit: Circuit) -> pd.DataFrame:
    """One row per module type present in the circuit's scope, with the three measures above."""
    stats: dict[str, dict[str, float]] = {}
    modules_kept: dict[str, set[str]] = {}
    modules_all: dict[str, set[str]] = {}
    for name, m in circuit.masks.items():
        t = module_type(name)
        module = name.rsplit(".", 1)[0]
        s = stats.setdefault(t, {"n_params": 0, "kept_params": 0})
        s["n_params"] += m.numel()
        kept = int(m.sum())
        s["kept_params"] += kept
        modules_all.setdefault(t, set()).add(module)
        if kept:
            modules_kept.setdefault(t, set()).add(module)
    total_kept = max(circuit.n_kept, 1)
    total_modules = max(sum(len(v) for v in modules_kept.values()), 1)
    rows = []
    for t in MODULE_TYPES:
        if t not in stats:
            continue
        s = stats[t]
        rows.append(
            {
                "module_type": t,
                "n_params": int(s["n_params"]),
                "kept_params": int(s["kept_params"]),
                "share_of_kept_params": s["kept_params"] / total_kept,
                "n_modules": len(modules_all[t]),
                "modules_with_kept": len(modules_kept.get(t, ())),
                "share_of_circuit_modules": len(modules_kept.get(t, ())) / total_modules,
                "type_density": s["kept_params"] / max(s["n_params"], 1),
            }
        )
    return pd.DataFrame(rows)


def jaccard(a: Circuit, b: Circuit) -> float:
    """|a ∩ b| / |a ∪ b| over kept weights; both circuits must cover the same parameters."""
    if a.names != b.names or any(a.masks[n].shape != b.masks[n].shape for n in a.names):
        raise CircuitError("Jaccard overlap needs circuits over the same parameters (same model and mask layers)")
    inter = sum(int((a.masks[n] & b.masks[n]).sum()) for n in a.names)
    union = sum(int((a.masks[n] | b.masks[n]).sum()) for n in a.names)
    return inter / union if union else 1.0


def overlap(circuits: Mapping[str, Circuit]) -> pd.DataFrame:
    """Square DataFrame of pairwise Jaccard overlaps, labelled by the mapping's keys."""
    labels = list(circuits)
    data = [[jaccard(circuits[a], circuits[b]) for b in labels] for a in labels]
    return pd.DataFrame(data, index=labels, columns=labels)


def expected_random_jaccard(d1: float, d2: float) -> float:
    """Jaccard overlap expected between two independent random circuits of densities d1, d2 (a baseline)."""
    inter = d1 * d2
    return inter / (d1 + d2 - inter)


def layer_density(circuit: Circuit) -> pd.DataFrame:
    """Kept share per (block layer, module type) — where in depth the circuit lives."""
    rows = []
    for name, m in circuit.masks.items():
        layer = next((int(p) for p in name.split(".") if p.isdigit()), -1)
        rows.append({"layer": layer, "module_type": module_type(name), "n": m.numel(), "kept": int(m.sum())})
    df = pd.DataFrame(rows).groupby(["layer", "module_type"], as_index=False)[["n", "kept"]].sum()
    df["density"] = df["kept"] / df["n"]
    return df


def kept_fraction(masks: Mapping[str, torch.Tensor]) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    return kept / max(sum(m.numel() for m in masks.values()), 1)
