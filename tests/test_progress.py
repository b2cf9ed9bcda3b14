"""The progress bar of the long commands (fora_fx.bench.progress.bar): drawn on a terminal,
silent when stderr is a pipe or a file, and silent with --quiet even on a terminal. The main
job's output through a pipe has no bar frames in it."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from fora_fx.bench.progress import bar

ROOT = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _draw(monkeypatch, stream, quiet=False) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    with bar(3, "sampling", quiet) as b:
        for _ in range(3):
            b.set_postfix_str("fora N=3")
            b.update()
    return stream.getvalue()


def test_bar_draws_on_a_terminal(monkeypatch):
    out = _draw(monkeypatch, Terminal())
    assert "sampling" in out and "/3 [" in out and "fora N=3" in out and "\r" in out


def test_bar_is_silent_when_stderr_is_not_a_terminal(monkeypatch):
    assert _draw(monkeypatch, io.StringIO()) == ""


def test_quiet_silences_the_bar_on_a_terminal(monkeypatch):
    assert _draw(monkeypatch, Terminal(), quiet=True) == ""


def test_eval_and_bench_and_training_take_quiet():
    from fora_fx import cli
    from fora_fx.quality import train

    for argv in (["bench", "--quick", "--quiet", "--help"], ["eval", "--quiet", "--help"]):
        try:
            cli.main(argv)
        except SystemExit as e:  # --help exits 0 after parsing every flag before it
            assert e.code == 0
    try:
        train.main(["--quiet", "--help"])
    except SystemExit as e:
        assert e.code == 0
