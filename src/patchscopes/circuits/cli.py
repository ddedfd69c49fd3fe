"""``patchscopes circuits discover | edit | report`` (the CLI parses and prints; ``pipeline`` computes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from patchscopes.cli_options import DEFAULT_DEVICE, DEFAULT_DTYPE, Device, DeviceMap, Dtype, OutDir, float_list, int_list, load
from patchscopes.results import write_csv

console = Console()
circuits_app = typer.Typer(help="Circuits: weight masks, edge attribution, the knowledge-edit view.", no_args_is_help=True)


def _floats(text: str, option: str = "--densities") -> tuple[float, ...]:
    return float_list(text, option)


def _config(
    model: str,
    task: list[str] | None,
    method: list[str] | None,
    densities: str,
    layers: str,
    steps: int,
    n: int,
    n_train: int,
    batch_size: int,
    lr: float,
    penalty: float,
    ig_steps: int,
    n_attr: int,
    seed: int,
    quick: bool,
    init_logit: float = 6.0,
    hard_mask: bool = False,
):  # noqa: ANN202
    from patchscopes.circuits.pipeline import RunConfig

    tasks = tuple(task or (["hierarchy"] if quick else ["subj_verb", "hierarchy"]))
    if quick:
        cfg = RunConfig.quick_profile(model, tasks)
        return RunConfig(**{**cfg.to_dict(), "methods": tuple(method or cfg.methods), "seed": seed})
    layer_list = None if layers == "all" else int_list(layers, "--layers")
    return RunConfig(model=model, tasks=tasks, methods=tuple(method or ("mask", "eap", "eap-ig")), densities=_floats(densities),
                     layers=layer_list, n_examples=n, n_train=n_train, steps_per_stage=steps, batch_size=batch_size, lr=lr,
                     penalty=penalty, init_logit=init_logit, hard_mask=hard_mask, ig_steps=ig_steps, n_attr=n_attr,
                     seed=seed)  # fmt: skip


Model = Annotated[str, typer.Option(help="Registry name, local directory or hub id.")]
Out = Annotated[Path, OutDir("Run directory (resumable; one configuration per directory).")]
Task = Annotated[Optional[list[str]], typer.Option(help="det_noun, subj_verb, sentiment, hierarchy (repeatable).")]
Method = Annotated[Optional[list[str]], typer.Option(help="mask, eap, eap-ig (repeatable; default all three).")]
Densities = Annotated[str, typer.Option(help="Target densities, largest first is not required: 0.5,0.35,0.15,0.05")]
Layers = Annotated[str, typer.Option(help="Blocks the mask covers: all, or a list like 24,25,26,27,28,29.")]
Steps = Annotated[int, typer.Option(min=1, help="Mask training steps per density stage.")]
N = Annotated[int, typer.Option(min=1, help="Examples generated per task (train + held out).")]
HardMask = Annotated[
    bool, typer.Option(help="Straight-through hard 0/1 mask samples; a circuit is the weights with logit > 0 (not the top-k).")
]
NTrain = Annotated[int, typer.Option(min=1, help="Of which used to train the mask.")]
Batch = Annotated[int, typer.Option(min=1, help="Batch size of mask training and attribution.")]
Lr = Annotated[float, typer.Option(help="Adam learning rate of the mask logits.")]
Penalty = Annotated[
    float,
    typer.Option(
        help="Weight of the density penalty |E[density] - target| (a mean over the masked weights: a larger mask needs more)."
    ),
]
IgSteps = Annotated[int, typer.Option(min=1, help="Interpolation steps of EAP-IG.")]
NAttr = Annotated[int, typer.Option(min=1, help="Held-out examples used for EAP / EAP-IG and their curves.")]
Seed = Annotated[int, typer.Option(help="Seed of data, sampling and random baselines.")]
InitLogit = Annotated[
    float,
    typer.Option(help="Starting mask logit: 6 keeps ~99.8 % of weights per sample; 3 breaks SmolLM2 when all blocks are masked."),
]
Quick = Annotated[bool, typer.Option(help="CI profile: last block, 2 steps per stage, 16 examples, densities 0.5 and 0.05.")]


@circuits_app.command("discover")
def discover_cmd(
    model: Model = "SmolLM2-135M", out: Out = Path("runs/circuits/smol"), task: Task = None, method: Method = None,
    densities: Densities = "0.5,0.35,0.15,0.05", layers: Layers = "all", steps: Steps = 25, n: N = 200, n_train: NTrain = 120,
    batch_size: Batch = 8, lr: Lr = 0.6, penalty: Penalty = 10000.0, ig_steps: IgSteps = 5, n_attr: NAttr = 32,
    seed: Seed = 0, quick: Quick = False, init_logit: InitLogit = 6.0, hard_mask: HardMask = False,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    device_map: DeviceMap = None,
) -> None:  # fmt: skip
    """Find circuits: a weight mask trained through decreasing densities, and EAP / EAP-IG edge scores."""
    from patchscopes.circuits.pipeline import discover

    cfg = _config(
        model, task, method, densities, layers, steps, n, n_train, batch_size, lr, penalty, ig_steps, n_attr, seed, quick,
        init_logit, hard_mask,
    )  # fmt: skip
    lm = load(model, device, dtype, device_map)
    discover(lm, cfg, out, log=lambda m: console.print(m, markup=False, highlight=False))
    console.print(f"done: {out}")


EditTask = Annotated[
    Optional[list[str]], typer.Option(help="Whose circuits take the edit (repeatable; default: every task with circuits in OUT).")
]
EditMaxNorm = Annotated[
    Optional[float],
    typer.Option(help="Matched update budget: δ is projected onto ‖δ‖₂ ≤ this after every step, for every weight set."),
]
NFacts = Annotated[
    Optional[int], typer.Option(min=1, help="Insert the first N held-out facts (default: all 150; 16 with --quick).")
]
Seeds = Annotated[Optional[str], typer.Option(help="Seeds, one run directory OUT/seed-<k> each (default: the profile's).")]
LocalityTask = Annotated[
    Optional[list[str]],
    typer.Option(help="Tasks whose known, unedited examples test locality (repeatable; default hierarchy and subj_verb)."),
]


@circuits_app.command("edit")
def edit_cmd(
    model: Model = "SmolLM2-135M", out: Out = Path("runs/circuits/smol"), task: Task = None, method: Method = None,
    densities: Densities = "0.5,0.35,0.15,0.05", layers: Layers = "all", steps: Steps = 25, n: N = 200, n_train: NTrain = 120,
    batch_size: Batch = 8, lr: Lr = 0.6, penalty: Penalty = 10000.0, ig_steps: IgSteps = 5, n_attr: NAttr = 32,
    seed: Seed = 0, quick: Quick = False, init_logit: InitLogit = 6.0, hard_mask: HardMask = False,
    circuit_task: EditTask = None,
    edit_steps: Annotated[int, typer.Option(min=1, help="Fine-tuning steps of each edit.")] = 20,
    edit_lr: Annotated[float, typer.Option(help="Adam learning rate of the edit.")] = 1e-3,
    edit_max_norm: EditMaxNorm = None, n_facts: NFacts = None,
    n_locality: Annotated[int, typer.Option(min=1, help="Known examples per locality task.")] = 40,
    locality_task: LocalityTask = None,
    paraphrases: Annotated[bool, typer.Option(help="Also evaluate each fact in the paraphrase wordings.")] = True,
    edit_densities: Annotated[Optional[str], typer.Option(help="Edit only these densities' circuits (default: all).")] = None,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    device_map: DeviceMap = None,
) -> None:  # fmt: skip
    """Insert held-out 'X is a kind of Y' facts through each task's circuits, their complements and random sets of their size."""
    from patchscopes.circuits.pipeline import EditConfig, edit

    cfg = _config(
        model, task, method, densities, layers, steps, n, n_train, batch_size, lr, penalty, ig_steps, n_attr, seed, quick,
        init_logit, hard_mask,
    )  # fmt: skip
    edit_cfg = EditConfig(
        steps=edit_steps, lr=edit_lr, max_norm=edit_max_norm, n_facts=n_facts if n_facts or not quick else 16,
        paraphrases=paraphrases, n_locality=n_locality,
        locality_tasks=tuple(locality_task or ("hierarchy", "subj_verb")),
        densities=_floats(edit_densities, "--edit-densities") if edit_densities else None,
    )  # fmt: skip
    edit_cfg.check()  # before the model loads
    lm = load(model, device, dtype, device_map)
    edit(lm, cfg, out, edit_cfg, tasks=circuit_task, log=lambda m: console.print(m, markup=False, highlight=False))


@circuits_app.command("run")
def run_cmd(
    profile: Annotated[str, typer.Option(help="paper: the full knowledge-edit experiment; quick: a CI-sized version.")] = "paper",
    model: Model = "SmolLM2-135M",
    out: Out = Path("runs/circuits/paper"),
    seeds: Seeds = None,
    task: Annotated[
        Optional[list[str]], typer.Option(help="Run only these of the profile's tasks (repeatable), e.g. to share the run.")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the profile and its amount of work; load no model, run nothing.")] = False,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    device_map: DeviceMap = None,
) -> None:
    """Discover and edit for every seed of a profile (resumable), then aggregate with `patchscopes circuits report`."""
    import json

    from patchscopes.circuits.pipeline import get_profile, plan, profile_tasks, run_profile

    chosen = get_profile(profile, model, int_list(seeds, "--seeds") if seeds else None)
    profile_tasks(chosen, task)  # a task outside the profile fails before the model loads
    if dry_run:
        console.print_json(json.dumps({**chosen.to_dict(), "plan": plan(chosen)}, default=str))
        return
    lm = load(model, device, dtype, device_map)
    run_profile(lm, chosen, out, log=lambda m: console.print(m, markup=False, highlight=False), tasks=task)
    console.print(f"done: {out}; aggregate with `patchscopes circuits report --out {out}`")


#: Columns left out of the printed tables (they are in the CSV files).
HIDDEN = {"n_params", "n_modules", "lr", "n_facts", "final_loss", "total_abs_change", "max_norm", "n_projected", "seconds"}
HIDDEN |= {f"{p}{m}" for p in ("", "paraphrase_") for m in ("nll_new_pre", "nll_old_pre", "nll_new_post", "nll_old_post")}


@circuits_app.command("report")
def report_cmd(
    out: Out = Path("runs/circuits/smol"),
    figures: Annotated[Optional[Path], typer.Option(help="Write the figures here (default: OUT/figures).")] = None,
) -> None:
    """Tables (composition both ways, overlap, faithfulness, EAP curves, edits and their summary over seeds and
    facts) and figures of a run, or of a profile run's seed directories."""
    from patchscopes.circuits.pipeline import report

    tables = report(out, figures if figures is not None else out / "figures")
    for name, df in tables.items():
        if name in ("history", "eap_edges", "edit_items"):
            continue
        table = Table(title=name)
        frame = df.reset_index() if name == "overlap" else df
        cols = [c for c in frame.columns if c not in HIDDEN]
        for c in cols:
            table.add_column(str(c))
        for _, row in frame[cols].iterrows():
            table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
        console.print(table)
        (out / f"{name}.csv").parent.mkdir(parents=True, exist_ok=True)
        write_csv(out / f"{name}.csv", df, index=True)


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Plug ``circuits`` into the main CLI."""
    app.add_typer(circuits_app, name="circuits")
