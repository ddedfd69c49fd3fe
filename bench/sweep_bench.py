"""Benchmark: layer × layer Patchscope sweeps, three implementations on the same inputs, in one process.

1. straightforward — one source forward and one patched target forward per (example, ℓ, ℓ*), batch size 1,
   as the official code does (generation continues from the KV cache);
2. nnsight — the same sweep written idiomatically with nnsight traces (one source trace per example, one
   target trace or generate call per layer pair);
3. ours — ``patchscopes.sweep`` with the fast engine.

Prints wall time, speed-ups, peak memory (RSS above the loaded model), the largest |Δ logit| between
outputs, whether greedy texts are identical, and achieved FLOP/s against this machine's measured fp32 matmul
peak. Baselines may run on a random subset of the items (``--baseline-limit``): their time is then
extrapolated linearly from that subset, and outputs are compared on it — the printout says so.

    python bench/sweep_bench.py                 # cases a, b, c and the 1,000-text memory check
    python bench/sweep_bench.py --cases a --baseline-limit 300
"""

from __future__ import annotations

import argparse
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


def matmul_peak(seconds: float = 3.0, n: int = 2048, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Measured GFLOP/s of torch.mm at n x n on this device and dtype (best of repeated runs)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best, end = 0.0, time.time() + seconds
    while time.time() < end:
        t = time.perf_counter()
        torch.mm(a, b)
        if a.device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
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


def nnsight_idiomatic(lm: ps.ModelHandle, scopes: list[Patchscope]) -> list[tuple[torch.Tensor, list[int]]]:
    """What a user writes with nnsight: a source trace per prompt saving its layers, a target trace per pair."""
    import nnsight
    from nnsight import LanguageModel

    model = LanguageModel(lm.model, tokenizer=lm.tokenizer)
    layers = model.model.layers
    saved: dict[str, list] = {}
    out = []
    for scope in scopes:
        r = resolve_step(scope, lm, lm)
        src = scope.source.prompt
        if src not in saved:
            with model.trace(r.source_ids):
                saved[src] = [nnsight.save(layers[i].output) for i in range(lm.n_layers)]
        hidden = saved[src][r.source_layer]
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        vec = hidden[0, r.source_positions]
        max_new = scope.decoding.max_new_tokens if isinstance(scope.decoding, ps.Generate) else 0
        if max_new:
            with model.generate(r.target_ids, max_new_tokens=max_new, do_sample=False, pad_token_id=lm.pad_id) as tracer:
                o = layers[r.target_layer].output
                (o[0] if isinstance(o, tuple) else o)[0, r.target_positions] = vec
                logits = nnsight.save(model.lm_head.output[0, -1])
                seq = nnsight.save(tracer.result)
            gen = []
            for t in seq[0, len(r.target_ids) :].tolist():
                if t in lm.eos_ids:
                    break
                gen.append(int(t))
            out.append((logits.float(), gen))
        else:
            with model.trace(r.target_ids):
                o = layers[r.target_layer].output
                (o[0] if isinstance(o, tuple) else o)[0, r.target_positions] = vec
                logits = nnsight.save(model.lm_head.output[0, -1])
            out.append((logits.float(), []))
    return out


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


def compare(a: list, b: list) -> tuple[float, bool]:
    worst = max(((x[0] - y[0]).abs().max().item() for x, y in zip(a, b)), default=0.0)
    return worst, all(x[1] == y[1] for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="abc")
    parser.add_argument(
        "--baseline-limit", type=int, default=0, help="run the baselines on this many random items per case (0 = all)"
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
    print(
        f"machine: {os.cpu_count()} CPUs visible, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {lm.device}; measured {lm.dtype} matmul peak {peak:.1f} GFLOP/s; model {lm.name} {lm.dtype}, "
        f"{model_mb:.0f} MiB of weights"
    )
    baseline_rss = psutil.Process().memory_info().rss
    for case in args.cases:
        scopes = case_scopes(lm, case)
        subset = list(range(len(scopes)))
        if args.baseline_limit and args.baseline_limit < len(scopes):
            subset = sorted(random.Random(1).sample(subset, args.baseline_limit))
        base_scopes = [scopes[i] for i in subset]
        scale = len(scopes) / len(base_scopes)
        print(
            f"\ncase ({case}): {len(scopes)} Patchscopes; baselines on {len(base_scopes)} of them"
            + (f", time ×{scale:.1f} extrapolated" if scale > 1 else "")
        )
        mine = measure(lm, ours, scopes, baseline_rss)
        runs = {"ours (fast engine)": (mine, 1.0)}
        plain = measure(lm, straightforward, base_scopes, baseline_rss)
        runs["straightforward"] = (plain, scale)
        if not args.skip_nnsight:
            try:
                runs["nnsight"] = (measure(lm, nnsight_idiomatic, base_scopes, baseline_rss), scale)
            except Exception as exc:  # report, don't hide: the table says nnsight did not run
                print(f"  nnsight baseline failed: {type(exc).__name__}: {exc}")
        mine_subset = [mine.outputs[i] for i in subset]
        for name, (m, s) in runs.items():
            total = m.seconds * s
            delta, same = compare(mine_subset, m.outputs) if name != "ours (fast engine)" else (0.0, True)
            print(
                f"  {name:20s} {total:9.1f} s  speed-up of ours ×{total / mine.seconds:7.1f}  peak +{m.peak_mb:7.0f} MiB  "
                f"max|Δlogit| vs ours {delta:.2e}  same text: {same}  {m.gflops / m.seconds:6.1f} GFLOP/s "
                f"({100 * m.gflops / m.seconds / peak:4.1f}% of peak)"
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
