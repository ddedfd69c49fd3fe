"""The LRC paper's baselines, as :class:`~patchscopes.relations.lrc.ConceptSet` s over the same subject states.

- ``svm_concepts``: one-vs-rest linear SVM (balanced classes, no intercept); concepts are the normalised
  class weight vectors (two classes: ``±w``).
- ``averaging_concepts``: "input averaging", the normalised mean subject state per object value.

    >>> concepts = averaging_concepts(torch.randn(4, 8), ["a", "b", "a", "b"])
    >>> concepts
    ConceptSet(averaging, 2 concepts, layer None)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from patchscopes.relations.lrc import ConceptError, ConceptSet, normalise


def _check(states: torch.Tensor, labels: Sequence[str]) -> list[str]:
    if states.dim() != 2 or states.shape[0] != len(labels) or not len(labels):
        raise ConceptError(f"need states [n, d] with one label each; got {tuple(states.shape)} and {len(labels)} labels")
    return sorted(set(labels))


def averaging_concepts(states: torch.Tensor, labels: Sequence[str], **metadata: Any) -> ConceptSet:
    """Normalised mean subject state per label.

    >>> c = averaging_concepts(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]]), ["a", "a", "b"])
    >>> c.classify(torch.tensor([[0.1, 1.0]]))
    ['b']
    """
    names = _check(states, labels)
    vectors = torch.stack([states[[i for i, lab in enumerate(labels) if lab == n]].float().mean(0) for n in names])
    return ConceptSet(names, normalise(vectors), {"method": "averaging", **metadata})


def svm_concepts(states: torch.Tensor, labels: Sequence[str], c: float = 1.0, seed: int = 0, **metadata: Any) -> ConceptSet:
    """Linear SVM (``class_weight="balanced"``, ``fit_intercept=False``) weight vectors as concepts."""
    from sklearn.svm import LinearSVC

    names = _check(states, labels)
    if len(names) < 2:
        raise ConceptError(f"an SVM needs at least two object values, got {names}")
    x = states.float().numpy()
    svm = LinearSVC(class_weight="balanced", fit_intercept=False, C=c, random_state=seed, max_iter=20000)
    svm.fit(x, list(labels))
    coef = torch.tensor(svm.coef_, dtype=torch.float32)
    classes = [str(k) for k in svm.classes_]
    if len(classes) == 2:
        coef = torch.stack([-coef[0], coef[0]])
    vectors = torch.stack([coef[classes.index(n)] for n in names])
    return ConceptSet(names, normalise(vectors), {"method": "svm", **metadata})
