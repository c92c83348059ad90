"""Regenerate the shell completion scripts from the app: `python completions/generate.py [--check]`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = {"bash": "diffprune.bash", "zsh": "_diffprune", "fish": "diffprune.fish"}
# Typer renders an option's help through Rich at the terminal's width: a wrapped help is several lines, and fish
# reads each as a candidate of its own (zsh's "value":"help" lines break too), so the scripts ask for one long line.
WIDE = "COLUMNS=4096 "


def script(shell: str) -> str:
    """The completion script Typer emits for `shell` (the standard `_DIFFPRUNE_COMPLETE=source_<shell>` hook)."""
    env = {**os.environ, "_DIFFPRUNE_COMPLETE": f"source_{shell}"}
    code = "from diffcli.cli.app import run; run()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    text = out.stdout.rstrip("\n") + "\n"
    hook = f"_DIFFPRUNE_COMPLETE=complete_{shell}"
    return text.replace(hook, WIDE + hook) if shell in ("zsh", "fish") else text


def main(argv: list[str]) -> int:
    stale = []
    for shell, name in FILES.items():
        text = script(shell)
        path = HERE / name
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale completion scripts: {', '.join(stale)}; run `python completions/generate.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
