"""The `diffprune` Typer app: global options, command registration and the error boundary."""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Callable, Optional

import typer

from diffcli import __version__
from diffcli.cli._errors import EXIT_USAGE, classify
from diffcli.cli.output import Output

def _new_app() -> typer.Typer:
    return typer.Typer(
        name="diffprune",
        help="Learn, prune, pack, apply and inspect sparse task diffs of a frozen pretrained model.",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diffprune {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """diffprune: parameter-efficient transfer learning with diff pruning."""


def guarded(fn: Callable) -> Callable:
    """Run a command so that any library error becomes one stderr line and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - this is the CLI's error boundary
            if os.environ.get("DIFFPRUNE_DEBUG"):
                raise
            code, message, hint = classify(exc)
            Output().error(message, hint)
            raise typer.Exit(code) from None

    return wrapper


def build(only: str | None = None) -> typer.Typer:
    """The app with every subcommand, or with `only` that one (its module alone is imported: `diffprune train`
    imports no other command's code). Command modules import torch only inside the command bodies."""
    import importlib

    from diffcli.cli import commands

    new = _new_app()
    new.callback()(_root)
    for name, module, attr in commands.COMMANDS:
        if only is None or name == only:
            new.command(name)(guarded(getattr(importlib.import_module(module), attr)))
    return new


_full: typer.Typer | None = None


def __getattr__(name: str):
    """`app`: the app with every subcommand (tests, completion scripts), built on first use."""
    global _full
    if name == "app":
        if _full is None:
            _full = build()
        return _full
    raise AttributeError(name)


def _writes_stdout(args: list[str]) -> bool:
    """Whether the command's result goes to stdout as data (`--json`, `-o -`); human lines to a closed one are lost."""
    return "--json" in args or "--output=-" in args or any(
        a in ("-o", "--output") and b == "-" for a, b in zip(args, args[1:]))


def run(argv: list[str] | None = None) -> int:
    """Entry point that turns usage errors into one line as well; returns the exit code."""
    from diffcli.cli.commands import names

    args = sys.argv[1:] if argv is None else list(argv)
    if sys.stdout is None and _writes_stdout(args):  # fd 1 closed (`>&-`): refused before the work, not at its end
        Output().error("standard output is closed, and --json or -o - writes the result there",
                       "redirect it instead, e.g. >/dev/null")
        return 1
    if os.environ.get("_DIFFPRUNE_COMPLETE", "").startswith(("complete_zsh", "complete_fish")):
        # Rich wraps a candidate's help at the terminal's width, and each wrapped line reads as a candidate: one long
        # line, whatever script asked (completions/, or the one --install-completion writes)
        os.environ["COLUMNS"] = "4096"
    # `diffprune CMD ...` builds CMD alone; anything else (root help, a typo, completion) the whole app
    target = build(args[0]) if args and args[0] in names() else __getattr__("app")
    try:
        rv = target(args=argv, prog_name="diffprune", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        Output().error("aborted")
        return 130
    except typer.TyperException as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        Output().error(message, "see `diffprune --help`")
        return getattr(exc, "exit_code", EXIT_USAGE) or EXIT_USAGE
    return rv if isinstance(rv, int) else 0


def main() -> None:
    """`diffprune`: run one command and exit with its code."""
    code = run()
    from diffcli.dist import launched_world

    if launched_world() > 1:
        _exit_rank(code)
    sys.exit(code)


def _exit_rank(code: int) -> None:
    """End a torchrun rank after its exit handlers, skipping the teardown in which gloo's threads may abort it."""
    import atexit

    atexit._run_exitfuncs()  # every handler still runs (train's leaves the process group), in the usual order
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken pipe: nothing more can reach it
    os._exit(code)
