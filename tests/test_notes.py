"""docs/notes.md: every command runs, and every line shown under it is still what it prints."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cnnlab import cli

ROOT = Path(__file__).parents[1]
NOTES = (ROOT / "docs" / "notes.md").read_text()
EXAMPLES = re.findall(r"```sh\n(cnnlab [^\n]+)\n```\s*```text\n(.*?)```", NOTES, flags=re.S)


def normalised(line: str) -> str:
    return " ".join(line.split())


def test_the_notes_hold_worked_examples() -> None:
    assert len(EXAMPLES) >= 9


@pytest.mark.parametrize(("command", "expected"), EXAMPLES, ids=[c for c, _ in EXAMPLES])
def test_every_figure_in_the_notes_is_what_cnnlab_prints(
    command: str, expected: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the commands name docs/examples.py
    monkeypatch.delenv("COLUMNS", raising=False)  # piped: 80 columns; the notes ask --wide
    assert cli.main(shlex.split(command)[1:]) == 0
    printed = {normalised(line) for line in capsys.readouterr().out.splitlines()}
    for line in expected.strip().splitlines():
        assert normalised(line) in printed, f"{command}: no longer prints\n{line}"
