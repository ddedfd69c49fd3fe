"""Progress bars: a tqdm widget in a notebook kernel, a rich bar elsewhere, nothing when disabled."""

from __future__ import annotations

import sys
import types

from patchscopes import progress


def _fake_ipython(monkeypatch, shell_class: str) -> None:  # noqa: ANN001
    shell = type(shell_class, (), {})()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))


def test_notebook_detection(monkeypatch) -> None:  # noqa: ANN001
    assert not progress.in_notebook()  # plain python
    _fake_ipython(monkeypatch, "TerminalInteractiveShell")
    assert not progress.in_notebook()  # the IPython console is a terminal
    _fake_ipython(monkeypatch, "ZMQInteractiveShell")
    assert progress.in_notebook()


def test_a_notebook_gets_a_tqdm_bar_that_counts(monkeypatch, capsys) -> None:  # noqa: ANN001
    _fake_ipython(monkeypatch, "ZMQInteractiveShell")
    with progress.progress_bar(3, "units") as advance:
        for _ in range(3):
            advance(1)
    err = capsys.readouterr().err  # outside a real kernel tqdm.auto falls back to the text bar
    assert "units" in err and "3/3" in err


def test_disabled_bars_print_nothing(monkeypatch, capsys) -> None:  # noqa: ANN001
    _fake_ipython(monkeypatch, "ZMQInteractiveShell")
    with progress.progress_bar(3, "units", enabled=False) as advance:
        advance(3)
    assert capsys.readouterr().err == ""
