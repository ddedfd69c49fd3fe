"""Bootstrap statistics over result tables, with 95% intervals over independent units: the numbers behind
the claim tables (:mod:`patchscopes.evals.claims`) and the evaluations' own summaries.

>>> import pandas as pd
>>> scores = pd.DataFrame({"example": [0, 0, 1, 1], "method": ["a", "b"] * 2, "hit": [1, 0, 1, 1]})
>>> estimate(scores, {"kind": "mean", "column": "hit"}).value
0.75
>>> estimate(scores, {"kind": "paired_difference", "column": "hit", "by": "method", "a": "a", "b": "b",
...                   "pair": ["example"]}).value
0.5
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from patchscopes.errors import PatchscopeError

RESAMPLES = 2000


class ClaimsError(PatchscopeError, ValueError):
    """A claim specification or a result file it names cannot be read as the claim says."""


@dataclass(frozen=True)
class Estimate:
    """A statistic with its 95% bootstrap interval over ``n`` independent units."""

    value: float
    low: float
    high: float
    n: int


def _select(frame: pd.DataFrame, where: Mapping[str, Any] | None) -> pd.DataFrame:
    for column, wanted in (where or {}).items():
        if column not in frame.columns:
            raise ClaimsError(f"'where' names column {column!r}, which the result file lacks (have: {list(frame.columns)})")
        frame = frame[frame[column].isin(wanted if isinstance(wanted, list) else [wanted])]
    return frame


def _need(frame: pd.DataFrame, *columns: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ClaimsError(f"the result file lacks column(s) {missing} (have: {list(frame.columns)})")


def _bootstrap_means(sums: np.ndarray, counts: np.ndarray, seed: int) -> tuple[float, float]:
    """Percentile interval of the pooled mean sum/count when the units (rows of sums, counts) are resampled."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(RESAMPLES, len(sums)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def _mean(frame: pd.DataFrame, column: str, cluster: str | None, seed: int) -> Estimate:
    if frame.empty:
        raise ClaimsError(f"no rows are left to average {column!r} over; check the claim's 'where'")
    values = frame[column].astype(float)
    if cluster is None:
        sums, counts = values.to_numpy(), np.ones(len(values))
    else:
        grouped = values.groupby(frame[cluster])
        sums, counts = grouped.sum().to_numpy(), grouped.count().to_numpy().astype(float)
    low, high = _bootstrap_means(sums, counts, seed)
    return Estimate(float(sums.sum() / counts.sum()), low, high, len(sums))


def _mean_over_groups(frame: pd.DataFrame, column: str, groups: str, seed: int) -> Estimate:
    """The unweighted mean over the levels of ``groups`` of each level's mean of ``column`` (each row a unit).

    The interval resamples the rows within each group (a stratified bootstrap), so every group keeps its
    size and its weight: the statistic of a table that averages per-task accuracies over tasks."""
    if frame.empty:
        raise ClaimsError(f"no rows are left to average {column!r} over; check the claim's 'where'")
    parts = [part.to_numpy(float) for _, part in frame[column].groupby(frame[groups], sort=True)]
    rng = np.random.default_rng(seed)
    draws = np.mean([part[rng.integers(0, len(part), size=(RESAMPLES, len(part)))].mean(1) for part in parts], axis=0)
    low, high = np.quantile(draws, [0.025, 0.975])
    return Estimate(float(np.mean([part.mean() for part in parts])), float(low), float(high), len(frame))


def _paired(frame: pd.DataFrame, stat: Mapping[str, Any]) -> pd.DataFrame:
    """One row per pair: the difference a − b of ``column`` between the two levels of ``by`` (long files), or
    of the columns ``a`` and ``b`` of each row (wide files, without ``by``)."""
    if "by" not in stat:
        _need(frame, stat["a"], stat["b"], *([stat["cluster"]] if stat.get("cluster") else []))
        both = frame.dropna(subset=[stat["a"], stat["b"]])
        return both.assign(difference=both[stat["a"]].astype(float) - both[stat["b"]].astype(float))
    column, by, pair = stat["column"], stat["by"], list(stat["pair"])
    _need(frame, column, by, *pair)
    wide = frame[frame[by].isin([stat["a"], stat["b"]])].pivot_table(index=pair, columns=by, values=column, aggfunc="mean")
    for level in (stat["a"], stat["b"]):
        if level not in wide.columns:
            raise ClaimsError(f"column {by!r} has no rows equal to {level!r}")
    wide = wide.dropna()
    return pd.DataFrame({"difference": wide[stat["a"]] - wide[stat["b"]]}).reset_index()


def _group_difference(frame: pd.DataFrame, stat: Mapping[str, Any], seed: int) -> Estimate:
    """Mean of ``column`` in group ``a`` of ``by`` minus its mean in group ``b``, for two independent groups
    (no pairing): each unit (``cluster``, default a row) is first averaged, then the units of each group are
    resampled separately (a stratified bootstrap)."""
    column, by = stat["column"], stat["by"]
    cluster = stat.get("cluster")
    _need(frame, column, by, *([cluster] if cluster else []))
    groups = []
    for level in (stat["a"], stat["b"]):
        part = frame[frame[by] == level]
        if part.empty:
            raise ClaimsError(f"column {by!r} has no rows equal to {level!r}")
        values = part[column].astype(float)
        groups.append((values.groupby(part[cluster]).mean() if cluster else values).to_numpy())
    a, b = groups
    rng = np.random.default_rng(seed)
    draws = a[rng.integers(0, len(a), size=(RESAMPLES, len(a)))].mean(1) - b[
        rng.integers(0, len(b), size=(RESAMPLES, len(b)))
    ].mean(1)
    low, high = np.quantile(draws, [0.025, 0.975])
    return Estimate(float(a.mean() - b.mean()), float(low), float(high), len(a) + len(b))


def _crossover_layer(curves: np.ndarray, layers: np.ndarray) -> float:
    """The first layer from which curve a stays above curve b at every later layer (the last excluded); inf if never."""
    above = curves[0, :-1] > curves[1, :-1]
    for k in range(len(above)):
        if above[k:].all():
            return float(layers[k])
    return float("inf")


def _crossover(frame: pd.DataFrame, stat: Mapping[str, Any], seed: int) -> Estimate:
    column, by, unit, x = stat["column"], stat["by"], stat.get("unit", "example"), stat.get("x", "layer")
    _need(frame, column, by, unit, x)
    part = frame[frame[by].isin([stat["a"], stat["b"]])]
    cube = part.pivot_table(index=unit, columns=[by, x], values=column, aggfunc="mean")
    layers = np.array(sorted(part[x].unique()))
    try:
        values = np.stack([cube[level][layers].to_numpy(float) for level in (stat["a"], stat["b"])], axis=1)
    except KeyError as missing:
        raise ClaimsError(f"crossover needs every {x} for both {stat['a']!r} and {stat['b']!r}; missing {missing}") from None
    scale = float(stat.get("per_depth", 1.0))
    point = _crossover_layer(values.mean(0), layers) / scale
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(RESAMPLES, len(values)))
    draws = np.array([_crossover_layer(values[p].mean(0), layers) for p in picks]) / scale
    low, high = np.quantile(draws, [0.025, 0.975], method="inverted_cdf")  # a draw may be inf (never crosses)
    return Estimate(point, float(low), float(high), len(values))


def _held_out_best(frame: pd.DataFrame, stat: Mapping[str, Any], seed: int) -> Estimate:
    """The mean of ``column`` at the best cell, chosen on one half of the units and measured on the other.

    A cell is a combination of the ``cells`` columns (e.g. a layer pair). The units (``cluster``, sorted)
    alternate between the halves: the cell with the highest mean on the even-ranked units (the first of equal
    maxima) is scored on the odd-ranked ones, so the number carries no selection bias. With ``minus`` (a
    column) the scored value at that cell is ``column − minus`` (e.g. a patched hit against an unpatched one)."""
    column, cells, cluster = stat["column"], list(stat["cells"]), stat["cluster"]
    minus = stat.get("minus")
    _need(frame, column, cluster, *cells, *([minus] if minus else []))
    units = np.sort(frame[cluster].unique())
    if len(units) < 2:
        raise ClaimsError(f"held_out_best needs at least two units of {cluster!r}, got {len(units)}")
    choosing = frame[cluster].isin(units[0::2])
    best = frame[choosing].groupby(cells)[column].mean().idxmax()
    scored = frame[~choosing]
    for name, value in zip(cells, best if isinstance(best, tuple) else (best,)):
        scored = scored[scored[name] == value]
    if minus:
        scored = scored.assign(**{column: scored[column].astype(float) - scored[minus].astype(float)})
    return _mean(scored, column, cluster, seed)


def estimate(frame: pd.DataFrame, stat: Mapping[str, Any], seed: int = 0) -> Estimate:
    """The statistic ``stat`` of ``frame`` (a result file's rows) with its 95% bootstrap interval.

    Kinds: ``mean`` of ``column`` (units: ``cluster``, default every row); ``paired_difference`` of
    ``column`` between levels ``a`` and ``b`` of ``by``, paired on the columns ``pair`` (units: ``cluster``,
    default the pairs), or without ``by`` of the columns ``a`` and ``b`` row by row; ``group_difference``:
    mean of ``column`` in level ``a`` of ``by`` minus level ``b``, two independent groups of units
    (``cluster``), bootstrapped within each group; ``crossover``: the
    first ``x`` (layer) from which ``a``'s mean stays above ``b``'s, divided by ``per_depth`` (units: ``unit``);
    ``held_out_best``: the mean of ``column`` at the best cell of ``cells``, chosen on half of the units
    (``cluster``) and measured on the other half (see :func:`_held_out_best`); ``mean_over_groups``: the
    unweighted mean over the levels of ``groups`` of their means of ``column``, rows resampled within each
    level (n counts the rows).
    ``where`` keeps the rows whose columns hold the given values.

    >>> grid = pd.DataFrame({"example": [0, 0, 1, 1, 2, 2, 3, 3], "layer": [0, 1] * 4, "hit": [0, 1, 0, 1, 1, 1, 0, 0]})
    >>> estimate(grid, {"kind": "held_out_best", "column": "hit", "cells": ["layer"], "cluster": "example"}).value
    0.5
    >>> tasks = pd.DataFrame({"task": ["a", "a", "a", "b"], "hit": [1, 1, 1, 0]})
    >>> estimate(tasks, {"kind": "mean_over_groups", "column": "hit", "groups": "task"}).value
    0.5
    """
    kind = stat.get("kind")
    frame = _select(frame, stat.get("where"))
    if kind == "mean":
        _need(frame, stat["column"], *([stat["cluster"]] if stat.get("cluster") else []))
        return _mean(frame, stat["column"], stat.get("cluster"), seed)
    if kind == "paired_difference":
        pairs = _paired(frame, stat)
        return _mean(pairs, "difference", stat.get("cluster"), seed)
    if kind == "group_difference":
        return _group_difference(frame, stat, seed)
    if kind == "crossover":
        return _crossover(frame, stat, seed)
    if kind == "held_out_best":
        return _held_out_best(frame, stat, seed)
    if kind == "mean_over_groups":
        _need(frame, stat["column"], stat["groups"])
        return _mean_over_groups(frame, stat["column"], stat["groups"], seed)
    raise ClaimsError(
        f"unknown statistic kind {kind!r}; use mean, paired_difference, group_difference, crossover, held_out_best "
        "or mean_over_groups"
    )
