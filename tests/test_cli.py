"""The `switchyard` command line: every subcommand parses its flags."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("args", "expect"), [
    (["--help"], "up"),
    (["up", "--help"], "--replica"),
    (["usage", "--help"], "--group-by"),
    (["billing", "statement", "--help"], "--month"),
    (["sim", "--help"], "--replicas"),
    (["tenants", "update", "--help"], "--max-concurrent"),
    (["keys", "rotate", "--help"], "--grace-s"),
])
def test_subcommands_parse_their_flags(args: list[str], expect: str) -> None:
    done = subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert expect in done.stdout


def test_sim_takes_its_own_flags() -> None:
    done = subprocess.run([sys.executable, "-m", "deploy.cli", "sim", "--replicas", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--replicas" in done.stderr
