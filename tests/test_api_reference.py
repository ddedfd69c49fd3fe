"""Every module of the package is on a page of the API reference (docs/reference/), and every page is in the nav."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "patchscopes"
REFERENCE = ROOT / "docs" / "reference"

#: The command-line modules: documented by ``patchscopes --help`` and each command's ``--help``.
CLI = {"cli", "cli_options", "crossmodel_cli"}


def modules() -> set[str]:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] in CLI or any(p.startswith("_") for p in parts):
            continue
        names.add(".".join(parts))
    return names


def documented() -> set[str]:
    return {m for page in REFERENCE.glob("*.md") for m in re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M)}


def test_every_module_is_on_a_reference_page():
    missing = sorted(modules() - documented())
    assert not missing, f"add a `::: <module>` line for each to a page under docs/reference/: {missing}"


def test_reference_pages_name_only_modules_that_exist():
    assert not sorted(documented() - modules())


def test_every_reference_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert not [p.name for p in REFERENCE.glob("*.md") if f"reference/{p.name}" not in nav]
