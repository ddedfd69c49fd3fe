"""Left padding of mixed-length prompts, with the attention mask and position ids that keep a
position meaning the same token whether a prompt runs alone or in a batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, N]
    attention_mask: torch.Tensor  # [B, N]
    position_ids: torch.Tensor  # [B, N]
    pad: list[int]  # left padding per row

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    def padded(self, row: int, position: int) -> int:
        """Padded column of a non-negative position in row ``row``'s unpadded prompt."""
        return self.pad[row] + position


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    pads = []
    for row, seq in enumerate(sequences):
        pad = width - len(seq)
        pads.append(pad)
        ids[row, pad:] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, pad:] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), mask.to(device), position_ids.to(device), pads)


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items (the last partial one included)."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]
