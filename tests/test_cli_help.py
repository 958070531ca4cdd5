"""Every command's --help runs in a real process of an installed fedsens.

The suite's own CliRunner tests share one interpreter and the dev extra's versions (Flower pins typer < 0.21);
this test runs the `fedsens` executable, so `.ci/run` points it at the environment the README's main command
installed (no extras, the newest releases pip picks) with FEDSENS_EXE, and a typer or click change that breaks
the command line fails there too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from fedsens.cli import app


def fedsens_executable() -> str:
    """FEDSENS_EXE when set (CI's main-command environment), else the fedsens beside this interpreter."""
    chosen = os.environ.get("FEDSENS_EXE")
    if chosen:
        return chosen
    beside = Path(sys.executable).with_name("fedsens")
    found = str(beside) if beside.exists() else shutil.which("fedsens")
    if found is None:
        pytest.skip("no installed fedsens executable")
    return found


def command_paths(command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group of the click tree, as the words typed after `fedsens`."""
    paths = [prefix]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        paths += command_paths(sub, (*prefix, name))
    return paths


COMMANDS = command_paths(typer.main.get_command(app))


def test_the_tree_holds_every_registered_command():
    # the walk must reach the nested groups, or the test below would check only the top level
    assert ("data", "split") in COMMANDS and ("flower", "app") in COMMANDS and ("train",) in COMMANDS


@pytest.mark.parametrize("words", COMMANDS, ids=lambda words: " ".join(words) or "fedsens")
def test_help_exits_zero_in_a_real_process(words):
    exe = fedsens_executable()
    done = subprocess.run([exe, *words, "--help"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"`fedsens {' '.join(words)} --help` exited {done.returncode}:\n{done.stderr}"
    assert "Usage:" in done.stdout and "Traceback" not in done.stderr


def test_a_bad_method_name_is_one_line_in_a_real_process():
    # --method goes through typer's parser= hook, the part of the command line that broke under typer 0.29
    exe = fedsens_executable()
    done = subprocess.run([exe, "train", "--method", "nope"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "unknown method 'nope'" in done.stderr
    assert "Traceback" not in done.stderr
