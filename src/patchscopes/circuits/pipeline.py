"""Resumable runs behind ``patchscopes circuits discover | edit | run | report``: one run directory per
model and seed, one unit of work per (task, method) or (task, density, edit setting), results in a
:class:`ResultStore`.

Layout of ``out/``: ``config.json``, ``*.jsonl`` tables (history, faithfulness, composition, digests, eap,
eap_edges, edits, edit_items; balance in runs recorded before faithfulness had its balanced agreement),
``masks/<task>/`` (mask logits), ``circuits/<task>@<density>/`` (bit-packed circuits), ``figures/``. A profile
run (:func:`run_profile`, ``patchscopes circuits run --profile paper``) holds
``profile.json`` and one such directory per seed, ``seed-<k>/``; :func:`report` aggregates them.

>>> cfg = RunConfig.quick_profile(model="SmolLM2-135M", tasks=("subj_verb",))
>>> store = discover(lm, cfg, "runs/circuits/quick", log=lambda line: None)
>>> sorted(p.name for p in Path("runs/circuits/quick").glob("*.jsonl"))
['composition.jsonl', 'digests.jsonl', 'eap.jsonl', 'eap_edges.jsonl', 'faithfulness.jsonl', 'history.jsonl']
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchscopes.circuits import analysis
from patchscopes.circuits.attribution import attribute, faithfulness_curve
from patchscopes.circuits.circuit import Circuit, CircuitError
from patchscopes.circuits.editing import SELECTIONS, compare_edits, pool_locality
from patchscopes.circuits.masking import MaskConfig, MaskResult, faithfulness, train_mask
from patchscopes.circuits.tasks import PARAPHRASE_TEMPLATES, TASKS, Encoded, encode, make_task, new_facts, paraphrases
from patchscopes.files import atomic_write_text
from patchscopes.results import ResultStore, dtype_entry

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


def _composition(label: str, circuit: Circuit) -> pd.DataFrame:
    """:func:`analysis.composition` of one circuit, labelled (``task@density``) with its kept share."""
    df = analysis.composition(circuit)
    df.insert(0, "circuit", label)
    df.insert(1, "density", circuit.density)
    return df


def _saved_circuits(out: Path, task: str, densities: Sequence[float]) -> dict[float, Path] | None:
    """The task's circuit directories by density, or None when any of their files is absent (a packed run)."""
    paths = {d: circuit_dir(out, task, d) for d in densities}
    return paths if all((p / "circuit.json").is_file() for p in paths.values()) else None


def _record_circuits(store: ResultStore, out: Path, task: str, densities: Sequence[float]) -> None:
    """Record the composition and the digest of the task's circuits once, while their files are here: a packed
    run keeps both, and a mask trained again is checked bit for bit against the digests."""
    missing = [t for t in ("composition", "digests") if not store.done(t, task)]
    paths = _saved_circuits(out, task, densities) if missing else None
    if paths is None:
        return
    circuits = {d: Circuit.load(p) for d, p in paths.items()}
    if "composition" in missing:
        frames = [_composition(paths[d].name, c) for d, c in circuits.items()]
        store.append("composition", task, pd.concat(frames, ignore_index=True).to_dict("records"))  # type: ignore[arg-type]
    if "digests" in missing:
        store.append("digests", task, [{"task": task, "density": d, "digest": c.digest} for d, c in circuits.items()])


def _record_balance(lm, cfg: RunConfig, out: Path, store: ResultStore, task: str, held: Encoded) -> None:  # noqa: ANN001
    """For a discovery recorded before faithfulness measured the balanced agreement: measure it for the task's
    circuits, their random sets and the full model, while the circuit files are here, as the ``balance`` table
    (the report fills the faithfulness table's column from it)."""
    recorded = store.frame("faithfulness")
    recorded = recorded[recorded.task == task] if len(recorded) else recorded
    if store.done("balance", task) or ("balanced_agreement" in recorded and recorded.balanced_agreement.notna().all()):
        return
    paths = _saved_circuits(out, task, cfg.densities)
    if paths is None:
        return
    measured: list[tuple[str, float, Circuit | None]] = [("full", 1.0, None)]
    for d, path in paths.items():
        circuit = Circuit.load(path)
        measured += [("mask", d, circuit), ("random", d, circuit.random_like(cfg.seed))]
    rows = [
        {"task": task, "circuit": kind, "density": d, "balanced_agreement": faithfulness(lm, c, held)["balanced_agreement"]}
        for kind, d, c in measured
    ]
    store.append("balance", task, rows)  # type: ignore[arg-type]


def _with_balance(faith: pd.DataFrame, balance: pd.DataFrame) -> pd.DataFrame:
    """``faith`` with ``balanced_agreement`` filled in from the ``balance`` table where its rows lack it (NaN
    where neither has it: a run recorded before the column, whose circuit files were never measured)."""
    if "balanced_agreement" not in faith:
        faith = faith.assign(balanced_agreement=float("nan"))
    if balance.empty:
        return faith
    keys = ["task", "circuit", "density"]
    extra = balance[[*keys, "balanced_agreement"]].rename(columns={"balanced_agreement": "_balanced"})
    merged = faith.merge(extra, on=keys, how="left")
    merged["balanced_agreement"] = merged["balanced_agreement"].fillna(merged["_balanced"])
    return merged.drop(columns="_balanced")


def _train_circuits(lm, cfg: RunConfig, out: Path, task: str, train: Encoded, log: Log) -> MaskResult:  # noqa: ANN001
    """Train the task's weight mask with the run's settings and seed, and save the mask and its circuits."""
    result = train_mask(
        lm, train, MaskConfig(layers=cfg.layers, init_logit=cfg.init_logit, hard=cfg.hard_mask), cfg.densities,
        cfg.steps_per_stage, cfg.batch_size, cfg.lr, cfg.penalty, cfg.seed, metadata={"task": task},
        on_step=lambda r: log(f"  step {r['step']}: density {r['expected_density']:.3f} "
                              f"(target {r['target']:.3f}) loss {r['task_loss']:.3f}"),
    )  # fmt: skip
    result.mask.save(out / "masks" / task, {"task": task, "model": lm.name, "seconds": result.seconds})
    for d, circuit in result.circuits.items():
        circuit.save(circuit_dir(out, task, d))
    return result


def discover(lm, cfg: RunConfig, out: str | Path, log: Log = print) -> ResultStore:  # noqa: ANN001
    """Mask training (circuits at every density, their faithfulness and composition) and EAP / EAP-IG, per
    task; resumable."""
    _check(cfg)
    out = Path(out)
    store = ResultStore(out, cfg.store_config() | dtype_entry(lm.dtype))
    for task in cfg.tasks:
        train, held = _split(lm, cfg, task)
        if "mask" in cfg.methods and not store.done("faithfulness", task):
            log(f"[{task}] training a weight mask: {len(train)} train / {len(held)} held-out examples")
            result = _train_circuits(lm, cfg, out, task, train, log)
            rows = [{"task": task, "circuit": "full", "density": 1.0, **faithfulness(lm, None, held)}]
            for d, circuit in result.circuits.items():
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
        if "mask" in cfg.methods:
            _record_circuits(store, out, task, cfg.densities)
            _record_balance(lm, cfg, out, store, task, held)
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


@dataclass(frozen=True)
class EditConfig:
    """How the knowledge edit is run and judged; part of each edit unit's key, not of ``config.json``.

    ``steps`` / ``lr``: Adam on δ; ``max_norm``: the matched update budget, ‖δ‖₂ ≤ max_norm after every step
    (None: unbounded); ``n_facts``: the first n of :func:`tasks.new_facts` (None: all 150); ``paraphrases``:
    evaluate on :data:`tasks.PARAPHRASE_TEMPLATES` too; ``n_locality``: known examples per locality task
    (held-out part of each task's split); ``densities``: the circuits to edit (None: every density of the run).
    """

    steps: int = 20
    lr: float = 1e-3
    max_norm: float | None = None
    n_facts: int | None = None
    paraphrases: bool = True
    n_locality: int = 40
    locality_tasks: tuple[str, ...] = ("hierarchy", "subj_verb")
    densities: tuple[float, ...] | None = None

    def check(self) -> None:
        """Raise :class:`CircuitError` for a setting no edit can run with."""
        if self.steps < 1:
            raise CircuitError(f"an edit needs at least one step, got steps={self.steps}")
        if not self.lr > 0:
            raise CircuitError(f"the edit learning rate must be positive, got {self.lr}")
        if self.max_norm is not None and not self.max_norm > 0:
            raise CircuitError(f"the update bound max_norm must be positive (or None), got {self.max_norm}")
        available = len(new_facts())
        if self.n_facts is not None and not 1 <= self.n_facts <= available:
            raise CircuitError(f"n_facts must be between 1 and {available} (the held-out facts), got {self.n_facts}")
        if self.n_locality < 1:
            raise CircuitError(f"n_locality must be at least 1, got {self.n_locality}")
        unknown = [t for t in self.locality_tasks if t not in TASKS]
        if unknown or not self.locality_tasks:
            raise CircuitError(f"locality tasks must be some of {', '.join(TASKS)}, got {list(self.locality_tasks)}")

    @property
    def facts_count(self) -> int:
        return self.n_facts if self.n_facts is not None else len(new_facts())

    def key(self, task: str, density: float) -> dict[str, Any]:
        """The unit key of one edit (task's circuit at one density; all three selections together)."""
        return {
            "task": task, "density": density, "steps": self.steps, "lr": self.lr, "max_norm": self.max_norm,
            "n_facts": self.facts_count, "paraphrases": len(PARAPHRASE_TEMPLATES) if self.paraphrases else 0,
            "n_locality": self.n_locality, "locality": list(self.locality_tasks),
        }  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def restore_circuits(lm, cfg: RunConfig, out: Path, store: ResultStore, task: str, log: Log = print) -> None:  # noqa: ANN001
    """Train again the mask of a task whose discovery is recorded but whose circuit files are absent (a
    packed or committed run keeps its tables, not its circuits), and check each circuit against the recorded
    one: bit for bit by its digest, or by its kept share in runs made before digests were recorded. Mask
    training is deterministic for a seed on one platform, not across platforms."""
    if store.done("digests", task):
        digests = store.frame("digests")
        recorded, what = digests[digests.task == task].set_index("density")["digest"].to_dict(), "digest"
    else:
        shares = store.frame("faithfulness")
        shares = shares[(shares.task == task) & (shares.circuit == "mask")]
        recorded, what = shares.set_index("density")["kept"].to_dict(), "kept share"
    log(f"[{task}] its circuit files are absent: training its mask again with the recorded settings and seed")
    train, held = _split(lm, cfg, task)
    result = _train_circuits(lm, cfg, out, task, train, log)
    found = {d: c.digest if what == "digest" else c.density for d, c in result.circuits.items()}
    differ = [f"{task}@{d:g}: {what} {v!r}, recorded {recorded.get(d)!r}" for d, v in found.items() if v != recorded.get(d)]
    if differ:
        raise CircuitError(
            f"the circuits trained again in {out} are not the recorded ones ({'; '.join(differ)}): this platform does "
            "not reproduce the discovery, so edits here would not be of the recorded circuits; run the discovery and "
            "its edits together in a new --out"
        )
    _record_circuits(store, out, task, cfg.densities)
    _record_balance(lm, cfg, out, store, task, held)


def discovered_tasks(out: str | Path) -> list[str]:
    """The tasks with at least one saved circuit in a run directory, in :data:`tasks.TASKS` order."""
    root = Path(out) / "circuits"
    found = {p.name.split("@")[0] for p in root.iterdir() if (p / "circuit.json").is_file()} if root.is_dir() else set()
    return [t for t in TASKS if t in found]


@dataclass
class EditData:
    """Everything an edit is trained and judged on, encoded for one model."""

    facts: Encoded
    paraphrases: Encoded | None
    locality: dict[str, Encoded]


def edit_data(lm, cfg: RunConfig, config: EditConfig) -> EditData:  # noqa: ANN001
    """The facts to insert (``new_facts(cfg.seed)``), their paraphrases and the locality sets."""
    facts_ex = new_facts(cfg.seed, n=config.facts_count)
    facts = encode(lm, facts_ex)
    para = None
    if config.paraphrases:  # paraphrases of the facts that survived encoding (same target and foil tokens)
        para = encode(lm, [p for ex in facts.examples for p in paraphrases(ex)])
    locality = {}
    for t in config.locality_tasks:
        _, held = _split(lm, cfg, t)  # examples the mask was not trained on, never edited
        locality[t] = held.subset(list(range(min(config.n_locality, len(held)))))
    return EditData(facts, para, locality)


def edit(
    lm,  # noqa: ANN001
    cfg: RunConfig,
    out: str | Path,
    config: EditConfig | None = None,
    tasks: Sequence[str] | None = None,
    log: Log = print,
) -> ResultStore:
    """Insert held-out hierarchy facts through each task's circuit at each density, its complement and a
    random set of its size, under the same steps, learning rate and update bound; resumable.

    ``tasks``: whose circuits take the edit (default: every task with circuits in ``out``). The same facts
    are inserted into every task's circuits. Tables: ``edits`` (one row per selection) and ``edit_items``
    (one row per fact, paraphrase and locality example). A task whose discovery is recorded but whose circuit
    files are absent (a packed or committed run) first has them trained again (:func:`restore_circuits`)."""
    config = config or EditConfig()
    config.check()
    out = Path(out)
    store = ResultStore(out, cfg.store_config() | dtype_entry(lm.dtype))
    recorded = [t for t in TASKS if store.done("faithfulness", t)]  # mask discoveries, circuit files or not
    chosen = list(tasks) if tasks else [t for t in TASKS if t in set(discovered_tasks(out)) | set(recorded)]
    unknown = [t for t in chosen if t not in TASKS]
    if unknown:
        raise CircuitError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if not chosen:
        raise CircuitError(f"no circuits in {out}; run `patchscopes circuits discover --out {out}` first")
    densities = config.densities or cfg.densities
    keys = {(t, d): config.key(t, d) for t in chosen for d in densities}
    todo = [unit for unit, key in keys.items() if not (store.done("edits", key) and store.done("edit_items", key))]
    absent = [(t, d) for t, d in todo if not (circuit_dir(out, t, d) / "circuit.json").is_file()]
    missing = [f"{t}@{d:g}" for t, d in absent if t not in recorded]
    if missing:
        raise CircuitError(f"no circuit {', '.join(missing)} in {out}; run `patchscopes circuits discover` for those first")
    for task in dict.fromkeys(t for t, _ in absent):
        restore_circuits(lm, cfg, out, store, task, log)
    data: EditData | None = None
    for task, d in todo:
        key = keys[task, d]
        circuit = Circuit.load(circuit_dir(out, task, d))
        circuit.check_model(lm.model)
        if data is None:  # once, for the first unit left to do
            data = edit_data(lm, cfg, config)
        n_para = len(data.paraphrases) if data.paraphrases is not None else 0
        sizes = ", ".join(f"{k} {len(v)}" for k, v in data.locality.items())
        log(f"[{task}@{d:g}] editing {len(data.facts)} facts ({n_para} paraphrases; locality: {sizes})")
        rows = compare_edits(
            lm, circuit, data.facts, data.locality, steps=config.steps, lr=config.lr, seed=cfg.seed,
            paraphrases=data.paraphrases, max_norm=config.max_norm, per_item=True,
        )  # fmt: skip
        items = []
        for r in rows:
            r["task"], r["seed"], r["target_density"] = task, cfg.seed, d
            unit = {"seed": cfg.seed, "task": task, "density": d, "selection": r["selection"]}
            items += [{**unit, **item} for item in r.pop("items")]
            para = f", paraphrases {r['paraphrase_success']:.2f}" if "paraphrase_success" in r else ""
            log(f"  {r['selection']:>10}: success {r['success']:.2f}{para}, ΔNLL new {r['delta_nll_new']:+.2f}, "
                f"ΔNLL old {r['delta_nll_old']:+.2f}, locality {r['locality_unchanged']:.2f}, "
                f"‖δ‖ {r['delta_norm']:.4g}")  # fmt: skip
        store.append("edit_items", key, items)  # items first: a unit counts as done once its rows are written
        store.append("edits", key, rows)
    return store


#: The paper profile's edit: 10 Adam steps at lr 1e-3 with ‖δ‖₂ ≤ 3. One unbounded step moves each selected
#: weight by about lr, so ‖δ‖ ≈ 1e-3 × √N: 2.3 for a 5 % set of SmolLM2's blocks, more for every larger set,
#: so the bound binds from the second step on for all of them. In a pilot (30 facts, a random 5 % set) a bound
#: of 1 left the loss at 5.8 nats after 6 steps, and 3 brought it to 3.1 after 10: 3 leaves room to learn.
PAPER_EDIT_STEPS = 10
PAPER_EDIT_LR = 1e-3
PAPER_EDIT_MAX_NORM = 3.0


@dataclass(frozen=True)
class Profile:
    """A whole experiment: discovery settings, edit settings and seeds, one run directory ``seed-<k>`` per seed."""

    name: str
    run: RunConfig
    edit: EditConfig
    seeds: tuple[int, ...]

    def seed_config(self, seed: int) -> RunConfig:
        return replace(self.run, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        """What a profile directory is bound to (``profile.json``): everything but the seeds, which can be added."""
        return {"name": self.name, "run": self.run.store_config() | {"tasks": list(self.run.tasks),
                "methods": list(self.run.methods)}, "edit": self.edit.to_dict()}  # fmt: skip


def paper_profile(model: str = "SmolLM2-135M", seeds: tuple[int, ...] = (0, 1, 2)) -> Profile:
    """The knowledge-edit experiment of Ge et al. (2024) at full scale: a hard mask over every block and the
    final norm at densities 50 / 35 / 15 / 5 %, circuits of subj_verb, sentiment and hierarchy, each edited
    with all 150 held-out facts (paraphrases; locality on all three tasks) under a matched budget, 3 seeds."""
    run = RunConfig(
        model=model, tasks=("subj_verb", "sentiment", "hierarchy"), methods=("mask",), densities=(0.5, 0.35, 0.15, 0.05),
        layers=None, n_examples=200, n_train=120, steps_per_stage=100, batch_size=8, lr=0.1, penalty=10000.0,
        init_logit=6.0, hard_mask=True,
    )  # fmt: skip
    edit_cfg = EditConfig(
        steps=PAPER_EDIT_STEPS, lr=PAPER_EDIT_LR, max_norm=PAPER_EDIT_MAX_NORM, n_facts=None, paraphrases=True,
        n_locality=40, locality_tasks=("hierarchy", "subj_verb", "sentiment"),
    )  # fmt: skip
    return Profile("paper", run, edit_cfg, tuple(seeds))


def quick_run_profile(model: str = "SmolLM2-135M", seeds: tuple[int, ...] = (0, 1)) -> Profile:
    """A CI-sized version of the paper profile: the last block, two steps per stage, 16 facts, two seeds. The
    mask is soft (circuits are the top-k logits): two steps of a hard mask would keep nearly every weight."""
    run = replace(RunConfig.quick_profile(model, ("subj_verb", "hierarchy")), methods=("mask",))
    edit_cfg = EditConfig(steps=2, lr=1e-3, max_norm=0.05, n_facts=16, n_locality=8, locality_tasks=("hierarchy", "subj_verb"))
    return Profile("quick", run, edit_cfg, tuple(seeds))


PROFILES: dict[str, Callable[..., Profile]] = {"paper": paper_profile, "quick": quick_run_profile}


def get_profile(name: str, model: str = "SmolLM2-135M", seeds: Sequence[int] | None = None) -> Profile:
    """A named profile (:data:`PROFILES`), optionally with other seeds."""
    if name not in PROFILES:
        raise CircuitError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    profile = PROFILES[name](model)
    if seeds is not None:
        if not seeds or len(set(seeds)) != len(seeds):
            raise CircuitError(f"seeds must be distinct and at least one, got {list(seeds)}")
        profile = replace(profile, seeds=tuple(seeds))
    return profile


def seed_dir(out: str | Path, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def seed_dirs(out: str | Path) -> list[Path]:
    """The per-seed run directories of a profile run, by seed."""
    root = Path(out)
    found = [p for p in root.glob("seed-*") if (p / "config.json").is_file() and p.name[5:].lstrip("-").isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def bind_profile(profile: Profile, out: str | Path) -> Path:
    """Write ``profile.json`` in ``out``, or check that the one there is the same profile (seeds may differ)."""
    path = Path(out) / "profile.json"
    wanted = json.loads(json.dumps(profile.to_dict(), default=str))
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != wanted:
            changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise CircuitError(f"{out} holds a run of another profile (differs in: {', '.join(changed)}); use a new --out")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(wanted, indent=2))
    return path


def profile_tasks(profile: Profile, tasks: Sequence[str] | None = None) -> tuple[str, ...]:
    """``tasks`` (default: all of the profile's), checked to be the profile's own."""
    chosen = tuple(tasks) if tasks else profile.run.tasks
    outside = [t for t in chosen if t not in profile.run.tasks]
    if outside:
        raise CircuitError(f"task(s) {outside} are not in profile {profile.name!r} ({', '.join(profile.run.tasks)})")
    return chosen


def run_profile(
    lm,  # noqa: ANN001
    profile: Profile,
    out: str | Path,
    log: Log = print,
    tasks: Sequence[str] | None = None,
) -> list[Path]:
    """Discover and edit for every seed of ``profile``, each in ``out/seed-<k>``; resumable unit by unit.

    ``tasks``: only these of the profile's tasks in this call (so two processes can share one profile run,
    each with one thread: the units are independent, and each writes only its own)."""
    profile.edit.check()
    _check(profile.run)
    chosen = profile_tasks(profile, tasks)
    bind_profile(profile, out)
    dirs = []
    for seed in profile.seeds:
        cfg, directory = profile.seed_config(seed), seed_dir(out, seed)
        log(f"== seed {seed}: {directory}")
        discover(lm, replace(cfg, tasks=chosen), directory, log=log)
        edit(lm, cfg, directory, profile.edit, tasks=chosen, log=log)
        dirs.append(directory)
    return dirs


def plan(profile: Profile) -> dict[str, Any]:
    """How many units of work a profile has: mask trainings, mask steps, edits and edit steps (for estimates)."""
    n_tasks, n_seeds, n_dens = len(profile.run.tasks), len(profile.seeds), len(profile.edit.densities or profile.run.densities)
    masks = n_tasks * n_seeds if "mask" in profile.run.methods else 0
    edits = n_tasks * n_seeds * n_dens * len(SELECTIONS)
    return {
        "seeds": list(profile.seeds),
        "mask_trainings": masks,
        "mask_steps": masks * profile.run.steps_per_stage * len(profile.run.densities),
        "edits": edits,
        "edit_steps": edits * profile.edit.steps,
        "facts": profile.edit.facts_count,
    }


def load_circuits(out: str | Path) -> dict[str, Circuit]:
    """Every saved circuit of a run, labelled ``task@density``."""
    root = Path(out) / "circuits"
    return {p.name: Circuit.load(p) for p in sorted(root.iterdir()) if (p / "circuit.json").is_file()} if root.is_dir() else {}


FACT_METRICS = ("success", "delta_nll_new", "delta_nll_old")
LOCALITY_METRICS = ("unchanged", "kl", "delta_nll")
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student t, 97.5 %, df 1..10


def _t_interval(values: Sequence[float]) -> tuple[float, float]:
    """A 95 % t-interval of the mean of ``values`` (e.g. one mean per seed); NaNs with fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    t = T_975[len(x) - 2] if len(x) - 1 <= len(T_975) else 1.96
    half = t * float(x.std(ddof=1)) / math.sqrt(len(x))
    return float(x.mean()) - half, float(x.mean()) + half


def _with_units(items: pd.DataFrame) -> pd.DataFrame:
    """Add ``unit``, the independent unit of the fact-level interval: the hyponym (a fact's rows from every
    seed and paraphrase together), else the example of that seed."""
    fallback = items["seed"].astype(str) + ":" + items["item"].astype(str)
    unit = items["hyponym"].where(items["hyponym"].notna(), fallback) if "hyponym" in items else fallback
    return items.assign(unit=unit.astype(str))


def _metrics(part: pd.DataFrame) -> list[str]:
    return [m for m in (*FACT_METRICS, *LOCALITY_METRICS) if m in part and part[m].notna().any()]


def summarize_edits(items: pd.DataFrame) -> pd.DataFrame:
    """Per (task, density, selection, set, metric): the mean over facts and seeds with a 95 % bootstrap
    interval over facts (``ci_low`` / ``ci_high``; a fact's rows from every seed are resampled together),
    and the mean of the per-seed means with a 95 % t-interval over seeds (``seed_ci_low`` / ``seed_ci_high``)."""
    from patchscopes.statistics import estimate

    if items.empty:
        return pd.DataFrame()
    items = _with_units(items)
    rows = []
    for (task, density, selection, kind), part in items.groupby(["task", "density", "selection", "set"], sort=False):
        for metric in _metrics(part):
            values = part.dropna(subset=[metric])
            est = estimate(values, {"kind": "mean", "column": metric, "cluster": "unit"})
            per_seed = values.groupby("seed")[metric].mean()
            low, high = _t_interval(per_seed.to_list())
            rows.append({
                "task": task, "density": density, "selection": selection, "set": kind, "metric": metric,
                "mean": est.value, "ci_low": est.low, "ci_high": est.high, "n_units": est.n, "n_rows": len(values),
                "n_seeds": len(per_seed), "seed_mean": float(per_seed.mean()), "seed_ci_low": low, "seed_ci_high": high,
            })  # fmt: skip
    return pd.DataFrame(rows)


def contrast_edits(items: pd.DataFrame, against: Sequence[str] = ("complement", "random")) -> pd.DataFrame:
    """Circuit minus each of ``against``, paired on the same (seed, item): the mean difference with a 95 %
    bootstrap interval over facts and a t-interval over the per-seed mean differences."""
    from patchscopes.statistics import estimate

    if items.empty or "circuit" not in set(items["selection"]):
        return pd.DataFrame()
    items = _with_units(items)
    rows = []
    for (task, density, kind), part in items.groupby(["task", "density", "set"], sort=False):
        for other in [b for b in against if b in set(part["selection"])]:
            for metric in _metrics(part):
                values = part.dropna(subset=[metric])
                stat = {"kind": "paired_difference", "column": metric, "by": "selection", "a": "circuit", "b": other,
                        "pair": ["seed", "unit", "item"], "cluster": "unit"}  # fmt: skip
                est = estimate(values, stat)
                wide = values.pivot_table(index=["seed", "item"], columns="selection", values=metric)[["circuit", other]]
                per_seed = (wide["circuit"] - wide[other]).groupby("seed").mean()
                low, high = _t_interval(per_seed.to_list())
                rows.append({
                    "task": task, "density": density, "set": kind, "metric": metric, "contrast": f"circuit - {other}",
                    "mean": est.value, "ci_low": est.low, "ci_high": est.high, "n_units": est.n, "n_seeds": len(per_seed),
                    "seed_ci_low": low, "seed_ci_high": high,
                })  # fmt: skip
    return pd.DataFrame(rows)


def _single_report(out: Path) -> dict[str, pd.DataFrame]:
    store = ResultStore.reopen(out)
    circuits = load_circuits(out)
    tables: dict[str, pd.DataFrame] = {}
    recorded = store.frame("composition")  # recorded at discovery; runs made before have only the files
    known = set(recorded["circuit"]) if len(recorded) else set()
    comp = [df for df in (recorded, *(_composition(k, c) for k, c in circuits.items() if k not in known)) if len(df)]
    if comp:
        tables["composition"] = pd.concat(comp, ignore_index=True)
    if circuits:  # overlap needs the circuit files
        tables["overlap"] = analysis.overlap(circuits)
    for name in ("faithfulness", "eap", "edits", "history", "eap_edges", "edit_items"):
        df = store.frame(name)
        if len(df):
            tables[name] = df
    if "edits" in tables:  # rows stored before the pooled locality columns held the first set's values
        edits = tables["edits"]
        records = [{str(k): v for k, v in row.items()} for row in edits.to_dict("records")]
        pooled = pd.DataFrame([pool_locality(row) for row in records], index=edits.index)
        for column in map(str, pooled.columns):
            edits[column] = pooled[column].combine_first(edits[column]) if column in edits else pooled[column]
    if "faithfulness" in tables:  # the balance table: measured later for runs recorded before the column
        tables["faithfulness"] = _with_balance(tables["faithfulness"], store.frame("balance"))
    return tables


def _add_summaries(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    items = tables.get("edit_items")
    if items is not None and len(items):
        tables["edit_summary"] = summarize_edits(items)
        contrasts = contrast_edits(items)
        if len(contrasts):
            tables["edit_contrasts"] = contrasts
    return tables


def report(out: str | Path, figures: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """Composition (three measures), overlaps, faithfulness, EAP curves and edits as tables, plus figures.

    ``out`` is one run directory, or a profile run (``seed-<k>`` run directories, see :func:`run_profile`):
    then every table is concatenated over seeds with a ``seed`` column, and ``edit_summary`` /
    ``edit_contrasts`` aggregate the edits over seeds and facts (means and 95 % intervals)."""
    from patchscopes.circuits import figures as figs

    out = Path(out)
    seeds = seed_dirs(out)
    if (out / "config.json").is_file():
        tables = _add_summaries(_single_report(out))
        if figures is not None:
            figs.write_all(tables, Path(figures))
    elif seeds:
        parts: dict[str, list[pd.DataFrame]] = {}
        for directory in seeds:
            own = _single_report(directory)
            if figures is not None:  # circuits, faithfulness and EAP per seed; the edits over all seeds below
                figs.write_all({k: v for k, v in own.items() if k != "edits"}, Path(figures) / directory.name)
            for name, df in own.items():
                df = df.reset_index(names="circuit") if name == "overlap" else df.copy()
                if "seed" not in df:
                    df.insert(0, "seed", int(directory.name[5:]))
                parts.setdefault(name, []).append(df)
        tables = _add_summaries({name: pd.concat(dfs, ignore_index=True) for name, dfs in parts.items()})
        if figures is not None and "edits" in tables:
            figs.write_all({"edits": tables["edits"]}, Path(figures))
    else:
        raise CircuitError(
            f"{out} is not a circuits run directory (no config.json); run `patchscopes circuits discover --out {out}`"
        )
    return tables
