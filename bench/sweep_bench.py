"""Benchmark: layer × layer Patchscope sweeps, four implementations on the same inputs, in one process.

1. straightforward — one source forward and one patched target forward per (example, ℓ, ℓ*), batch size 1,
   as the official code does (generation continues from the KV cache);
2. nnsight — the sweep as nnsight's docs teach it: texts batched as invokes of one trace, saving only the
   states needed, then one trace (or generate call) per target layer over a batch of targets;
3. nnterp — its ``patchscope_lens``, for case (a), where it applies (needs ``pip install nnterp`` and an
   nnsight release nnterp imports; the row says why when it does not run);
4. ours — ``patchscopes.run_many`` with the fast engine.

Prints wall time, speed-ups, peak memory (RSS above the loaded model), the largest |Δ logit| between
outputs, whether greedy texts are identical, and achieved FLOP/s against this machine's measured fp32 matmul
peak. The straightforward loop may run on a random subset of the items (``--baseline-limit``), the batched
baselines on the items of the first texts (``--batched-texts``: whole texts, so that their batches stay
full); their time is then extrapolated linearly, and outputs are compared on that part — the printout says so.

    python bench/sweep_bench.py                 # cases a, b, c and the 1,000-text memory check
    python bench/sweep_bench.py --cases a --baseline-limit 300
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

import patchscopes as ps
from patchscopes.capture import capture
from patchscopes.datasets import data_files
from patchscopes.evals.attribute_data import load_attribute_task
from patchscopes.patching import Patch, PatchedRun, run_patched
from patchscopes.plan import resolve_step
from patchscopes.scope import Patchscope, PatchscopeResult


class PeakRSS:
    """Samples the process RSS every 5 ms; ``peak`` is the maximum seen while active."""

    def __init__(self) -> None:
        self.process = psutil.Process(os.getpid())
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class FlopCounter:
    """Counts the matmul FLOPs of real block and unembedding calls (2 × parameters × tokens; attention scores excluded)."""

    def __init__(self, lm: ps.ModelHandle) -> None:
        self.flops = 0
        self.handles = []
        for block in lm.adapter.blocks:
            params = sum(p.numel() for p in block.parameters() if p.dim() > 1)
            self.handles.append(block.register_forward_hook(self._hook(params)))
        head = lm.adapter.unembed
        self.handles.append(head.register_forward_hook(self._hook(head.weight.numel())))

    def _hook(self, params: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor):
                self.flops += 2 * params * x.shape[0] * x.shape[1]

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def matmul_peak(
    seconds: float = 3.0,
    n: int = 2048,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    shape: tuple[int, int] | None = None,
) -> float:
    """Measured GFLOP/s of torch.mm on this device and dtype (best of repeated runs): n x n by n x n, or
    [n x k] by [k x m] for ``shape=(k, m)``."""
    k, m = shape or (n, n)
    a, b = torch.randn(n, k, device=device, dtype=dtype), torch.randn(k, m, device=device, dtype=dtype)
    torch.mm(a, b)
    best, end = 0.0, time.time() + seconds
    while time.time() < end:
        t = time.perf_counter()
        torch.mm(a, b)
        if a.device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n * k * m / (time.perf_counter() - t))
    return best / 1e9


# --- the three implementations -------------------------------------------------------------------------


def straightforward(lm: ps.ModelHandle, scopes: list[Patchscope]) -> list[tuple[torch.Tensor, list[int]]]:
    """One full source forward and one patched target forward per scope, batch size 1."""
    out = []
    for scope in scopes:
        r = resolve_step(scope, lm, lm)
        [h] = capture(
            lm, [r.source_ids], [r.source_positions], [lm.n_layers - 1, r.source_layer]
        )  # a full forward, as the official code
        vec = r.mapping(h[1])
        max_new = scope.decoding.max_new_tokens if isinstance(scope.decoding, ps.Generate) else 0
        [o] = run_patched(
            lm, [PatchedRun(r.target_ids, [Patch(r.target_layer, r.target_positions, vec)])], max_new_tokens=max_new, batch_size=1
        )
        out.append((o.logits, o.generated))
    return out


def left_padding_tokenizer(lm: ps.ModelHandle) -> object:
    """The model's tokenizer padding on the left, as nnsight and nnterp expect when they load one themselves."""
    tokenizer = copy.copy(lm.tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


def _target_layer(scope: Patchscope) -> int:
    layer = scope.target.layer if isinstance(scope.target.layer, int) else scope.source.layer
    return int(layer)  # type: ignore[call-overload]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _write_patch(block: object, r: object, states: dict) -> None:
    """Inside an invoke: write the source state into ``block``'s output at the target positions (left padding)."""
    h = block.output  # type: ignore[attr-defined]
    h = h[0] if isinstance(h, tuple) else h
    ids = r.target_ids  # type: ignore[attr-defined]
    h[0, [p - len(ids) for p in r.target_positions]] = states[(tuple(r.source_ids), r.source_layer)]  # type: ignore[attr-defined]


def nnsight_batched(lm: ps.ModelHandle, scopes: list[Patchscope], batch: int = 32) -> list[tuple[torch.Tensor, list[int]]]:
    """What nnsight's docs teach: texts batched as invokes of one trace, saving only the states needed, then
    for each target layer one trace per batch of targets, each invoke patched with its vector."""
    import nnsight
    from nnsight import LanguageModel

    model = LanguageModel(lm.model, tokenizer=left_padding_tokenizer(lm))
    layers = model.model.layers
    resolved = [resolve_step(scope, lm, lm) for scope in scopes]
    wanted: dict[tuple[int, ...], tuple[list[int], set[int]]] = {}
    for r in resolved:
        wanted.setdefault(tuple(r.source_ids), (list(r.source_positions), set()))[1].add(r.source_layer)
    states: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}
    for part in _chunks(list(wanted.items()), batch):
        with model.trace() as tracer:
            saved = nnsight.save({})
            for ids, (positions, needed) in part:
                with tracer.invoke(list(ids)):
                    for layer in sorted(needed):
                        h = layers[layer].output
                        h = h[0] if isinstance(h, tuple) else h
                        saved[(ids, layer)] = h[0, [p - len(ids) for p in positions]].clone()  # left padding
        states.update(saved)
    out: list[tuple[torch.Tensor, list[int]] | None] = [None] * len(scopes)
    by_layer: dict[int, list[int]] = {}
    for i, r in enumerate(resolved):
        by_layer.setdefault(r.target_layer, []).append(i)
    for layer, members in sorted(by_layer.items()):
        for part in _chunks(members, batch):
            max_new = scopes[part[0]].decoding.max_new_tokens if isinstance(scopes[part[0]].decoding, ps.Generate) else 0
            if max_new:
                with model.generate(
                    max_new_tokens=max_new, do_sample=False, pad_token_id=lm.pad_id, eos_token_id=sorted(lm.eos_ids)
                ) as tracer:
                    logits = nnsight.save({})
                    for row, i in enumerate(part):
                        with tracer.invoke(list(resolved[i].target_ids)):
                            _write_patch(layers[layer], resolved[i], states)
                            logits[row] = model.lm_head.output[0, -1].clone()  # not a view of the batch's logits
                    with tracer.invoke():
                        sequences = nnsight.save(tracer.result)
            else:
                with model.trace() as tracer:
                    logits = nnsight.save({})
                    for row, i in enumerate(part):
                        with tracer.invoke(list(resolved[i].target_ids)):
                            _write_patch(layers[layer], resolved[i], states)
                            logits[row] = model.lm_head.output[0, -1].clone()  # not a view of the batch's logits
            width = max(len(resolved[i].target_ids) for i in part)
            for row, i in enumerate(part):
                generated: list[int] = []
                if max_new:
                    for token in sequences[row, width : width + max_new].tolist():
                        if token in lm.eos_ids:
                            break
                        generated.append(int(token))
                out[i] = (logits[row].float(), generated)
    return [o for o in out if o is not None]


def nnterp_lens(lm: ps.ModelHandle, scopes: list[Patchscope]) -> list[tuple[torch.Tensor, list[int]]]:
    """nnterp's ``patchscope_lens`` (case a only: the last source token patched into one target, ℓ* = ℓ).

    It returns next-token probabilities; their logarithms stand in for logits (the comparison is then of
    log-probabilities, which the printout says).
    """
    from nnterp import StandardizedTransformer
    from nnterp.interventions import TargetPrompt, patchscope_lens

    model = StandardizedTransformer(lm.model, tokenizer=left_padding_tokenizer(lm), check_renaming=False)
    target = scopes[0].target
    by_text: dict[str, list[int]] = {}
    for i, scope in enumerate(scopes):
        by_text.setdefault(scope.source.prompt, []).append(i)
    out: list[tuple[torch.Tensor, list[int]] | None] = [None] * len(scopes)
    layers = sorted({int(scope.source.layer) for scope in scopes})  # type: ignore[call-overload]
    texts = list(by_text)
    for part in _chunks(texts, 32):
        probs = patchscope_lens(model, part, TargetPrompt(target.prompt, -1), layers=layers)  # [n, layers, V]
        for row, text in enumerate(part):
            for i in by_text[text]:
                out[i] = (probs[row, layers.index(int(scopes[i].source.layer))].float().log(), [])  # type: ignore[call-overload]
    return [o for o in out if o is not None]


def ours(lm: ps.ModelHandle, scopes: list[Patchscope]) -> list[tuple[torch.Tensor, list[int]]]:
    results: list[PatchscopeResult] = []
    chunk = 2048
    for start in range(0, len(scopes), chunk):
        results += ps.run_many(scopes[start : start + chunk], lm, batch_size=128, executor="fast")
    return [(r.logits, r.generated_ids) for r in results]


# --- cases ---------------------------------------------------------------------------------------------


def texts(n: int, seed: int = 0) -> list[str]:
    pool: list[str] = []
    for path in data_files("patchscopes/", ".tsv"):
        pool += [s.prompt_source.strip() for s in load_attribute_task(path).samples]
    pool = sorted({t for t in pool if 30 <= len(t) <= 300})
    random.Random(seed).shuffle(pool)
    return pool[:n]


def case_scopes(lm: ps.ModelHandle, case: str) -> list[Patchscope]:
    L = lm.n_layers
    if case == "a":
        return [ps.TOKEN_IDENTITY.scope(t, layer=layer) for t in texts(200) for layer in range(L)]
    if case == "b":
        return [ps.TOKEN_IDENTITY.scope(t, layer=ls, target_layer=lt) for t in texts(8) for ls in range(L) for lt in range(L)]
    if case == "c":
        task = load_attribute_task(next(p for p in data_files("patchscopes/", ".tsv") if p.stem == "country_currency"))
        layers = list(range(0, L, 3))
        out = []
        for s in task.samples[:4]:
            preset = ps.attribute(s.prompt_target, max_new_tokens=20)
            out += [
                preset.scope(s.prompt_source, layer=ls, position=s.source_position, target_layer=lt)
                for ls in layers
                for lt in layers
            ]
        return out
    raise ValueError(case)


@dataclass
class Measured:
    seconds: float
    peak_mb: float
    gflops: float
    outputs: list[tuple[torch.Tensor, list[int]]]
    items: int


def measure(lm: ps.ModelHandle, fn: Callable, scopes: list[Patchscope], baseline_rss: int) -> Measured:
    counter = FlopCounter(lm)
    with PeakRSS() as rss:
        start = time.perf_counter()
        outputs = fn(lm, scopes)
        seconds = time.perf_counter() - start
    counter.close()
    return Measured(seconds, (rss.peak - baseline_rss) / 2**20, counter.flops / 1e9, outputs, len(scopes))


def compare(a: list, b: list, log_probs: bool = False) -> tuple[float, bool]:
    """Largest |Δ logit| (or |Δ log-probability|) and whether every greedy text is identical."""

    def space(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x.float(), -1) if log_probs else x

    worst = max(((space(x[0]) - space(y[0])).abs().max().item() for x, y in zip(a, b)), default=0.0)
    return worst, all(x[1] == y[1] for x, y in zip(a, b))


def block_matmul_shape(lm: ps.ModelHandle) -> tuple[int, int]:
    """(in, out) of the widest linear map in a block: the matmul shape that dominates a block's cost."""
    shapes = [tuple(p.shape) for p in lm.adapter.blocks[0].parameters() if p.dim() == 2]
    out_features, in_features = max(shapes, key=lambda s: s[0] * s[1])
    return min(in_features, out_features), max(in_features, out_features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="abc")
    parser.add_argument(
        "--baseline-limit", type=int, default=0, help="run the baselines on this many random items per case (0 = all)"
    )
    parser.add_argument(
        "--batched-texts", type=int, default=64, help="run the batched baselines on the items of this many texts (0 = all)"
    )
    parser.add_argument(
        "--batched-limit", type=int, default=300, help="at most this many items for the batched baselines (0 = no limit)"
    )
    parser.add_argument("--memory-texts", type=int, default=1000, help="texts for the memory check (0 = skip)")
    parser.add_argument("--skip-nnsight", action="store_true")
    parser.add_argument("--model", default="SmolLM2-135M", help="registry name, directory or hub id")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16, auto")
    args = parser.parse_args()

    torch.manual_seed(0)
    lm = ps.load_model(args.model, device=args.device, dtype=args.dtype)
    model_mb = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
    peak = matmul_peak(device=str(lm.device), dtype=lm.dtype)
    k, m = block_matmul_shape(lm)
    at_shapes = {rows: matmul_peak(2.0, rows, str(lm.device), lm.dtype, (k, m)) for rows in (32, 128, 512, 1024)}
    print(
        f"machine: {os.cpu_count()} CPUs visible, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {lm.device}; measured {lm.dtype} matmul peak {peak:.1f} GFLOP/s at 2048²; at the engine's shapes "
        f"[rows × {k}] × [{k} × {m}]: "
        + ", ".join(f"{rows} rows {g:.1f}" for rows, g in at_shapes.items())
        + f" GFLOP/s; model {lm.name} {lm.dtype}, {model_mb:.0f} MiB of weights"
    )
    baseline_rss = psutil.Process().memory_info().rss
    for case in args.cases:
        scopes = case_scopes(lm, case)
        subset = list(range(len(scopes)))  # the straightforward loop runs one item at a time: any sample will do
        if args.baseline_limit and args.baseline_limit < len(scopes):
            subset = sorted(random.Random(1).sample(subset, args.baseline_limit))
        first_texts = list(dict.fromkeys(scope.source.prompt for scope in scopes))[: args.batched_texts or None]
        kept = set(first_texts)  # batched baselines need whole texts (every layer of each), or their batches shrink
        text_subset = [i for i, scope in enumerate(scopes) if scope.source.prompt in kept]
        if args.batched_limit and len(text_subset) > args.batched_limit:  # whole traces: the first target layers' items
            text_subset = sorted(sorted(text_subset, key=lambda i: _target_layer(scopes[i]))[: args.batched_limit])
        print(
            f"\ncase ({case}): {len(scopes)} Patchscopes; the straightforward loop on {len(subset)} of them, the batched "
            f"baselines on {len(text_subset)} items of the first {len(first_texts)} texts; their times are extrapolated "
            "linearly where they ran on a part"
        )
        mine = measure(lm, ours, scopes, baseline_rss)
        runs = {"ours (fast engine)": (mine, list(range(len(scopes))))}
        runs["straightforward"] = (measure(lm, straightforward, [scopes[i] for i in subset], baseline_rss), subset)
        baselines: dict[str, Callable] = {}
        if not args.skip_nnsight:
            baselines["nnsight (batched)"] = nnsight_batched
            if case == "a":
                baselines["nnterp"] = nnterp_lens
        for name, fn in baselines.items():
            try:
                runs[name] = (measure(lm, fn, [scopes[i] for i in text_subset], baseline_rss), text_subset)
            except Exception as exc:  # report, don't hide: the table says the baseline did not run
                print(f"  {name} baseline did not run: {type(exc).__name__}: {exc}")
        for name, (measured, items) in runs.items():
            total = measured.seconds * len(scopes) / len(items)
            delta, same = compare([mine.outputs[i] for i in items], measured.outputs, log_probs=name == "nnterp")
            print(
                f"  {name:20s} {total:9.1f} s  speed-up of ours ×{total / mine.seconds:7.1f}  peak +{measured.peak_mb:7.0f} MiB  "
                f"max|Δ{'log p' if name == 'nnterp' else 'logit'}| vs ours {delta:.2e}  same text: {same}  "
                f"{measured.gflops / measured.seconds:6.1f} GFLOP/s ({100 * measured.gflops / measured.seconds / peak:4.1f}% of "
                f"the 2048² peak)"
            )
    if args.memory_texts:
        scopes = [ps.TOKEN_IDENTITY.scope(t, layer=layer) for t in texts(args.memory_texts) for layer in range(lm.n_layers)]
        with PeakRSS() as rss:
            start = time.perf_counter()
            df = ps.sweep(lm, [s.source.prompt for s in scopes[:: lm.n_layers]], ps.TOKEN_IDENTITY, progress=False)
            seconds = time.perf_counter() - start
        print(
            f"\nmemory: token-identity sweep over {args.memory_texts} texts × {lm.n_layers} layers ({len(df)} rows) in "
            f"{seconds:.0f} s; peak RSS {(rss.peak - baseline_rss) / 2**20:.0f} MiB above the loaded model "
            f"(model {model_mb:.0f} MiB; target: model + 1024 MiB)"
        )


if __name__ == "__main__":
    main()
