"""Train/test splits for the LRC evaluation: 50/50 per (relation, object), at least one training sample per object.

>>> from patchscopes.relations.data import RelationSample as S
>>> train, test = split_by_object([S("a", "x"), S("b", "x"), S("c", "y")], seed=0)
>>> sorted(s.object for s in train), [s.object for s in test]
(['x', 'y'], ['x'])
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from patchscopes.relations.data import RelationSample


def split_by_object(
    samples: Sequence[RelationSample], seed: int, train_fraction: float = 0.5
) -> tuple[list[RelationSample], list[RelationSample]]:
    """Shuffle each object's samples (seeded) and put ``ceil(n·fraction)`` (≥ 1) in train, the rest in test."""
    by_object: dict[str, list[RelationSample]] = {}
    for s in samples:
        by_object.setdefault(s.object, []).append(s)
    rng = random.Random(seed)
    train: list[RelationSample] = []
    test: list[RelationSample] = []
    for obj in sorted(by_object):
        group = list(by_object[obj])
        rng.shuffle(group)
        n_train = max(1, -(-len(group) * int(round(train_fraction * 100)) // 100))
        train.extend(group[:n_train])
        test.extend(group[n_train:])
    return train, test


def hash_rank(relation: str, samples: Sequence[RelationSample]) -> list[RelationSample]:
    """A fixed pseudo-random order of samples (independent of any split), used to pick LRE training prompts.

    Picking the first ``n`` training samples in this order is a random choice per split, and makes prompts
    (and their cached Jacobians) recur across seeds.
    """
    return sorted(samples, key=lambda s: hashlib.sha256(f"{relation}\x1f{s.subject}".encode()).hexdigest())
