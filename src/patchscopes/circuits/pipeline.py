"""Resumable runs behind ``patchscopes circuits discover | edit | report``: one run directory per model,
one unit of work per (task, method) or (task, density), results in a :class:`ResultStore`.

Layout of ``out/``: ``config.json``, ``*.jsonl`` tables (history, faithfulness, eap, eap_edges, edits),
``masks/<task>/`` (mask logits), ``circuits/<task>@<density>/`` (bit-packed circuits), ``figures/``.

>>> cfg = RunConfig.quick_profile(model="SmolLM2-135M", tasks=("subj_verb",))
>>> store = discover(lm, cfg, "runs/circuits/quick", log=lambda line: None)
>>> sorted(p.name for p in Path("runs/circuits/quick").glob("*.jsonl"))
['eap.jsonl', 'eap_edges.jsonl', 'faithfulness.jsonl', 'history.jsonl']
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from patchscopes.circuits import analysis
from patchscopes.circuits.attribution import attribute, faithfulness_curve
from patchscopes.circuits.circuit import Circuit, CircuitError
from patchscopes.circuits.editing import compare_edits
from patchscopes.circuits.masking import MaskConfig, faithfulness, train_mask
from patchscopes.circuits.tasks import TASKS, encode, make_task, new_facts
from patchscopes.results import ResultStore

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's numbers (stored in ``config.json``; a change needs a new ``out``)."""

    model: str = "SmolLM2-135M"
    tasks: tuple[str, ...] = ("subj_verb", "hierarchy")
    methods: tuple[str, ...] = ("mask", "eap", "eap-ig")
    densities: tuple[float, ...] = (0.5, 0.35, 0.15, 0.05)
    layers: tuple[int, ...] | None = None
    n_examples: int = 200
    n_train: int = 120
    steps_per_stage: int = 25
    batch_size: int = 8
    lr: float = 0.6
    penalty: float = 10000.0
    init_logit: float = 6.0
    hard_mask: bool = False
    ig_steps: int = 5
    n_attr: int = 32
    edge_sizes: tuple[int, ...] = (0, 10, 30, 100, 300, 1000, 3000)
    seed: int = 0
    quick: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick_profile(cls, model: str = "SmolLM2-135M", tasks: tuple[str, ...] = ("subj_verb",)) -> RunConfig:
        """A CI-sized run: the last block masked, two steps per stage, a few examples, EAP only (EAP-IG is unit-tested)."""
        return cls(
            model=model, tasks=tasks, methods=("mask", "eap"), densities=(0.5, 0.05), layers=(-1,), n_examples=16, n_train=8,
            steps_per_stage=2, batch_size=4, ig_steps=2, n_attr=4, edge_sizes=(0, 50), quick=True,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def store_config(self) -> dict[str, Any]:
        """The configuration a run directory is bound to: everything but the task list and the methods (each
        (task, method) is its own unit, so tasks can be added later or run by parallel processes)."""
        d = self.to_dict()
        d.pop("tasks")
        d.pop("methods")
        if not d["hard_mask"]:
            d.pop("hard_mask")  # so run directories made before the option existed still resume
        return d


def _check(cfg: RunConfig) -> None:
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise CircuitError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    bad = [m for m in cfg.methods if m not in ("mask", "eap", "eap-ig")]
    if bad:
        raise CircuitError(f"unknown method(s) {bad}; choose from mask, eap, eap-ig")


def _split(lm, cfg: RunConfig, task: str):  # noqa: ANN001, ANN202
    data = encode(lm, make_task(task, cfg.n_examples, cfg.seed).examples, same_length=True)
    n_train = min(cfg.n_train, len(data) - 1, max(1, round(len(data) * cfg.n_train / cfg.n_examples)))
    return data.subset(list(range(n_train))), data.subset(list(range(n_train, len(data))))


def circuit_dir(out: Path, task: str, density: float) -> Path:
    return out / "circuits" / f"{task}@{density:g}"


def discover(lm, cfg: RunConfig, out: str | Path, log: Log = print) -> ResultStore:  # noqa: ANN001
    """Mask training (circuits at every density + faithfulness) and EAP / EAP-IG, per task; resumable."""
    _check(cfg)
    out = Path(out)
    store = ResultStore(out, cfg.store_config())
    mask_cfg = MaskConfig(layers=cfg.layers, init_logit=cfg.init_logit, hard=cfg.hard_mask)
    for task in cfg.tasks:
        train, held = _split(lm, cfg, task)
        if "mask" in cfg.methods and not store.done("faithfulness", task):
            log(f"[{task}] training a weight mask: {len(train)} train / {len(held)} held-out examples")
            result = train_mask(
                lm, train, mask_cfg, cfg.densities, cfg.steps_per_stage, cfg.batch_size, cfg.lr, cfg.penalty, cfg.seed,
                metadata={"task": task}, on_step=lambda r: log(f"  step {r['step']}: density {r['expected_density']:.3f} "
                                                             f"(target {r['target']:.3f}) loss {r['task_loss']:.3f}"),
            )  # fmt: skip
            result.mask.save(out / "masks" / task, {"task": task, "model": lm.name, "seconds": result.seconds})
            rows = [{"task": task, "circuit": "full", "density": 1.0, **faithfulness(lm, None, held)}]
            for d, circuit in result.circuits.items():
                circuit.save(circuit_dir(out, task, d))
                rows.append(
                    {"task": task, "circuit": "mask", "density": d, "kept": circuit.density, **faithfulness(lm, circuit, held)}
                )
                rows.append(
                    {"task": task, "circuit": "random", "density": d, **faithfulness(lm, circuit.random_like(cfg.seed), held)}
                )
                log(f"  density {d:g}: agreement {rows[-2]['agreement']:.2f} (random {rows[-1]['agreement']:.2f})")
            store.append("history", task, [{"task": task, **h} for h in result.history])
            for r in rows:
                r["train_seconds"] = result.seconds
            store.append("faithfulness", task, rows)
        for method in [m for m in cfg.methods if m != "mask"]:
            key = {"task": task, "method": method}
            if store.done("eap", key):
                continue
            data = held.subset(list(range(min(cfg.n_attr, len(held)))))
            log(f"[{task}] {method} on {len(data)} examples")
            started = time.perf_counter()
            scores = attribute(lm, data, method=method, steps=cfg.ig_steps, batch_size=cfg.batch_size)
            seconds = time.perf_counter() - started
            sizes = sorted({min(n, scores.graph.n_edges) for n in (*cfg.edge_sizes, scores.graph.n_edges)})
            curve = faithfulness_curve(lm, data, scores, sizes, batch_size=cfg.batch_size)
            curve["task"], curve["seconds"] = task, seconds
            top = scores.frame().head(50)
            top["task"], top["method"] = task, method
            store.append("eap_edges", key, top.to_dict("records"))  # type: ignore[arg-type]
            store.append("eap", key, curve.to_dict("records"))  # type: ignore[arg-type]
    return store


def edit(
    lm,  # noqa: ANN001
    cfg: RunConfig,
    out: str | Path,
    task: str = "hierarchy",
    steps: int = 20,
    lr: float = 1e-3,
    log: Log = print,
    densities: tuple[float, ...] | None = None,
) -> ResultStore:
    """Insert held-out facts through each density's circuit (or those in ``densities``), its complement and a
    random set of its size; resumable."""
    out = Path(out)
    store = ResultStore(out, cfg.store_config())
    facts = encode(lm, new_facts(cfg.seed))
    _, held = _split(lm, cfg, "hierarchy")  # known facts never edited: the locality set
    locality = held.subset(list(range(min(40, len(held)))))
    for d in densities or cfg.densities:
        key = {"task": task, "density": d, "steps": steps, "lr": lr}
        if store.done("edits", key):
            continue
        path = circuit_dir(out, task, d)
        if not (path / "circuit.json").is_file():
            raise CircuitError(
                f"no circuit for task {task!r} at density {d:g} in {out}; run `patchscopes circuits discover` first"
            )
        circuit = Circuit.load(path)
        circuit.check_model(lm.model)
        log(f"[{task}@{d:g}] editing {len(facts)} facts (locality on {len(locality)} known facts)")
        rows = compare_edits(lm, circuit, facts, locality, steps=steps, lr=lr, seed=cfg.seed)
        for r in rows:
            r["task"] = task
            log(f"  {r['selection']:>10}: success {r['success']:.2f}, ΔNLL new {r['delta_nll_new']:+.2f}, "
                f"ΔNLL old {r['delta_nll_old']:+.2f}, locality {r['locality_unchanged']:.2f}")  # fmt: skip
        store.append("edits", key, rows)
    return store


def load_circuits(out: str | Path) -> dict[str, Circuit]:
    """Every saved circuit of a run, labelled ``task@density``."""
    root = Path(out) / "circuits"
    return {p.name: Circuit.load(p) for p in sorted(root.iterdir()) if (p / "circuit.json").is_file()} if root.is_dir() else {}


def report(out: str | Path, figures: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """Composition (three measures), overlaps, faithfulness, EAP curves and edits as tables, plus figures."""
    from patchscopes.circuits import figures as figs

    out = Path(out)
    if not (out / "config.json").is_file():
        raise CircuitError(
            f"{out} is not a circuits run directory (no config.json); run `patchscopes circuits discover --out {out}`"
        )
    store = ResultStore.reopen(out)
    circuits = load_circuits(out)
    tables: dict[str, pd.DataFrame] = {}
    comp = []
    for label, c in circuits.items():
        df = analysis.composition(c)
        df.insert(0, "circuit", label)
        df.insert(1, "density", c.density)
        comp.append(df)
    if comp:
        tables["composition"] = pd.concat(comp, ignore_index=True)
        tables["overlap"] = analysis.overlap(circuits)
    for name in ("faithfulness", "eap", "edits", "history", "eap_edges"):
        df = store.frame(name)
        if len(df):
            tables[name] = df
    if figures is not None:
        figs.write_all(tables, Path(figures))
    return tables
