"""CLI: ``patchscopes eval cross-model``, ``patchscopes eval multihop``, ``patchscopes maps list|fit``.

The commands parse and print; :mod:`patchscopes.evals.cross_model`, :mod:`patchscopes.evals.multihop` and
:mod:`patchscopes.crossmodel` compute.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from patchscopes.cli_options import DEFAULT_DEVICE, DEFAULT_DTYPE, Device, DeviceMap, Dtype, OutDir, load

console = Console()
maps_app = typer.Typer(help="Named affine maps between two models' layers (fit, list).", no_args_is_help=True)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


NormRatio = Annotated[
    Optional[float],
    typer.Option(help="Drop positions whose state norm exceeds this multiple of the median (massive activations), e.g. 10."),
]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def cross_model(
    source: Annotated[str, typer.Option(help="Model A (whose hidden states are read).")] = "SmolLM2-135M",
    target: Annotated[str, typer.Option(help="Model B (which decodes them).")] = "Gemma-3-270M",
    layer_step: Annotated[
        int, typer.Option(min=1, help="Sample every n-th layer of each model (plus the last) for the grid.")
    ] = 5,
    source_layers: Annotated[str, typer.Option(help="Explicit source layers, e.g. 0,6,12 (overrides --layer-step).")] = "",
    target_layers: Annotated[str, typer.Option(help="Explicit target layers (overrides --layer-step).")] = "",
    n_fit_texts: Annotated[int, typer.Option(min=1, help="WikiText snippets to fit the maps on (10% held out for R²).")] = 400,
    n_eval_texts: Annotated[int, typer.Option(min=1, help="Other snippets for next-token Precision@1.")] = 100,
    n_entities: Annotated[
        int, typer.Option(min=0, help="Entities (half popular, half rare) for the description evaluation.")
    ] = 40,
    entity_layers: Annotated[str, typer.Option(help="Layers ℓ = ℓ* for entity description.")] = "0,1,2,3,4,5,6,7,8,9",
    ridge: Annotated[float, typer.Option(min=0.0, help="Ridge penalty of the least-squares fit (0 = ordinary).")] = 0.0,
    ridge_grid: Annotated[
        str, typer.Option(help="Relative ridge penalties tried per pair (× mean diagonal of XᵀX); best held-out R² kept.")
    ] = "0.0001,0.001,0.01,0.1",
    max_norm_ratio: NormRatio = None,
    dtype: Dtype = "float32",
    device: Device = DEFAULT_DEVICE,
    device_map: DeviceMap = None,
    out: Annotated[Path, OutDir("Run directory (resumable).")] = Path("runs/cross-model"),
    maps_root: Annotated[Optional[Path], typer.Option(help="Map store (default: PATCHSCOPES_MAPS or <cache>/maps).")] = None,
    quick: Annotated[bool, typer.Option(help="A one-minute smoke profile (few texts, layers and entities).")] = False,
) -> None:
    """Cross-model Patchscopes: Precision@1 over layer pairs (paper App. E) and entity-description RougeL (Fig. 3)."""
    from patchscopes.evals.cross_model import CrossModelConfig, plot_results, run_cross_model

    config = CrossModelConfig(
        source, target, layer_step, n_fit_texts, n_eval_texts, n_entities, _ints(entity_layers), ridge, dtype=dtype,
        source_layers=_ints(source_layers), target_layers=_ints(target_layers), ridge_grid=_floats(ridge_grid),
        max_norm_ratio=max_norm_ratio,
    )  # fmt: skip
    if quick:
        config = replace(
            config, layer_step=14, n_fit_texts=60, n_eval_texts=4, n_entities=2, entity_layers=(2,), ridge=1.0, max_new_tokens=8
        )
    summary = run_cross_model(config, out, maps_root, progress=True, log=console.print, device=device, device_map=device_map)
    plots = plot_results(_store(out), source, target)
    nt = summary.get("next_token", {})
    if nt:
        console.print(
            f"Precision@1: best {nt['best_precision_at_1']:.3f} at (ℓ, ℓ*) = {tuple(nt['best_pair'])}, "
            f"mean over the grid {nt['mean_precision_at_1']:.3f}, {nt['n_texts']} texts"
        )
    table = Table(title="entity description RougeL by layer")
    table.add_column("setting")
    for name, curve in summary.get("entity_rougeL", {}).items():
        if len(table.columns) == 1:
            for layer in curve:
                table.add_column(f"ℓ={layer}", justify="right")
        table.add_row(name, *[f"{v:.3f}" for v in curve.values()])
    console.print(table)
    console.print(f"wrote {out / 'summary.json'}" + "".join(f", {p}" for p in plots))


def _store(out: Path):  # noqa: ANN202
    from patchscopes.results import ResultStore

    return ResultStore.reopen(out)


def multihop(
    model: Annotated[str, typer.Option(help="Registry name, local directory or hub id.")] = "SmolLM2-135M",
    max_per_combo: Annotated[
        int, typer.Option(min=0, help="At most this many queries per relation pair (seeded sample; 0 = every buildable query).")
    ] = 30,
    max_queries: Annotated[int, typer.Option(min=0, help="Evaluate at most this many filtered queries (0 = all).")] = 0,
    layer_step: Annotated[int, typer.Option(min=1, help="Every n-th layer (plus the last) as ℓ and ℓ*.")] = 3,
    dtype: Dtype = "float32",
    device: Device = DEFAULT_DEVICE,
    device_map: DeviceMap = None,
    out: Annotated[Path, OutDir("Run directory (resumable).")] = Path("runs/multihop"),
    quick: Annotated[bool, typer.Option(help="A one-minute smoke profile.")] = False,
    random_control: Annotated[
        bool, typer.Option(help="Also patch another query's π1 state (a different bridge entity) on the same grid.")
    ] = True,
) -> None:
    """Multi-hop CoT Patchscope vs vanilla and "Let's think step by step" (paper §5), oracle and held-out."""
    from patchscopes.evals.multihop import MultihopConfig, plot_results, run_multihop

    config = MultihopConfig(model, max_per_combo, max_queries, layer_step, dtype=dtype, random_control=random_control)
    if quick:
        config = replace(config, max_per_combo=2, max_queries=2, layer_step=15, max_new_tokens=8)
    summary = run_multihop(config, out, log=console.print, device=device, device_map=device_map)
    plots = plot_results(_store(out), model)
    table = Table(title=f"multi-hop accuracy, {model} ({summary.get('n_evaluated', 0)} queries with both hops answered)")
    table.add_column("method")
    table.add_column("accuracy", justify="right")
    if summary.get("n_evaluated"):
        held = summary["patchscope_heldout"]
        table.add_row("vanilla", f"{summary['vanilla']:.3f}")
        table.add_row("Let's think step by step", f"{summary['cot_prompt']:.3f}")
        table.add_row("CoT Patchscope, ORACLE (best pair per query)", f"{summary['patchscope_oracle']:.3f}")
        table.add_row("CoT Patchscope, one pair chosen on held-out half", f"{held['accuracy']:.3f}")
        if "random_patch_heldout" in summary:
            table.add_row("random-patch control, ORACLE", f"{summary['random_patch_oracle']:.3f}")
            table.add_row("random-patch control, held-out pair", f"{summary['random_patch_heldout']['accuracy']:.3f}")
    console.print(table)
    vs = summary.get("versus_vanilla")
    if vs:
        console.print(
            f"of {vs['vanilla_wrong']} queries vanilla gets wrong: {vs['repaired_by_cot_prompt']} repaired by the CoT prompt, "
            f"{vs['repaired_by_patchscope_oracle']} by the Patchscope oracle, {vs['repaired_by_patchscope_heldout_pair']} by "
            f"the held-out pair; of {vs['vanilla_right']} it gets right, the held-out pair loses "
            f"{vs['lost_by_patchscope_heldout_pair']}"
        )
    console.print(f"wrote {out / 'summary.json'}" + "".join(f", {p}" for p in plots))


@maps_app.command("list")
def maps_list(root: Annotated[Optional[Path], typer.Option(help="Map store directory.")] = None) -> None:
    """List saved maps with their models, layers and held-out R²."""
    from patchscopes.crossmodel.store import MapStore

    store = MapStore(root)
    df, problems = store.scan()
    damaged = f", {len(problems)} damaged" if problems else ""
    table = Table(title=f"maps in {store.root} ({len(df)}{damaged})")
    for col in ("name", "source_layer", "target_layer", "r2", "n_fit", "corpus_sha256"):
        table.add_column(col)
    for r in df.to_dict("records"):
        r2 = "" if r["r2"] is None else f"{float(r['r2']):.3f}"
        table.add_row(
            str(r["name"]), str(r["source_layer"]), str(r["target_layer"]), r2, str(r["n_fit"]), str(r["corpus_sha256"])
        )
    console.print(table)
    for name, problem in problems.items():
        console.print(Text.assemble(("error:", "bold red"), f" map {name!r} cannot be read: {problem}"))
    if problems:
        raise typer.Exit(code=2)


@maps_app.command("fit")
def maps_fit(
    source: Annotated[str, typer.Option(help="Model A.")],
    target: Annotated[str, typer.Option(help="Model B.")],
    pairs: Annotated[str, typer.Option(help="Layer pairs ℓ:ℓ*, comma-separated, e.g. 6:4,12:8.")],
    n_texts: Annotated[int, typer.Option(min=1, help="WikiText snippets (10% held out for R²).")] = 400,
    ridge: Annotated[float, typer.Option(min=0.0, help="Ridge penalty (0 = ordinary least squares).")] = 0.0,
    max_norm_ratio: NormRatio = None,
    tag: Annotated[str, typer.Option(help="Added to the map names.")] = "",
    root: Annotated[Optional[Path], typer.Option(help="Map store directory.")] = None,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    device_map: DeviceMap = None,
) -> None:
    """Fit and save maps from SOURCE's layer ℓ to TARGET's layer ℓ* for each pair."""
    from patchscopes.crossmodel import MapStore, fit_maps
    from patchscopes.crossmodel.store import pair_name
    from patchscopes.evals.cross_model import corpus_texts

    try:
        parsed = [tuple(int(v) for v in p.split(":")) for p in pairs.split(",") if p.strip()]
    except ValueError:
        raise typer.BadParameter(f"pairs must look like 6:4,12:8, got {pairs!r}") from None
    a, b = load(source, device, dtype, device_map), load(target, device, dtype, device_map)
    report = fit_maps(a, b, corpus_texts(n_texts), parsed, ridge=ridge, progress=True, max_norm_ratio=max_norm_ratio)  # type: ignore[arg-type]
    store = MapStore(root)
    for (s, t), amap in report.maps.items():
        name = pair_name(a.name, b.name, s, t, tag)
        store.save(name, amap, overwrite=True)
        console.print(f"{name}: held-out R² {amap.metadata['r2']:.3f} ({amap.metadata['n_fit']} positions)")


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add ``eval cross-model``, ``eval multihop`` and the ``maps`` group."""
    eval_app.command("cross-model")(cross_model)
    eval_app.command("multihop")(multihop)
    app.add_typer(maps_app, name="maps")
