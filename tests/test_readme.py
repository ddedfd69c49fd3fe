"""The README's Python example runs as written; its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_python_example_runs(smol, capsys):
    [code] = re.findall(r"```python\n(.*?)\n```", README, flags=re.S)
    assert len(code.splitlines()) <= 12
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "source_layer" in out and "top1" in out
