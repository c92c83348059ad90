"""Shell completion scripts in completions/ are current, and completion reaches every command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_completion_scripts_are_not_stale():
    res = subprocess.run([sys.executable, str(ROOT / "completions" / "generate.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def _complete(words: str, cword: int) -> list[str]:
    env = {**os.environ, "_DIFFPRUNE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    out = subprocess.run([sys.executable, "-c", "from diffcli.cli.app import run; run()"], env=env,
                         capture_output=True, text=True)
    return out.stdout.split()


def test_bash_completion_lists_every_command_and_options():
    from diffcli.cli.commands import names

    assert set(_complete("diffprune ", 1)) == set(names())
    assert "--json" in _complete("diffprune inspect --", 2)
    for shell_file, needle in (("diffprune.bash", "complete_bash"), ("_diffprune", "complete_zsh"),
                               ("diffprune.fish", "complete_fish")):
        assert needle in (ROOT / "completions" / shell_file).read_text()


def test_fish_and_zsh_get_one_line_per_candidate():
    """Each candidate's help on one line: the scripts set COLUMNS wide, so Rich does not wrap a long help."""
    for shell, script in (("fish", "diffprune.fish"), ("zsh", "_diffprune")):
        text = (ROOT / "completions" / script).read_text()
        assert f"COLUMNS=4096 _DIFFPRUNE_COMPLETE=complete_{shell}" in text
    env = {**os.environ, "COLUMNS": "4096", "_DIFFPRUNE_COMPLETE": "complete_fish",
           "_TYPER_COMPLETE_FISH_ACTION": "get-args", "_TYPER_COMPLETE_ARGS": "diffprune train --"}
    out = subprocess.run([sys.executable, "-c", "from diffcli.cli.app import run; run()"], env=env,
                         capture_output=True, text=True).stdout.splitlines()
    assert len(out) > 20 and all(line.startswith("--") and "\t" in line for line in out)


def test_any_completion_script_gets_one_line_per_candidate_at_a_narrow_terminal():
    """--install-completion writes Typer's own script, without COLUMNS: the app asks for one long line itself."""
    for shell in ("fish", "zsh"):
        env = {**os.environ, "COLUMNS": "40", "_DIFFPRUNE_COMPLETE": f"complete_{shell}",
               "_TYPER_COMPLETE_FISH_ACTION": "get-args", "_TYPER_COMPLETE_ARGS": "diffprune train --"}
        out = subprocess.run([sys.executable, "-c", "from diffcli.cli.app import run; run()"], env=env,
                             capture_output=True, text=True).stdout.splitlines()
        if shell == "fish":
            assert len(out) > 20 and all(line.startswith("--") and "\t" in line for line in out), out[:5]
        else:  # zsh: _arguments '*: :(( then "option":"help" per line, then ))'
            lines = [re.sub(r"^_arguments '\*: :\(\(|\)\)'$", "", line) for line in out]
            assert len(lines) > 20 and all(re.fullmatch(r'"--[a-z0-9-]+":".*"', ln) for ln in lines), lines[:5]
