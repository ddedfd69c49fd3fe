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


def group_by_object(samples: Sequence[RelationSample]) -> dict[str, list[RelationSample]]:
    """The samples of each object, in their order."""
    groups: dict[str, list[RelationSample]] = {}
    for s in samples:
        groups.setdefault(s.object, []).append(s)
    return groups


def split_by_object(
    samples: Sequence[RelationSample], seed: int, train_fraction: float = 0.5
) -> tuple[list[RelationSample], list[RelationSample]]:
    """Shuffle each object's samples (seeded) and put ``ceil(n·fraction)`` (≥ 1) in train, the rest in test."""
    by_object = group_by_object(samples)
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


def fold_split(
    samples: Sequence[RelationSample], fold: int, n_folds: int, seed: int, relation: str
) -> tuple[list[RelationSample], list[RelationSample]]:
    """Fold ``fold`` of ``n_folds`` disjoint test folds, and a training half from outside it.

    Per object, the samples are shuffled (seeded) and dealt round robin into the folds from a random
    offset, so the folds' test sets are disjoint and together hold every sample of every object with at
    least two; an object with one sample is train-only (every object keeps a training sample). The
    training set is ``⌈n/2⌉`` of the object's ``n`` samples, taken from outside the fold in the
    :func:`hash_rank` order (fewer when the fold holds more than half), so folds share most training
    prompts.

    >>> from patchscopes.relations.data import RelationSample as S
    >>> data = [S(f"s{i}", "x" if i < 6 else "y") for i in range(8)]
    >>> tests = [fold_split(data, k, 3, seed=0, relation="r")[1] for k in range(3)]
    >>> sorted(s.subject for t in tests for s in t) == sorted(s.subject for s in data)
    True
    >>> all(not set(a) & set(fold_split(data, k, 3, 0, "r")[0]) for k, a in enumerate(tests))
    True
    """
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold {fold} is not in 0..{n_folds - 1}")
    by_object = group_by_object(samples)
    rng = random.Random(seed)
    train: list[RelationSample] = []
    test: list[RelationSample] = []
    for obj in sorted(by_object):
        group = list(by_object[obj])
        rng.shuffle(group)
        offset = rng.randrange(n_folds)
        if len(group) < 2:
            train.extend(group)
            continue
        held = [s for i, s in enumerate(group) if (i + offset) % n_folds == fold]
        rest = [s for s in hash_rank(relation, group) if s not in held]
        train.extend(rest[: -(-len(group) // 2)])
        test.extend(held)
    return train, test


def balanced_choice(relation: str, samples: Sequence[RelationSample], n: int) -> list[RelationSample]:
    """``n`` samples spread as evenly as possible over the objects (the LRC paper's LRE prompts).

    Objects take turns in the order their first sample appears in :func:`hash_rank`, each giving its
    next sample in that order, so the choice is a fixed random one that recurs across splits.

    >>> from patchscopes.relations.data import RelationSample as S
    >>> chosen = balanced_choice("r", [S("a", "x"), S("b", "x"), S("c", "x"), S("d", "y")], 2)
    >>> sorted(s.object for s in chosen)
    ['x', 'y']
    """
    queues = group_by_object(hash_rank(relation, samples))
    chosen: list[RelationSample] = []
    while len(chosen) < n and any(queues.values()):
        for queue in queues.values():
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen
