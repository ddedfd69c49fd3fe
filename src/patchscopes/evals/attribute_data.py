"""Read the Patchscopes attribute-extraction TSV format (``prompt_target``, ``subject``, ``object``,
``prompt_source``, ``position_source``, …), a user's own files in the same format included.

``position_source`` in the public files was computed with GPT-2's tokenizer; :func:`source_position`
recomputes it for any tokenizer from the subject string.

    >>> samples = load_attribute_task(data_file("patchscopes/factual/country_currency.tsv"))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from patchscopes.positions import Substring
from patchscopes.relations.data import DataFormatError, unescape

REQUIRED = ("prompt_target", "subject", "object", "prompt_source")


@dataclass(frozen=True)
class AttributeSample:
    task: str
    sample_id: str
    prompt_target: str
    subject: str
    object: str
    prompt_source: str
    line: int

    subject_in_source: str = ""

    @property
    def source_position(self) -> Substring:
        """The last token of the last occurrence of the subject (as spelled in the snippet) in the source."""
        return Substring(self.subject_in_source or self.subject, occurrence=-1, tokens="last")


@dataclass
class AttributeTask:
    """One task file: its usable samples and how many rows were skipped, by reason."""

    name: str
    samples: list[AttributeSample]
    skipped: dict[str, int]

    def __len__(self) -> int:
        return len(self.samples)


def load_attribute_task(path: str | Path) -> AttributeTask:
    """All usable rows of one task file.

    Rows without a source snippet, or whose snippet does not contain the subject (case-insensitively),
    are skipped and counted in ``skipped``; a structurally malformed file or row raises
    :class:`DataFormatError` naming the file, line and field.
    """
    path = Path(path)
    csv.field_size_limit(sys.maxsize)
    task = path.stem
    samples: list[AttributeSample] = []
    skipped = {"no source snippet": 0, "subject not in snippet": 0}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DataFormatError(f"{path}, line 1: missing column(s) {', '.join(missing)} (have: {reader.fieldnames})")
        for row in reader:
            line = reader.line_num
            for column in ("prompt_target", "subject", "object"):
                value = row.get(column)
                if value is None or not value.strip():
                    raise DataFormatError(f"{path}, line {line}, field {column!r}: empty or missing value")
            subject = unescape(row["subject"]).strip()
            source = unescape(row.get("prompt_source") or "")
            if not source.strip():
                skipped["no source snippet"] += 1
                continue
            at = source.lower().rfind(subject.lower())
            if at < 0:
                skipped["subject not in snippet"] += 1
                continue
            if "x" not in row["prompt_target"].split() and not row["prompt_target"].rstrip().endswith("x"):
                raise DataFormatError(
                    f"{path}, line {line}, field 'prompt_target': no placeholder 'x' in {row['prompt_target']!r}"
                )
            samples.append(
                AttributeSample(
                    task=task,
                    sample_id=row.get("sample_id") or str(len(samples)),
                    prompt_target=unescape(row["prompt_target"]),
                    subject=subject,
                    object=unescape(row["object"]).strip(),
                    prompt_source=source,
                    line=line,
                    subject_in_source=source[at : at + len(subject)],
                )
            )
    return AttributeTask(task, samples, skipped)
