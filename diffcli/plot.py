"""Heatmaps of where diffs spend their budget: a row per layer, a column per tensor kind, one panel per diff."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from diffcli.errors import DiffpruneError, InvalidValueError
from diffcli.outputs import atomic_file, check_output
from diffcli.tensor_roles import COLUMNS, role_of, row_order

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = {".png": "png", ".svg": "svg"}
MEASURES = ("density", "bytes")
DPI = 150
_CELL_W, _CELL_H = 0.55, 0.3  # inches per heatmap cell
_ANNOTATE_MAX_ROWS = 48  # past this, numbers in cells would be unreadable
INSTALL_HINT = "install the plot extra: pip install 'diffprune[plot]'"


@dataclass
class Cell:
    """What one diff stores for one (layer, tensor kind): update parameters, entries covered, bytes, record kinds."""

    nnz: int = 0
    numel: int = 0
    bytes: int = 0
    kinds: set[str] = field(default_factory=set)
    bases: int = 0  # a basis record counts bases, not entries: the matrix's own record covers its entries

    def value(self, by: str) -> float:
        if by == "bytes":
            return float(self.bytes)
        covered = self.numel or self.bases
        return self.nnz / covered if covered else 0.0


def cells(report: dict[str, Any]) -> dict[tuple[str, str], Cell]:
    """Sum a report's tensor rows (every record kind) by (layer row, tensor-kind column)."""
    grid: dict[tuple[str, str], Cell] = {}
    for r in report["tensors"]:
        cell = grid.setdefault(tuple(role_of(r["tensor"])), Cell())
        cell.nnz += int(r["nnz"])
        if r["kind"] == "basis":
            cell.bases += int(r["numel"])
        else:
            cell.numel += int(r["numel"])
        cell.bytes += int(r["bytes"])
        cell.kinds.add(str(r["kind"]))
    return grid


def check_measure(by: str) -> str:
    if by not in MEASURES:
        raise InvalidValueError(f"unknown --plot-by {by!r}", hint="use density or bytes")
    return by


def plot_format(path: str | Path) -> str:
    """The savefig format for an output path, from its extension; anything but .png or .svg is refused."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise InvalidValueError(f"cannot tell the plot format of {path}", hint="name a .png or .svg file")
    return fmt


def _matplotlib() -> None:
    import importlib

    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise DiffpruneError("--plot needs matplotlib, which is not installed", hint=INSTALL_HINT) from None


def _fmt_value(v: float, by: str) -> str:
    if by == "bytes":
        for unit in ("", "K", "M", "G"):
            if v < 1000 or unit == "G":
                return f"{v:.0f}{unit}" if unit == "" or v >= 10 else f"{v:.1f}{unit}"
            v /= 1024
    if v == 0:
        return "0"
    pct = v * 100
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.1f}%" if pct >= 1 else f"{pct:.2f}%" if pct >= 0.01 else "<.01%"


def _title(report: dict[str, Any], grid: dict[tuple[str, str], Cell]) -> str:
    t = report["totals"]
    kinds = sorted({k for c in grid.values() for k in c.kinds})
    share = t["params"] / t["budget_numel"] if t["budget_numel"] else 0.0  # every kind's update parameters
    return (f"{Path(report['path']).name}\n{t['params']:,} update parameters ({share:.3%} of "
            f"{t['budget_numel']:,} entries), "
            f"{report['size_bytes']:,} B\nrecords: {', '.join(kinds) or 'none'}")


def figure(reports: Iterable[dict[str, Any]], by: str = "density") -> "Figure":
    """One heatmap panel per report (axes with gid 'panel-1', 'panel-2', ...), one shared log colour scale.

    Rows are layers and columns tensor kinds (`diffcli.tensor_roles`), the union over all reports so panels
    line up; a cell is Σnnz/Σnumel (density) or Σbytes of the tensors it holds. Empty cells stay blank and
    cells with nothing stored are grey. Draws with the Agg-based Figure API: no pyplot, no display needed.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    check_measure(by)
    reports = list(reports)
    if not reports:
        raise InvalidValueError("nothing to plot", hint="name at least one diff")
    grids = [cells(r) for r in reports]
    keys = {k for g in grids for k in g}
    if not keys:
        raise InvalidValueError("the diffs hold no tensors: nothing to plot")
    rows = sorted({r for r, _ in keys}, key=row_order)
    cols = [c for c in COLUMNS if any(k[1] == c for k in keys)]
    data = np.full((len(grids), len(rows), len(cols)), np.nan)
    for p, g in enumerate(grids):
        for (r, c), cell in g.items():
            data[p, rows.index(r), cols.index(c)] = cell.value(by)
    positive = data[data > 0]
    vmax = float(positive.max()) if positive.size else 1.0
    vmin = float(positive.min()) if positive.size else vmax / 10
    if vmin >= vmax:
        vmin = vmax / 10
    cmap = colormaps["viridis"].with_extremes(bad="white", under="#d9d9d9")
    norm = LogNorm(vmin=vmin, vmax=vmax)

    width = len(grids) * (len(cols) * _CELL_W + 0.4) + 2.6
    height = len(rows) * _CELL_H + 2.4
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(grids), squeeze=False, sharey=True)[0]
    image = None
    for p, (ax, report, grid) in enumerate(zip(axes, reports, grids)):
        shown = np.where(data[p] == 0, vmin / 2, data[p])  # zeros fall under the scale: grey
        image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, norm=norm, aspect="auto",
                          interpolation="nearest")
        ax.set_gid(f"panel-{p + 1}")
        ax.set_title(_title(report, grid), fontsize=8, parse_math=False)  # a '$' in a file name is no mathtext
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.tick_params(length=0)
        if len(rows) <= _ANNOTATE_MAX_ROWS:
            for (i, j), v in np.ndenumerate(data[p]):
                if not math.isnan(v):
                    light = v > 0 and norm(v) > 0.6
                    ax.text(j, i, _fmt_value(v, by), ha="center", va="center", fontsize=5.5,
                            color="black" if light or v == 0 else "white")
    label = "density (update parameters / entries covered)" if by == "density" else "stored bytes (K = 1024)"
    bar = fig.colorbar(image, ax=list(axes), shrink=0.8, extend="min" if (data == 0).any() else "neither")
    bar.set_label(label, fontsize=8)
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_value(v, by)))
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
    bar.ax.tick_params(labelsize=7)
    return fig


def save(fig: "Figure", out: str | Path, force: bool = False) -> Path:
    """Write a figure atomically (temporary file, then rename); the format follows the extension."""
    import matplotlib

    fmt = plot_format(out)
    # Fixed ids and no date: the same diffs give the same SVG bytes.
    with matplotlib.rc_context({"svg.hashsalt": "diffprune"}), atomic_file(out, force) as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI, metadata={"Date": None} if fmt == "svg" else None)
    return Path(out)


def inspect_and_plot(paths: Iterable[str | Path], out: str | Path, by: str = "density",
                     force: bool = False) -> list[dict[str, Any]]:
    """Inspect every diff and draw them side by side into `out`; all checks run before anything is read."""
    from diffcli.report import inspect

    plot_format(out)
    check_measure(by)
    check_output(Path(out), force)
    _matplotlib()
    reports = [inspect(p) for p in paths]
    save(figure(reports, by), out, force=force)
    return reports
