"""The linear-probe baseline of the attribute-extraction table and the paired significance test.

>>> import numpy as np
>>> x = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]]); y = ["a", "a", "a", "b", "b", "b"]
>>> probe_accuracy(x, y, folds=3, seed=0)
1.0
>>> round(paired_test([0.5, 0.6, 0.7], [0.1, 0.1, 0.3], n_tests=2).p_corrected, 3)
0.012
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from patchscopes.evals.common import require


def probe_accuracy(features: np.ndarray, labels: Sequence[str], folds: int = 3, seed: int = 0, max_iter: int = 1000) -> float:
    """Held-out accuracy of a logistic-regression probe, by ``folds``-fold cross-validation (shuffled, seeded):
    the mean of :func:`probe_predictions` (NaN for fewer than two samples)."""
    return accuracy_of(probe_predictions(features, labels, folds, seed, max_iter))


def accuracy_of(hits: np.ndarray) -> float:
    """The accuracy of per-sample probe predictions; NaN for fewer than two samples (no probe was trained)."""
    return float(hits.mean()) if len(hits) >= 2 else float("nan")


def probe_predictions(
    features: np.ndarray,
    labels: Sequence[str],
    folds: int = 3,
    seed: int = 0,
    max_iter: int = 1000,
    groups: Sequence[str] | None = None,
) -> np.ndarray:
    """Per sample: whether the probe trained on the other folds predicts its label (shuffled, seeded folds).

    Every sample is predicted once; a training fold that holds a single class predicts that class. Classes
    unseen in training can never be predicted, as in the paper's setting where many objects are unique.
    Fewer than two samples (or groups): all False (nothing to train on).

    ``groups``: one key per row; rows with the same key (e.g. several source snippets of one subject) are
    kept in the same fold, so the probe is never tested on a subject it was trained on. The folds are then
    drawn over the distinct keys in order of first appearance; with all keys distinct this is exactly the
    split without ``groups``.
    """
    require("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    hits = np.zeros(len(y), dtype=bool)
    keys: list[object] = list(range(len(y))) if groups is None else list(groups)
    if len(keys) != len(y):
        raise ValueError(f"{len(keys)} group keys for {len(y)} samples")
    number = {key: i for i, key in enumerate(dict.fromkeys(keys))}  # each distinct key → its fold unit
    member = np.array([number[key] for key in keys], dtype=int)
    if len(number) < 2:
        return hits
    k = min(folds, len(number))
    for train_groups, test_groups in KFold(n_splits=k, shuffle=True, random_state=seed).split(np.arange(len(number))):
        train, test = np.flatnonzero(np.isin(member, train_groups)), np.flatnonzero(np.isin(member, test_groups))
        classes = np.unique(y[train])
        if len(classes) == 1:
            predicted = np.full(len(test), classes[0])
        else:
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
            model.fit(x[train], y[train])
            predicted = model.predict(x[test])
        hits[test] = predicted == y[test]
    return hits


@dataclass(frozen=True)
class PairedTest:
    """Paired t-test of two per-layer accuracy series with a Bonferroni correction over ``n_tests``."""

    t: float
    p: float
    p_corrected: float
    n: int

    @property
    def winner(self) -> str | None:
        """``"a"``, ``"b"`` or None (not significant at 0.05 after correction)."""
        if math.isnan(self.p_corrected) or self.p_corrected >= 0.05:
            return None
        return "a" if self.t > 0 else "b"


def paired_test(a: Sequence[float], b: Sequence[float], n_tests: int = 1) -> PairedTest:
    """``scipy.stats.ttest_rel(a, b)``; the p-value times ``n_tests`` (capped at 1).

    NaN when undefined: fewer than two pairs, a missing value, or a constant difference (zero variance).
    """
    stats = require("scipy.stats")

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"paired samples need equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2 or not np.isfinite(x - y).all() or np.allclose(x - y, (x - y)[0]):
        return PairedTest(float("nan"), float("nan"), float("nan"), len(x))
    result = stats.ttest_rel(x, y)
    p = float(result.pvalue)
    return PairedTest(float(result.statistic), p, min(1.0, p * n_tests), len(x))
