"""``patchscopes eval lrc``: the LRC paper's Table 5 on a bundled model (sweep on validation, then test).

patchscopes eval lrc --profile quick --out runs/lrc-quick
patchscopes eval lrc --profile default --out runs/lrc

``patchscopes eval lre``: Hernandez et al.'s LRE faithfulness and causality, β chosen on the training prompts.

patchscopes eval lre --quick --out runs/lre-quick
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from patchscopes.cli_options import DEFAULT_DEVICE, DEFAULT_DTYPE, Device, DeviceMap, Dtype, OutDir, int_list, load
from patchscopes.files import atomic_write_text

console = Console()


def _ints(text: str | None, option: str) -> tuple[int, ...] | None:
    return None if text is None else int_list(text, option)


def lrc_command(
    profile: Annotated[str, typer.Option(help="quick (CI), default (the pilot) or paper (fixed layers).")] = "default",
    model: Annotated[Optional[str], typer.Option(help="Registry name or path (default: the profile's model).")] = None,
    out: Annotated[Path, OutDir("Run directory (resumable; another configuration is refused).")] = Path("runs/lrc"),
    sweep: Annotated[
        Optional[bool], typer.Option(help="Choose layers, rank and beta on a validation split first (default: not for paper).")
    ] = None,
    relations: Annotated[Optional[str], typer.Option(help="Comma-separated relation names (the files' 'name').")] = None,
    relations_dir: Annotated[Optional[Path], typer.Option(help="Read relation JSON files from here instead.")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma-separated seeds, e.g. 42,43,44.")] = None,
    subject_layer: Annotated[Optional[int], typer.Option(help="Subject layer (without --sweep).")] = None,
    object_layer: Annotated[Optional[int], typer.Option(help="Object layer (without --sweep).")] = None,
    rank: Annotated[Optional[int], typer.Option(min=1, help="Inverse rank (without --sweep).")] = None,
    beta: Annotated[Optional[float], typer.Option(help="Steering strength (without --sweep).")] = None,
    n_lre: Annotated[Optional[int], typer.Option(min=1, help="Training prompts per LRE.")] = None,
    run_seeds: Annotated[Optional[str], typer.Option(help="Run only these of the seeds now (parallel processes).")] = None,
    figures: Annotated[Optional[Path], typer.Option(help="Also write the sweep figure into this directory.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    device_map: DeviceMap = None,
) -> None:
    """Accuracy and causality of LRC, LRC (first token, final layer), SVM and input averaging (Table 5)."""
    from patchscopes.relations.evaluate import PROFILES, run_lrc_eval
    from patchscopes.relations.report import (
        markdown_table,
        paper_table5,
        per_relation_table,
        plot_sweep,
        significance_table,
        single_sample_table,
    )
    from patchscopes.relations.sweep import SWEEP_PROFILES, SweepConfig, apply_choice, run_lrc_sweep, sweep_frame

    if profile not in PROFILES:
        raise typer.BadParameter(f"profile {profile!r} is not one of {', '.join(PROFILES)}")
    cfg = PROFILES[profile]
    overrides: dict[str, Any] = {
        "model": model,
        "relations": tuple(r.strip() for r in relations.split(",")) if relations else None,
        "relations_dir": str(relations_dir) if relations_dir else None,
        "seeds": _ints(seeds, "--seeds"),
        "subject_layer": subject_layer,
        "object_layer": object_layer,
        "rank": rank,
        "beta": beta,
        "n_lre": n_lre,
    }
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    lm = load(cfg.model, device, dtype, device_map)
    if sweep if sweep is not None else profile != "paper":
        sweep_cfg = SweepConfig(base=cfg, **SWEEP_PROFILES.get(profile, {}))
        choice = run_lrc_sweep(lm, sweep_cfg, out / "sweep", progress=progress)
        console.print(f"sweep choice (validation): {choice}")
        cfg = apply_choice(cfg, choice)
        for target in [out / "sweep.png", *([figures / "sweep.png"] if figures else [])]:
            plot_sweep(sweep_frame(out / "sweep"), target, title=f"{lm.name}: LRC validation sweep")
    summary = run_lrc_eval(lm, cfg, out / "eval", progress=progress, only_seeds=_ints(run_seeds, "--run-seeds"))
    table = markdown_table(summary, paper_table5(), model=lm.name)
    report = f"{table}\n\nPer relation:\n\n{per_relation_table(summary)}\n"
    if cfg.single_sample:
        report += f"\nTable 6 (one LRE training prompt):\n\n{single_sample_table(summary, lm.name)}\n"
    if summary.get("betas"):
        report += f"\nβ per method (validation): {summary['betas']}\n"
        report += f"\nLRC against SVM per seed (Tables 7-8):\n\n{significance_table(summary)}\n"
    atomic_write_text(out / "table.md", report)
    console.print(report)
    chosen = f"layers {cfg.subject_layer}→{cfg.object_layer}, rank {cfg.rank}, beta {cfg.beta} ({cfg.chosen_by})"
    console.print(f"{chosen}; written to {out}")


def lre_command(
    quick: Annotated[
        bool, typer.Option("--quick", help="One relation, 3 training prompts, top layers (about a minute).")
    ] = False,
    model: Annotated[Optional[str], typer.Option(help="Registry name or path (default: the profile's model).")] = None,
    out: Annotated[Path, OutDir("Run directory (resumable; another configuration is refused).")] = Path("runs/lre"),
    relations: Annotated[Optional[str], typer.Option(help="Comma-separated relation names (the files' 'name').")] = None,
    relations_dir: Annotated[Optional[Path], typer.Option(help="Read relation JSON files from here instead.")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma-separated seeds, e.g. 0,1.")] = None,
    subject_layer: Annotated[Optional[int], typer.Option(help="Subject layer (the object layer is the last block).")] = None,
    n_train: Annotated[Optional[int], typer.Option(min=2, help="Training samples per LRE (the paper: 8).")] = None,
    rank: Annotated[Optional[int], typer.Option(min=1, help="Rank of the inverse used for causality.")] = None,
    max_test: Annotated[Optional[int], typer.Option(min=1, help="Test prompts per relation and seed.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    device_map: DeviceMap = None,
) -> None:
    """LRE faithfulness and causality per relation (Hernandez et al. 2023), β chosen on the training prompts."""
    from patchscopes.relations.lre_eval import PROFILES as LRE_PROFILES
    from patchscopes.relations.lre_eval import run_lre_eval

    cfg = LRE_PROFILES["quick" if quick else "default"]
    overrides: dict[str, Any] = {
        "model": model,
        "relations": tuple(r.strip() for r in relations.split(",")) if relations else None,
        "relations_dir": str(relations_dir) if relations_dir else None,
        "seeds": _ints(seeds, "--seeds"),
        "subject_layer": subject_layer,
        "n_train": n_train,
        "rank": rank,
        "max_test": max_test,
    }
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    lm = load(cfg.model, device, dtype, device_map)
    summary = run_lre_eval(cfg, out, lm=lm, progress=progress)
    lines = ["| relation | n | faithfulness [95% CI] | β | n edits | causality [95% CI] |", "|---|---|---|---|---|---|"]
    for r in summary["per_relation"]:
        lines.append(
            f"| {r['relation']} | {r['n_faithfulness']} | {r['faithfulness']:.2f} [{r['faithfulness_low']:.2f}, "
            f"{r['faithfulness_high']:.2f}] | {r['beta_faithfulness']:g} | {r['n_causality']} | "
            + (f"{r['causality']:.2f} [{r['causality_low']:.2f}, {r['causality_high']:.2f}] |" if r["n_causality"] else "– |")
        )
    console.print("\n".join(lines))
    console.print(f"written to {out} (summary.json, relations.csv, beta.csv)")


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add ``patchscopes eval lrc`` and ``patchscopes eval lre``."""
    eval_app.command("lrc")(lrc_command)
    eval_app.command("lre")(lre_command)
