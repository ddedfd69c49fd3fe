"""The pinned document corpus: manifest, resumable verified build, and (when the index is reachable) real fetches."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import pytest

from patchscopes import documents
from patchscopes.documents import DocumentEntry, DocumentsUnavailableError, build, manifest_entries
from patchscopes.evals.next_token import read_corpus


def _entry(project: str, text: str) -> DocumentEntry:
    return DocumentEntry(project, "1.0", hashlib.sha256(text.encode()).hexdigest())


def test_manifest_is_sorted_distinct_and_pinned() -> None:
    entries = manifest_entries()
    assert len(entries) == 12000
    assert [e.project for e in entries] == sorted({e.project for e in entries})
    assert len({e.sha256 for e in entries}) == len(entries)
    assert all(len(e.sha256) == 64 and int(e.sha256, 16) >= 0 and e.version for e in entries)


def test_build_verifies_resumes_and_keeps_manifest_order(tmp_path: Path) -> None:
    texts = {"alpha": "# Alpha\n\nFirst document.", "beta": "Beta, the second\ndocument.", "gamma": "Third."}
    entries = [_entry(name, text) for name, text in texts.items()]
    tampered = {**texts, "beta": "Beta, tampered."}  # served with other text: it must not pass

    out = tmp_path / "docs.jsonl"
    report = build(out, entries, fetch=lambda e: tampered[e.project], progress=False)
    assert report.missing == ("beta",) and report.written == 2
    assert read_corpus([out]) == [texts["alpha"], texts["gamma"]]

    # an interrupted build: the partial log holds alpha (and a torn line); only the rest is fetched again
    out.unlink()
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps({"project": "alpha", "version": "1.0", "text": texts["alpha"]}) + '\n{"proj')
    fetched: list[str] = []
    report = build(out, entries, fetch=lambda e: fetched.append(e.project) or texts[e.project], progress=False)
    assert sorted(fetched) == ["beta", "gamma"]
    assert report.missing == () and not partial.exists()
    assert [json.loads(line)["project"] for line in out.read_text().splitlines()] == ["alpha", "beta", "gamma"]
    assert read_corpus([out]) == list(texts.values())


def test_build_without_the_index_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "docs.jsonl"
    with pytest.raises(DocumentsUnavailableError, match="none of the 2 pinned descriptions could be fetched"):
        build(out, [_entry("alpha", "a"), _entry("beta", "b")], fetch=lambda e: None, progress=False)
    assert list(tmp_path.iterdir()) == []  # no empty corpus left behind for an evaluation to read


def _index_reachable() -> bool:
    try:
        urllib.request.urlopen(f"{documents.INDEX}/pip/json", timeout=10).close()  # noqa: S310
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _index_reachable(), reason="the package index (pypi.org) is not reachable; the real fetch is not tested")
def test_real_descriptions_match_their_pinned_sha256(tmp_path: Path) -> None:
    entries = manifest_entries()[:3]
    report = build(tmp_path / "docs.jsonl", entries, workers=3, progress=False)
    # a project may release again or vanish; most of the first three must still verify
    assert report.written >= 2, f"only {report.written} of 3 pinned descriptions verified: {report.missing}"
    assert all(len(text.split()) >= 300 for text in read_corpus([report.path]))


@pytest.mark.skipif(not _index_reachable(), reason="the package index (pypi.org) is not reachable; the real fetch is not tested")
def test_cli_fetches_the_first_documents(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from patchscopes.cli import app

    out = tmp_path / "docs.jsonl"
    result = CliRunner().invoke(app, ["data", "documents", "--limit", "2", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "of 2 documents" in result.output
    assert [json.loads(line)["project"] for line in out.read_text().splitlines()] == [e.project for e in manifest_entries()[:2]][
        : len(out.read_text().splitlines())
    ]
