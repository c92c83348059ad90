"""All terminal output: human (rich), --json (one JSON document on stdout) and --quiet modes."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from typing import Annotated, Any, Callable, Iterator

import typer
from rich.console import Console

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]


class Output:
    """Routes results to stdout and everything else (info, warnings, errors, progress) to stderr."""

    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        _LibraryLog.route_to(self)

    def result(self, data: Any, render: Callable[[Console], None] | None = None) -> None:
        """Emit a command's result: JSON in --json mode, else the human rendering (unless quiet)."""
        if self.json_mode:
            from diffcli.json_safe import finite  # NaN/Infinity are not JSON: a diverged metric prints null

            text = json.dumps(finite(data), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        elif not self.quiet and render is not None:
            render(self.out)

    def info(self, message: str) -> None:
        """A human progress/info line on stderr (hidden by --quiet and --json)."""
        if not self.quiet and not self.json_mode:
            self.err.print(message, markup=False)

    def warn(self, message: str) -> None:
        """A warning on stderr; shown in every mode because it changes what the result means."""
        self.err.print(f"warning: {message}", markup=False, style="yellow")

    def error(self, message: str, hint: str | None = None) -> None:
        """The single error line on stderr."""
        line = f"error: {message}"
        if hint:
            line += f" (hint: {hint})"
        # Plain write: no wrapping, so the error stays on exactly one line.
        sys.stderr.write(line.replace("\n", " ") + "\n")
        sys.stderr.flush()

    @property
    def show_bars(self) -> bool:
        return not self.quiet and not self.json_mode and self.err.is_terminal

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator["ProgressHandle"]:
        """A rich progress bar on a TTY; occasional plain lines otherwise; nothing when quiet."""
        if self.show_bars:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            # description and status hold names from files (apply's tensor names): shown as text, never as markup
            with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[status]}", markup=False), TimeElapsedColumn(), TextColumn("eta"),
                          TimeRemainingColumn(), console=self.err, transient=False) as bar:
                task = bar.add_task(description, total=total, status="")
                yield ProgressHandle(lambda n, status: bar.update(task, advance=n, status=status))
        elif self.quiet or self.json_mode:
            yield ProgressHandle(lambda n, status: None)
        else:
            yield ProgressHandle(_PlainLines(self, description, total))


class _LibraryLog(logging.Handler):
    """Shows the library's `diffcli.*` log records as this command's warnings (WARNING and up) and info lines."""

    def __init__(self, out: Output):
        super().__init__(logging.INFO)
        self.out = out

    @classmethod
    def route_to(cls, out: Output) -> None:
        lib = logging.getLogger("diffcli")
        for old in [h for h in lib.handlers if isinstance(h, cls)]:
            lib.removeHandler(old)
        lib.addHandler(cls(out))
        lib.setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        (self.out.warn if record.levelno >= logging.WARNING else self.out.info)(record.getMessage())


class ProgressHandle:
    """What a command advances; `status` is a short text such as 'loss 0.41 density 0.6%'."""

    def __init__(self, sink: Callable[[int, str], None]):
        self._sink = sink

    def advance(self, n: int = 1, status: str = "") -> None:
        self._sink(n, status)


class _PlainLines:
    """Progress as plain lines on stderr, at most one every few seconds, for logs and CI."""

    def __init__(self, out: Output, description: str, total: int | None, every_s: float = 10.0):
        self.out, self.description, self.total, self.every_s = out, description, total, every_s
        self.done = 0
        self.last = time.monotonic()

    def __call__(self, n: int, status: str) -> None:
        self.done += n
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if now - self.last >= self.every_s or finished:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            self.out.info(f"{self.description}: {self.done}{of} {status}".rstrip())


def _json_default(obj: Any) -> Any:
    from diffcli.json_safe import finite

    if hasattr(obj, "item"):  # numpy and torch scalars (a float32 NaN included)
        return finite(obj.item())
    if isinstance(obj, (set, tuple)):
        return finite(list(obj))
    return str(obj)
