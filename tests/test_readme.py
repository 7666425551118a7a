"""The README's examples are the tool's real output: every code block that starts with
`$ paca-prof ...` is run (in a fresh folder, with this checkout's code) and its printed lines
must appear in the output, in order. In the README, `...` stands for lines left out and
`<placeholder>` for a part that differs per run (a time stamp)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, checkout_env

README = ROOT / "README.md"


def examples() -> list[tuple[str, list[str]]]:
    """(command, expected lines) for each README block that shows a paca-prof command."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), flags=re.DOTALL):
        lines = block.rstrip("\n").splitlines()
        if lines and lines[0].startswith("$ paca-prof "):
            found.append((lines[0].removeprefix("$ "), lines[1:]))
    return found


def _pattern(line: str) -> re.Pattern:
    parts = re.split(r"<[^<>\s]+>", line)
    return re.compile("^" + ".+".join(re.escape(p) for p in parts) + "$")


def matches(expected: list[str], output: list[str]) -> tuple[bool, str]:
    """Whether `output` shows `expected` in order: consecutive expected lines are consecutive
    output lines, except across a `...` line, which skips any number of output lines."""
    position, skipping = 0, False
    for line in expected:
        if line == "...":
            skipping = True
            continue
        pattern = _pattern(line)
        while position < len(output) and not pattern.match(output[position]):
            if not skipping:
                return False, f"expected {line!r}, got {output[position]!r}"
            position += 1
        if position == len(output):
            return False, f"{line!r} not found"
        position, skipping = position + 1, False
    if not skipping and position != len(output):
        return False, f"unexpected extra output from {output[position]!r}"
    return True, ""


def test_matching_rules():
    assert matches(["a", "...", "c <x>"], ["a", "b", "b", "c 12"]) == (True, "")
    assert not matches(["a", "c"], ["a", "b", "c"])[0]  # no skipping without ...
    assert not matches(["a"], ["a", "b"])[0]  # output beyond the block must be shown or ...
    assert matches(["a", "..."], ["a", "b"])[0]
    assert not matches(["b", "a"], ["a", "b"])[0]  # order matters


def test_readme_has_the_main_job_and_the_planner():
    commands = [command for command, _ in examples()]
    assert "paca-prof run --model llama3-8b --seq 4096" in commands
    assert any(c.startswith("paca-prof plan --model llama3-8b") for c in commands)


@pytest.mark.parametrize("command, expected", examples(), ids=[c for c, _ in examples()])
def test_readme_example_is_the_real_output(command, expected, tmp_path):
    argv = [sys.executable, "-m", "paca_prof.cli", *shlex.split(command)[1:]]
    done = subprocess.run(argv, cwd=tmp_path, env=checkout_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    ok, why = matches(expected, done.stdout.rstrip("\n").splitlines())
    assert ok, f"README example `{command}` is out of date: {why}"
