"""CITATION.cff parses, cites the package at its own version, and lists each implemented paper."""

from __future__ import annotations

from importlib.metadata import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_citation_file_matches_the_package_and_cites_the_papers() -> None:
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    package = metadata("patchscopes")
    assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
    assert citation["version"] == package["Version"]
    assert citation["license"] in (package.get("License-Expression"), package.get("License"))
    arxiv = {identifier["value"] for ref in citation["references"] for identifier in ref["identifiers"]}
    # Patchscopes, LRE (Hernandez et al.), LRC (Chanin et al.), circuits under knowledge edits (Ge et al.)
    assert arxiv == {"arXiv:2401.06102", "arXiv:2308.09124", "arXiv:2311.08968", "arXiv:2406.17241"}
    assert all(ref["title"] and ref["authors"] and ref["year"] for ref in citation["references"])
