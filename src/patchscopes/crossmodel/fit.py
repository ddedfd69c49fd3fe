"""Fit affine maps ``h_B^{ℓ*} ≈ W h_A^ℓ + b`` between two models' layers on the same texts, streaming.

Texts are read in chunks; for each chunk both models' block outputs are captured at paired positions
(identical positions for one tokenizer, equal end offsets for two, see :mod:`.align`) and folded into
one :class:`~patchscopes.mappings.AffineFitter` per layer pair, so memory is bounded by the sufficient
statistics (O(d_A · (d_A + d_B)) per pair) whatever the number of texts. The last ``heldout`` share of
the texts is never fitted on: each map's R² is measured there.

    >>> from patchscopes import load_model
    >>> a, b = load_model("SmolLM2-135M"), load_model("Gemma-3-270M")          # doctest: +SKIP
    >>> a, b = lm, lm_b                                                         # here: two tiny models
    >>> report = fit_maps(a, b, texts, pairs=[(1, 2), (3, 3)])
    >>> sorted(report.maps), sorted(report.r2) == sorted(report.maps)
    ([(1, 2), (3, 3)], True)
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from patchscopes.capture import capture
from patchscopes.crossmodel.align import aligned_positions
from patchscopes.crossmodel.checkpoint import FitCheckpoint
from patchscopes.errors import MappingError
from patchscopes.layers import LayerSpec, resolve_block
from patchscopes.mappings import AffineFitter, AffineMap, r2_score
from patchscopes.models.loading import ModelHandle
from patchscopes.progress import progress_bar

LayerPairs = Sequence[tuple[LayerSpec, LayerSpec]]


def corpus_sha256(texts: Sequence[str]) -> str:
    """A short hash of the fit corpus (the texts, in order)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


@dataclass
class FitReport:
    """The fitted maps keyed by resolved ``(ℓ, ℓ*)``, with held-out R² and the counts behind them."""

    maps: dict[tuple[int, int], AffineMap]
    n_fit_positions: int
    n_heldout_positions: int
    corpus_sha256: str
    seconds: float
    r2: dict[tuple[int, int], float] = field(default_factory=dict)

    def __repr__(self) -> str:
        best = max(self.r2.items(), key=lambda kv: kv[1]) if self.r2 else None
        return (
            f"FitReport({len(self.maps)} maps, {self.n_fit_positions} fit / {self.n_heldout_positions} held-out positions, "
            f"best R² {best})"
        )


def _collect(
    source: ModelHandle,
    target: ModelHandle,
    texts: Sequence[str],
    src_layers: list[int],
    tgt_layers: list[int],
    skip_first: int,
    batch_size: int,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Hidden states at paired positions, stacked over texts: ``{ℓ: [n, d_A]}``, ``{ℓ*: [n, d_B]}``."""
    ids_a, ids_b, pos_a, pos_b = [], [], [], []
    for text in texts:
        a, b, pa, pb = aligned_positions(text, source, target, skip_first)
        if pa:
            ids_a.append(a)
            ids_b.append(b)
            pos_a.append(pa)
            pos_b.append(pb)
    if not ids_a:
        return {}, {}
    cap_a = capture(source, ids_a, pos_a, src_layers, batch_size)
    cap_b = capture(target, ids_b, pos_b, tgt_layers, batch_size)
    xs = {layer: torch.cat([c[i] for c in cap_a]).float() for i, layer in enumerate(src_layers)}
    ys = {layer: torch.cat([c[i] for c in cap_b]).float() for i, layer in enumerate(tgt_layers)}
    return xs, ys


def _typical(
    xs: dict[int, torch.Tensor], ys: dict[int, torch.Tensor], pairs: Sequence[tuple[int, int]], ratio: float | None
) -> dict[tuple[int, int], torch.Tensor]:
    """Per layer pair, the rows whose source and target norms are both within ``ratio`` × their layer's median."""

    def within(states: torch.Tensor) -> torch.Tensor:
        norms = states.norm(dim=-1)
        return norms <= ratio * norms.median() if ratio is not None else torch.ones_like(norms, dtype=torch.bool)

    ok_x = {s: within(x) for s, x in xs.items()}
    ok_y = {t: within(y) for t, y in ys.items()}
    return {(s, t): ok_x[s] & ok_y[t] for s, t in pairs}


def fit_maps(
    source: ModelHandle,
    target: ModelHandle,
    texts: Sequence[str],
    pairs: LayerPairs,
    ridge: float = 0.0,
    heldout: float = 0.1,
    skip_first: int = 1,
    chunk_texts: int = 64,
    batch_size: int = 16,
    max_heldout_positions: int = 20000,
    progress: bool = False,
    ridge_grid: Sequence[float] = (),
    max_norm_ratio: float | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: float = 300.0,
) -> FitReport:
    """One affine map per ``(ℓ, ℓ*)`` in ``pairs`` from ``source`` layer ℓ to ``target`` layer ℓ*.

    ``ridge`` adds ``ridge·I`` to the normal equations (0 = ordinary least squares); ``heldout`` is the share
    of texts (the last ones) kept out of the fit for R²; ``skip_first`` drops each text's first paired
    positions (attention sinks). Every map carries its provenance in ``metadata``.

    ``ridge_grid`` (relative penalties, multiples of the mean diagonal of XᵀX) instead picks, per pair, the
    penalty with the best held-out R²; that R² then served for selection too (``metadata["ridge_selected"]``).

    ``max_norm_ratio`` drops, per layer pair, the positions where either state's norm exceeds that multiple of
    the median norm of its layer (per chunk of fit texts; over all held-out positions), from the fit and from
    R². Some models (Qwen2.5 among them) write *massive activations* (Sun et al., 2024) at a few tokens: states
    a hundred times the median norm that act as attention sinks. A handful of them dominate a least-squares fit
    and a pooled R²; ``10`` removes them (about 1 % of WikiText positions for Qwen2.5-Coder) and ``None`` keeps
    every position.

    ``checkpoint`` (a file path) makes a long fit resumable: every ``checkpoint_every`` seconds the fit's
    statistics are saved there, a fit started again with the same settings continues after the last saved
    chunk, and the file is deleted when the fit finishes. The result is bitwise the same as an uninterrupted
    fit. The held-out positions are collected again on resuming (they are not saved).
    """
    if max_norm_ratio is not None and max_norm_ratio <= 1:
        raise MappingError(f"max_norm_ratio must be above 1 (a multiple of the median norm), got {max_norm_ratio}")
    if not texts:
        raise MappingError("no texts to fit on: pass at least two texts (one is held out)")
    if not 0 <= heldout < 1:
        raise MappingError(f"heldout must be a share in [0, 1), got {heldout}")
    resolved = sorted(
        {
            (resolve_block(s, source.n_layers, "a cross-model map"), resolve_block(t, target.n_layers, "a cross-model map"))
            for s, t in pairs
        }
    )
    if not resolved:
        raise MappingError("no layer pairs to fit: pass pairs=[(source_layer, target_layer), ...]")
    src_layers = sorted({s for s, _ in resolved})
    tgt_layers = sorted({t for _, t in resolved})
    n_held = math.ceil(len(texts) * heldout) if heldout > 0 else 0
    if n_held >= len(texts):
        raise MappingError(f"{len(texts)} text(s) leave nothing to fit after holding out {n_held}; pass more texts")
    fit_texts, held_texts = list(texts[: len(texts) - n_held]), list(texts[len(texts) - n_held :])
    fitters = {pair: AffineFitter(source.hidden_size, target.hidden_size, ridge) for pair in resolved}
    started = time.perf_counter()
    n_fit, first_chunk = 0, 0
    excluded = {pair: 0 for pair in resolved}
    saved = _checkpoint(checkpoint, source, target, fit_texts, len(held_texts), resolved, skip_first, chunk_texts,
                        batch_size, max_norm_ratio)  # fmt: skip
    resumed = saved.load() if saved else None
    if resumed is not None:
        first_chunk, n_fit, excluded, fitters = resumed.next_chunk, resumed.n_fit, resumed.excluded, resumed.fitters
    last_save = time.perf_counter()
    with progress_bar(len(fit_texts) + len(held_texts), f"fit {source.name}→{target.name}", enabled=progress) as advance:
        advance(min(first_chunk, len(fit_texts)))
        for start in range(first_chunk, len(fit_texts), chunk_texts):
            chunk = fit_texts[start : start + chunk_texts]
            xs, ys = _collect(source, target, chunk, src_layers, tgt_layers, skip_first, batch_size)
            if xs:
                n_fit += int(next(iter(xs.values())).shape[0])
                keep = _typical(xs, ys, resolved, max_norm_ratio)
                for s, t in resolved:
                    rows = keep[(s, t)]
                    excluded[(s, t)] += int((~rows).sum())
                    fitters[(s, t)].update(xs[s][rows], ys[t][rows])
            advance(len(chunk))
            if saved and time.perf_counter() - last_save >= checkpoint_every:
                saved.save(start + chunk_texts, n_fit, excluded, fitters)
                last_save = time.perf_counter()
        hx: dict[int, list[torch.Tensor]] = {s: [] for s in src_layers}
        hy: dict[int, list[torch.Tensor]] = {t: [] for t in tgt_layers}
        n_heldout = 0
        for start in range(0, len(held_texts), chunk_texts):
            chunk = held_texts[start : start + chunk_texts]
            if n_heldout < max_heldout_positions:
                xs, ys = _collect(source, target, chunk, src_layers, tgt_layers, skip_first, batch_size)
                for s in xs:
                    hx[s].append(xs[s])
                for t in ys:
                    hy[t].append(ys[t])
                n_heldout += int(next(iter(xs.values())).shape[0]) if xs else 0
            advance(len(chunk))
    if n_fit == 0:
        raise MappingError("the fit texts gave no paired positions; pass longer texts or lower skip_first")
    corpus = corpus_sha256(fit_texts)
    alignment = "same tokenizer" if source.tokenizer is target.tokenizer else "end offset"
    maps: dict[tuple[int, int], AffineMap] = {}
    r2: dict[tuple[int, int], float] = {}
    held_x = {s: torch.cat(v)[:max_heldout_positions] for s, v in hx.items()} if n_heldout else {}
    held_y = {t: torch.cat(v)[:max_heldout_positions] for t, v in hy.items()} if n_heldout else {}
    held_keep = _typical(held_x, held_y, resolved, max_norm_ratio) if n_heldout else {}
    for s, t in resolved:
        fitter = fitters[(s, t)]
        if fitter.n == 0:
            raise MappingError(f"no fit positions left for layers ({s}, {t}) after the norm filter; raise max_norm_ratio")
        held = None
        if n_heldout:
            rows = held_keep[(s, t)]
            held = (held_x[s][rows], held_y[t][rows])
        scale = float(fitter.xtx.diagonal()[:-1].mean())
        candidates = [(None, ridge)] + [(rel, rel * scale) for rel in ridge_grid if held is not None]
        best: tuple[float, AffineMap] | None = None
        for relative, absolute in candidates:
            fitter.ridge = absolute
            amap = AffineMap.from_fitter(
                fitter,
                source_model=source.name,
                target_model=target.name,
                source_weights_sha256=source.weights_sha256,
                target_weights_sha256=target.weights_sha256,
                source_layer=s,
                target_layer=t,
                corpus_sha256=corpus,
                n_fit_texts=len(fit_texts),
                n_heldout_texts=len(held_texts),
                n_heldout_positions=min(n_heldout, max_heldout_positions),
                alignment=alignment,
                skip_first=skip_first,
                ridge_base=ridge,
                ridge_grid=list(ridge_grid),
                ridge_relative=relative,
                ridge_selected=bool(ridge_grid) and held is not None,
                max_norm_ratio=max_norm_ratio,
                n_excluded_fit=excluded[(s, t)],
                n_excluded_heldout=0 if held is None else min(n_heldout, max_heldout_positions) - int(held[0].shape[0]),
            )
            score = float("nan")
            if held is not None:
                with torch.no_grad():
                    score = r2_score(amap(held[0]), held[1])
            amap.metadata["r2"] = None if held is None else score
            if best is None or (score > best[0]):
                best = (score, amap)
            if not ridge_grid:
                break
        assert best is not None
        maps[(s, t)] = best[1]
        if held is not None:
            r2[(s, t)] = best[0]
    if saved:
        saved.remove()
    return FitReport(maps, n_fit, min(n_heldout, max_heldout_positions), corpus, time.perf_counter() - started, r2)


def _checkpoint(
    path: str | Path | None,
    source: ModelHandle,
    target: ModelHandle,
    fit_texts: Sequence[str],
    n_held: int,
    pairs: Sequence[tuple[int, int]],
    skip_first: int,
    chunk_texts: int,
    batch_size: int,
    max_norm_ratio: float | None,
) -> FitCheckpoint | None:
    """The checkpoint of this fit at ``path``, keyed by everything that decides its statistics."""
    if path is None:
        return None
    key = {
        "source": [source.name, source.weights_sha256, str(source.dtype)],
        "target": [target.name, target.weights_sha256, str(target.dtype)],
        "corpus": corpus_sha256(fit_texts), "n_fit_texts": len(fit_texts), "n_heldout_texts": n_held,
        "pairs": [list(p) for p in pairs], "skip_first": skip_first, "chunk_texts": chunk_texts,
        "batch_size": batch_size, "max_norm_ratio": max_norm_ratio,
    }  # fmt: skip
    return FitCheckpoint(path, key)
