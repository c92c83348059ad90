"""Per-tensor and per-layer reports on a diff (checkpoint or packed file): what `inspect` and `prune` print."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.markup import escape

from diffcli.diff import Diff
from diffcli.errors import NotFoundError

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_of(name: str) -> str:
    """Group key for a tensor: 'layer 3', 'embeddings', 'pooler', 'classifier', ..."""
    m = _LAYER.search(name)
    if m:  # an encoder-decoder's two stacks stay apart (BART, T5): their layer 0s are different tensors
        decoder = "decoder" in name[:m.start()].split(".")
        return f"{'decoder ' if decoder else ''}layer {int(m.group(1)):02d}"
    for key in ("embeddings", "pooler", "classifier", "classification_head", "head"):
        if key in name.split("."):
            return key
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 else parts[0]


def _numel(shape: list[int] | tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def rows_from_diff(diff: Diff) -> list[dict[str, Any]]:
    """One row per tensor of an in-memory diff; bytes are what the checkpoint stores."""
    rows = []
    for name, td in sorted(diff.tensors.items()):
        nnz = td.nnz
        if td.is_lowrank:  # nnz counts B's and A's entries
            rows.append({"tensor": name, "kind": "lowrank", "shape": list(td.shape), "numel": td.numel, "nnz": nnz,
                         "rank": int(td.factors[0].shape[1]), "bytes": nnz * 4, "budget": td.is_float})
            continue
        stored = td.numel * 4 if td.is_dense else nnz * 12
        rows.append({"tensor": name, "kind": "dense-diff" if td.is_dense else "sparse", "shape": list(td.shape),
                     "numel": td.numel, "nnz": nnz, "bytes": stored, "budget": td.is_float})
    for name, bs in sorted(diff.bases.items()):  # basis scales: numel the bases, nnz the kept scales
        rows.append({"tensor": name, "kind": "basis", "shape": [bs.rank], "numel": bs.rank, "nnz": bs.nkept,
                     "bytes": bs.nkept * 12, "budget": False})
    for name, t in sorted(diff.extras.items()):
        n = int(t.numel())
        rows.append({"tensor": name, "kind": "dense", "shape": list(t.shape), "numel": n, "nnz": n,
                     "bytes": n * t.element_size(), "budget": False})
    return rows


def summarize(rows: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """Rows grouped by layer, with totals; `density` counts only budget (shared float) tensors."""
    layers: dict[str, dict[str, Any]] = {}
    for r in rows:
        r["density"] = r["nnz"] / r["numel"] if r["numel"] else 0.0
        r["layer"] = layer_of(r["tensor"])
        g = layers.setdefault(r["layer"], {"layer": r["layer"], "tensors": 0, "numel": 0, "nnz": 0, "bytes": 0})
        g["tensors"] += 1
        g["numel"] += r["numel"]
        g["nnz"] += r["nnz"]
        g["bytes"] += r["bytes"]
    for g in layers.values():
        g["density"] = g["nnz"] / g["numel"] if g["numel"] else 0.0
    budget_n = sum(r["numel"] for r in rows if r["budget"])
    budget_nnz = sum(r["nnz"] for r in rows if r["budget"])
    extras = [r for r in rows if r["kind"] == "dense"]
    params = sum(r["nnz"] for r in rows if r["kind"] != "dense")
    totals = {"tensors": len(rows), "budget_numel": budget_n, "nnz": budget_nnz, "params": params,
              "density": budget_nnz / budget_n if budget_n else 0.0,
              "extras": len(extras), "extras_numel": sum(r["numel"] for r in extras),
              "bytes": sum(r["bytes"] for r in rows)}
    return {**info, "totals": totals, "layers": sorted(layers.values(), key=lambda g: _layer_sort(g["layer"])),
            "tensors": rows}


def _layer_sort(key: str) -> tuple[int, str]:
    order = {"embeddings": 0, "pooler": 2, "classifier": 3}
    return (order.get(key, 1), key)


def inspect(path: str | Path) -> dict[str, Any]:
    """Report on a checkpoint folder or a packed `.diff` file without changing anything."""
    from diffcli import checkpoint

    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist")
    if path.is_dir():
        diff = checkpoint.load(path)
        info = {"path": str(path), "kind": "checkpoint", "base": {"ref": diff.base_ref,
                "fingerprint": diff.base_fingerprint}, "config": _config_brief(diff.config), "meta": diff.meta,
                "size_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file())}
        return summarize(rows_from_diff(diff), info)
    from diffcli import artifact

    header = artifact.read_header(path)
    rows, described = artifact.describe(header)
    size = path.stat().st_size
    split = described["bytes"]
    split = {"header": size - sum(split.values()), **split}
    info = {"path": str(path), "kind": "packed", "format_version": header["version"], "producer": header["producer"],
            "base": header["base"], "values": described["values"]["quantizer"], "quantizer": described["values"],
            "max_abs_error": described["values"]["max_abs_error"], "config": _config_brief(header["config"]),
            "meta": header["meta"], "size_bytes": size, "bytes": split}
    return summarize(rows, info)


def _config_brief(config: dict[str, Any]) -> dict[str, Any]:
    """The config keys `inspect` shows, as the file has them (num_labels from id2label when it is a mapping)."""
    keys = ("architectures", "model_type", "num_labels", "id2label", "problem_type")
    brief = {k: config[k] for k in keys if k in config}
    if "num_labels" not in brief and isinstance(config.get("id2label"), (dict, list)):
        brief["num_labels"] = len(config["id2label"])
    return brief


def allocation_report(projection) -> dict[str, Any]:
    """What `prune` prints: the budget, and how many entries each layer kept."""
    layers: dict[str, dict[str, Any]] = {}
    for a in projection.allocation:
        g = layers.setdefault(layer_of(a.name), {"layer": layer_of(a.name), "numel": 0, "nonzero": 0, "kept": 0})
        g["numel"] += a.numel
        g["nonzero"] += a.nonzero
        g["kept"] += a.kept
    for g in layers.values():
        g["density"] = g["kept"] / g["numel"] if g["numel"] else 0.0
        g["share"] = g["kept"] / projection.kept if projection.kept else 0.0
    return {"sparsity": projection.sparsity, "scope": projection.scope, "n": projection.n, "k": projection.k,
            "kept": projection.kept, "extras": sorted(projection.diff.extras),
            "layers": sorted(layers.values(), key=lambda g: _layer_sort(g["layer"])),
            "tensors": [a.__dict__ for a in projection.allocation]}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def render_allocation(console, report: dict[str, Any]) -> None:
    from rich.table import Table

    share = report["kept"] / report["n"] if report["n"] else 0.0  # what was kept; the flag's share may be more
    table = Table(title=f"kept {report['kept']:,} of {report['n']:,} entries "
                        f"({share:.4%}; --sparsity {report['sparsity']:.4%}, {report['scope']})")
    for col in ("layer", "numel", "nonzero", "kept", "density", "share of k"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for g in report["layers"]:
        table.add_row(escape(g["layer"]), f"{g['numel']:,}", f"{g['nonzero']:,}", f"{g['kept']:,}",
                      f"{g['density']:.3%}", f"{g['share']:.1%}")
    console.print(table)
    if report["kept"] < report["k"]:
        console.print(f"note: δ has only {report['kept']:,} nonzero entries, fewer than k = {report['k']:,}")
    if report["extras"]:
        console.print(f"dense extras (outside the budget): {escape(', '.join(report['extras']))}")


def render_report(console, report: dict[str, Any], per_tensor: bool = False) -> None:
    from rich.table import Table

    t = report["totals"]
    console.print(f"[bold]{escape(str(report['path']))}[/bold] ({report['kind']}, {_fmt_bytes(report['size_bytes'])})")
    console.print(f"base: {escape(str(report['base'].get('ref')))}  "
                  f"fingerprint: {escape(str(report['base'].get('fingerprint')))}")
    if report.get("values"):
        q = report["quantizer"]
        block = f" (blocks of {q['block']})" if q.get("block") else ""
        rel = f"  max rel error: {q['max_rel_error']:.3g}" if q.get("max_rel_error") is not None else ""
        console.print(f"values: {report['values']}{block}  max abs error: {report['max_abs_error']:.3g}{rel}  "
                      f"format v{report['format_version']} by {escape(str(report['producer']))}")
        console.print("bytes: " + ", ".join(f"{k} {v:,}" for k, v in report["bytes"].items()))
    if report["config"]:
        console.print("config: " + escape(", ".join(f"{k}={v}" for k, v in report["config"].items())))
    for key in ("task", "metrics"):
        if key in report["meta"]:
            console.print(f"{key}: {escape(str(report['meta'][key]))}")
    if isinstance(report["meta"].get("units"), list):
        _render_units(console, report["meta"]["units"], per_tensor)
    table = Table(title="per layer")
    for col in ("layer", "tensors", "numel", "nnz", "density", "bytes"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for g in report["layers"]:
        table.add_row(escape(g["layer"]), str(g["tensors"]), f"{g['numel']:,}", f"{g['nnz']:,}", f"{g['density']:.3%}",
                      _fmt_bytes(g["bytes"]))
    console.print(table)
    if per_tensor:
        tt = Table(title="per tensor")
        for col in ("tensor", "kind", "shape", "numel", "nnz", "density", "bytes"):
            tt.add_column(col, justify="left" if col in ("tensor", "kind", "shape") else "right",
                          overflow="fold" if col == "tensor" else "ellipsis")  # a piped table keeps whole names
        for r in report["tensors"]:
            tt.add_row(escape(r["tensor"]), r["kind"], "×".join(map(str, r["shape"])) or "scalar", f"{r['numel']:,}",
                       f"{r['nnz']:,}", f"{r['density']:.3%}", _fmt_bytes(r["bytes"]))
        console.print(tt)
    basis = [r for r in report["tensors"] if r["kind"] == "basis"]
    if basis:
        console.print(f"basis scales: {sum(r['nnz'] for r in basis):,} kept of {sum(r['numel'] for r in basis):,} "
                      f"bases in {len(basis)} matrices; {t['params']:,} stored update parameters in all")
    console.print(f"total: {t['nnz']:,} of {t['budget_numel']:,} budget entries ({t['density']:.4%}), "
                  f"{t['extras']} dense extra tensors ({t['extras_numel']:,} values), {_fmt_bytes(t['bytes'])} of tensor data")


def _render_units(console, units: list[dict[str, Any]], every: bool) -> None:
    """The units a budgeted method (swr) chose, with their final gate probability and cost (all with every)."""
    from rich.table import Table

    units = [u for u in units if isinstance(u, dict)]  # a file's meta is free-form: skip what is not a unit
    chosen = [u for u in units if u.get("chosen")]
    cost = sum(u["cost"] for u in chosen if _is_number(u.get("cost")))
    table = Table(title=f"units: {len(chosen)} of {len(units)} chosen, cost {cost:,} parameters")
    for col in ("tensor", "update", "probability", "cost", "chosen"):
        table.add_column(col, justify="left" if col in ("tensor", "update") else "right",
                         overflow="fold" if col == "tensor" else "ellipsis")
    for u in units if every else chosen:
        p, c = u.get("probability", 0), u.get("cost", 0)
        table.add_row(escape(str(u.get("tensor"))), escape(str(u.get("kind"))),
                      f"{p:.3f}" if _is_number(p) else escape(str(p)), f"{c:,}" if _is_number(c) else escape(str(c)),
                      "yes" if u.get("chosen") else "no")
    console.print(table)


def _is_number(v: Any) -> bool:
    return type(v) in (int, float)
