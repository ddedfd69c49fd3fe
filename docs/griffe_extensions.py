"""How the API reference reads the docstrings (a griffe extension named in mkdocs.yml; not part of the package).

The docstrings are written for ``help()`` and doctest: ``>>>`` examples and Sphinx roles such as
``:class:`~patchscopes.plan.Plan```. For the site, each run of ``>>>`` lines (with its output) becomes a fenced
``pycon`` block, and each role becomes a link to the object's entry where the reference documents it (plain code
where it does not: a role never fails the strict build).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:mod|class|func|meth|attr|data|obj|exc|const):`(?P<body>[^`]+)`")
_EXPLICIT = re.compile(r"(?P<title>.*?)\s*<(?P<target>[^<>]+)>$")


def _fence_doctests(text: str) -> str:
    """Wrap every run of ``>>>`` lines and the output after them (up to a blank line) in a ``pycon`` fence."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = len(lines[i]) - len(stripped)
        block: list[str] = []
        while i < len(lines) and lines[i].strip():
            line = lines[i]
            block.append(line[indent:] if len(line) - len(line.lstrip()) >= indent else line.lstrip())
            i += 1
        if out and out[-1].strip():
            out.append("")
        out += ["```pycon", *block, "```", ""]
    return "\n".join(out)


def _link_roles(text: str, obj: griffe.Object) -> str:
    def link(match: re.Match[str]) -> str:
        body = match["body"].strip()
        if explicit := _EXPLICIT.match(body):
            title, target = explicit["title"], explicit["target"]
        else:
            target = body.lstrip("~")
            title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
        target = target.lstrip("~.").removesuffix("()")
        if "." not in target or not target.startswith("patchscopes"):
            try:
                target = obj.resolve(target)
            except (griffe.NameResolutionError, ValueError, KeyError):
                pass
        return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'

    parts, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        parts.append(line if fenced or line.lstrip().startswith("```") else _ROLE.sub(link, line))
    return "\n".join(parts)


class DocstringsForTheSite(griffe.Extension):
    """Rewrites each docstring as it loads (fenced doctests, linked roles); the package's own text is unchanged."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _link_roles(_fence_doctests(obj.docstring.value), obj)
