"""The explorer's bounds on work per request and on the work queue.

>>> Limits().max_prompt_chars
400
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Bounds a request must respect; the server answers 422 with the bound's name when one is exceeded."""

    max_prompt_chars: int = 400
    max_target_prompt_chars: int = 600
    max_answer_chars: int = 64
    max_new_tokens: int = 40
    max_cells: int = 1024  # source layers × target layers in one request
    max_generated_tokens: int = 4096  # cells × max_new_tokens in one request
    queue_capacity: int = 4  # jobs queued or running; beyond it requests get 429
    workers: int = 1  # threads running model work
    max_results: int = 16  # finished results kept for export
    max_body_bytes: int = 65536
    chunk_cells: int = 32  # Patchscopes per streamed chunk (cancellation and progress granularity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
