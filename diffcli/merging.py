"""Compose diffs made on the same base without densifying them: weighted sum (task arithmetic) or TIES.

For one base tensor, input i contributes the weighted entries v_i = w_i · δ_i at its positions.
The union of positions is built by concatenating all inputs' flat indices and taking `torch.unique`
(sorted, with the inverse map); per-position reductions are `scatter_add_` over that inverse.

  sum   out[p] = Σ_i v_i[p]                                    (task arithmetic; exact zeros dropped)
  ties  s[p]   = sign(Σ_i v_i[p])                              (elected sign; a zero sum elects nothing)
        out[p] = mean of the v_i[p] with sign(v_i[p]) = s[p]   (disjoint mean over the agreeing inputs)

With `density`, each input is first trimmed to that fraction of its own largest-|δ| entries (TIES'
"trim" step, reusing the exact top-k of `projection.project`).

A low-rank δ = B·A (docs/FORMAT.md §10) is densified first: its entries are the nonzeros of B·A in
float32, so inputs of different kinds on one tensor combine exactly; the report lists them as `densified`.
Basis scales (§11) need the base: with `base`, each basis record is resolved on it (digest and probe
checked, `svd_basis.resolve_diff`) into the dense float32 δ = U·diag(σ⊙c)·Vᵀ + sparse δ that `apply` adds,
then merged like any δ; the report lists them as `resolved`, with the largest probe error. Without a base
they are refused. A given base is checked against every input (names, shapes, digests), whatever it holds.

Extras (heads and other whole tensors) cannot be summed across tasks meaningfully. Rule `first`
(default): the merged diff takes the first input's extras and config, so it is a model for the first
input's task; the other inputs' extras are reported as dropped. Rule `mean`: every input must have
the same extras with the same shapes and dtypes (InvalidValueError otherwise); floating extras are
averaged (plain mean), other extras must be equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from diffcli.diff import Diff, TensorDiff, nonfinite
from diffcli.errors import BaseMismatchError, InvalidValueError
from diffcli.report import _layer_sort, layer_of

if TYPE_CHECKING:
    import torch

METHODS = ("sum", "ties")
EXTRAS_RULES = ("first", "mean")


@dataclass
class MergeResult:
    """The merged diff and the overlap report (per tensor, per layer, totals) that `merge` prints."""

    diff: Diff
    report: dict[str, Any]


def parse_weights(values: Sequence[str] | None, n: int) -> list[float] | None:
    """'0.5,1' or repeated values → n finite floats; None when no weights were given."""
    if not values:
        return None
    out: list[float] = []
    for raw in values:
        for part in str(raw).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                w = float(part)
            except ValueError:
                raise InvalidValueError(f"weight {part!r} is not a number") from None
            if not math.isfinite(w):
                raise InvalidValueError(f"weight {part!r} is not finite")
            out.append(w)
    if len(out) != n:
        raise InvalidValueError(f"{len(out)} weights for {n} diffs; give one weight per input")
    return out


def _check_options(n: int, weights: Sequence[float] | None, method: str, extras: str,
                   density: float | None) -> list[float]:
    if n < 2:
        raise InvalidValueError(f"merge needs at least two diffs, got {n}")
    if method not in METHODS:
        raise InvalidValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if extras not in EXTRAS_RULES:
        raise InvalidValueError(f"extras rule {extras!r} is not one of {', '.join(EXTRAS_RULES)}")
    if density is not None and not (0 < density <= 1):
        raise InvalidValueError(f"density {density} must lie in (0, 1]")
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise InvalidValueError(f"{len(w)} weights for {n} diffs; give one weight per input")
    if not all(math.isfinite(x) for x in w):
        raise InvalidValueError("weights must be finite numbers")
    return w


def check_same_base(diffs: Sequence[Diff], names: Sequence[str], base: str | Path | None = None) -> None:
    """Every input must name the same base: equal shape and digest for every base tensor two inputs share.

    Fingerprints hash a diff's own tensors' digests (docs/FORMAT.md §6), so two diffs of one base that cover
    different tensors (a classifier with the pooler, a tagger without) have different ones: they merge when they
    share a tensor and every shared tensor agrees, or when `base` is given (every input is then checked against it,
    `resolve_bases`). Two that share no tensor and differ in fingerprint are refused without `base`.
    """
    first = diffs[0]
    seen: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for d, name in zip(diffs, names):
        for td in d.tensors.values():
            key = (tuple(td.shape), td.digest, name)
            prev = seen.setdefault(td.base_name, key)
            if prev[:2] != key[:2]:
                raise BaseMismatchError(f"{name} was made on another base than {prev[2]}: they disagree on base "
                                        f"tensor {td.base_name!r} (shape or content)",
                                        hint="merge only diffs made on the same base model")
    if base is not None:
        return
    firsts = {td.base_name for td in first.tensors.values()}
    for d, name in zip(diffs[1:], names[1:]):
        if d.base_fingerprint != first.base_fingerprint and not firsts & {td.base_name for td in d.tensors.values()}:
            raise BaseMismatchError(f"{name} and {names[0]} share no base tensor and their base fingerprints differ "
                                    f"({d.base_fingerprint[:19]}… vs {first.base_fingerprint[:19]}…)",
                                    hint="pass --base BASE to check both against the base they were made on")


def refuse_bases(diffs: Sequence[Diff], names: Sequence[str]) -> None:
    """Basis-scale records cannot be merged without the base: U, σ, V and the probe come from it (docs/FORMAT.md)."""
    for d, name in zip(diffs, names):
        if d.bases:
            raise InvalidValueError(f"{name} holds basis scales ({len(d.bases)} matrices), which merge combines "
                                    f"only on their base: pass --base BASE",
                                    hint="with the base the diffs were made on, each basis record is rebuilt into "
                                         "a dense δ and merged exactly")


def _checked_base(store, digests: dict[str, str], base, name: str, td: TensorDiff) -> "torch.Tensor":
    """The base tensor `td` builds on, after the name, shape and content-digest checks (BaseMismatchError, exit 5)."""
    from diffcli.weights import tensor_digest

    hint = "pass the base the diffs were made on"
    b = td.base_name
    if b not in store:
        raise BaseMismatchError(f"{name} does not fit base {base}: it has no tensor {b}", hint=hint)
    if tuple(store.shape(b)) != tuple(td.shape):
        raise BaseMismatchError(f"{name} does not fit base {base}: {b} has shape {list(store.shape(b))}, "
                                f"the diff expects {list(td.shape)}", hint=hint)
    t = store[b]
    if b not in digests:
        digests[b] = tensor_digest(t)
    if digests[b] != td.digest:
        raise BaseMismatchError(f"{name} was made on another base than {base}: tensor {b} differs", hint=hint)
    return t


def resolve_bases(diffs: Sequence[Diff], names: Sequence[str],
                  base: str | Path | None) -> tuple[list[Diff], list[str], float | None]:
    """With `base`: every input checked against it (names, shapes, content digests; exit 5 on a miss) and every basis
    record folded into its dense δ on it (probe-checked). Without it, basis records are refused.

    Returns the diffs, the resolved 'input:tensor' names and the largest relative probe error (None when no
    input holds basis records).
    """
    if base is None:
        refuse_bases(diffs, names)
        return list(diffs), [], None
    from diffcli.svd_basis import resolve_diff
    from diffcli.weights import WeightStore, resolve_model

    store = WeightStore(resolve_model(str(base)))
    digests: dict[str, str] = {}  # base tensor → its content digest, computed once
    out: list[Diff] = []
    resolved: list[str] = []
    worst = None
    try:
        for d, name in zip(diffs, names):
            tds = {td.base_name: td for td in d.tensors.values()}
            for td in tds.values():
                if td.nnz or td.base_name in store:  # an empty record of a tensor the base lacks changes nothing
                    _checked_base(store, digests, base, name, td)
            if not d.bases:
                out.append(d)
                continue
            r, err = resolve_diff(d, lambda b: _checked_base(store, digests, base, name, tds[b]))
            out.append(r)
            resolved += [f"{name}:{target}" for target in sorted(d.bases)]
            worst = max(worst or 0.0, err)
    finally:
        store.release()
    return out, resolved, worst


def _densify(diff: Diff, name: str) -> tuple[Diff, list[str]]:
    """Every low-rank record as the sparse record of the nonzeros of B·A (float32), and their 'input:tensor' names."""
    low = [t for t, td in diff.tensors.items() if td.is_lowrank]
    if not low:
        return diff, []
    tensors = dict(diff.tensors)
    for t in low:
        td = tensors[t]
        idx, val = _sparse_nonzero(td)
        tensors[t] = TensorDiff(td.base_name, td.shape, td.dtype, td.digest, val, idx)
    out = Diff(tensors, diff.extras, diff.config, diff.base_ref, diff.base_fingerprint, diff.meta, dict(diff.bases))
    return out, [f"{name}:{t}" for t in low]


def _trim(diff: Diff, density: float) -> Diff:
    """Keep `density` of the diff's own nonzero entries (largest |δ|), via the exact projection."""
    from diffcli.projection import project

    nnz = sum(t.nnz for t in diff.tensors.values() if t.is_float)
    n = diff.budget_numel
    if not nnz or not n:
        return diff
    return project(diff, max(1, round(density * nnz)) / n).diff


def _sparse_nonzero(td: TensorDiff) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(indices, float32 values) of the nonzero entries of one tensor diff."""
    s = td.sparse()
    idx, val = s.indices, s.values.float()
    keep = val != 0
    if not bool(keep.all()):
        idx, val = idx[keep], val[keep]
    return idx, val


def _merge_tensor(parts: list[tuple[int, "torch.Tensor", "torch.Tensor"]], weights: list[float],
                  method: str) -> tuple["torch.Tensor", "torch.Tensor", dict[str, int]]:
    """Merge one base tensor's inputs [(input no, indices, values)] → (indices, values, counts)."""
    import torch

    stats = {"union": 0, "shared": 0, "conflicts": 0, "dropped": 0}
    if not parts:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32), stats
    idx = torch.cat([p[1] for p in parts])
    val = torch.cat([p[2].double() * weights[p[0]] for p in parts])
    uniq, inv = torch.unique(idx, sorted=True, return_inverse=True)
    m = uniq.numel()
    count = torch.bincount(inv, minlength=m)
    pos = torch.zeros(m, dtype=torch.int64).scatter_add_(0, inv, (val > 0).long())
    neg = torch.zeros(m, dtype=torch.int64).scatter_add_(0, inv, (val < 0).long())
    stats["union"] = int(m)
    stats["shared"] = int((count > 1).sum())
    stats["conflicts"] = int(((pos > 0) & (neg > 0)).sum())
    total = torch.zeros(m, dtype=torch.float64).scatter_add_(0, inv, val)
    if method == "sum":
        out = total
    else:
        elected = torch.sign(total)
        agree = (torch.sign(val) == elected[inv]) & (elected[inv] != 0)
        num = torch.zeros(m, dtype=torch.float64).scatter_add_(0, inv, torch.where(agree, val, 0.0))
        cnt = torch.zeros(m, dtype=torch.float64).scatter_add_(0, inv, agree.double())
        out = torch.where(cnt > 0, num / cnt.clamp(min=1), 0.0)
        stats["dropped"] = int((~agree).sum())
    out = out.float()
    keep = out != 0
    return uniq[keep].contiguous(), out[keep].contiguous(), stats


def _merge_extras(diffs: Sequence[Diff], names: Sequence[str], rule: str) -> tuple[dict, list[str]]:
    """The merged diff's extras under `rule`, and the names of extras dropped from later inputs."""
    import torch

    first = diffs[0].extras
    if rule == "first":
        dropped = sorted({f"{names[i]}:{e}" for i, d in enumerate(diffs[1:], 1) for e in d.extras})
        return dict(first), dropped
    for d, name in zip(diffs[1:], names[1:]):
        if set(d.extras) != set(first):
            diff_names = sorted(set(d.extras) ^ set(first))
            raise InvalidValueError(f"cannot average extras: {name} and {names[0]} differ in extra tensors "
                                    f"({', '.join(diff_names[:3])})", hint="use --extras first")
        for e, t in d.extras.items():
            if tuple(t.shape) != tuple(first[e].shape) or t.dtype != first[e].dtype:
                raise InvalidValueError(f"cannot average extra {e!r}: shape {tuple(t.shape)} in {name}, "
                                        f"{tuple(first[e].shape)} in {names[0]} (heads with different labels?)",
                                        hint="use --extras first")
    out = {}
    for e, t in first.items():
        if t.is_floating_point():
            acc = torch.stack([d.extras[e].double() for d in diffs]).mean(0)
            out[e] = acc.to(t.dtype).contiguous()
        else:
            if not all(torch.equal(d.extras[e], t) for d in diffs[1:]):
                raise InvalidValueError(f"cannot average non-float extra {e!r}: the inputs differ")
            out[e] = t
    return out, []


def merge(diffs: Sequence[Diff], weights: Sequence[float] | None = None, *, method: str = "sum",
          extras: str = "first", density: float | None = None, names: Sequence[str] | None = None,
          base: str | Path | None = None) -> MergeResult:
    """Merge diffs made on one base into one sparse diff (see the module docstring for the maths)."""
    names = list(names) if names is not None else [f"input {i + 1}" for i in range(len(diffs))]
    w = _check_options(len(diffs), weights, method, extras, density)
    check_same_base(diffs, names, base)
    diffs, resolved, probe_error = resolve_bases(diffs, names, base)
    densified: list[str] = []  # low-rank inputs, merged exactly as the nonzeros of B·A (and trimmed as those)
    for i, d in enumerate(diffs):
        diffs[i], low = _densify(d, names[i])
        densified += low
    if density is not None:
        diffs = [_trim(d, density) for d in diffs]

    # Group by base tensor: inputs may spell target names with or without the task model's prefix.
    order: list[str] = []
    first_td: dict[str, tuple[str, TensorDiff]] = {}
    parts: dict[str, list] = {}
    nnz_in: dict[str, list[int]] = {}
    for i, d in enumerate(diffs):
        for target, td in d.tensors.items():
            b = td.base_name
            if b not in first_td:
                first_td[b] = (target, td)
                order.append(b)
                parts[b] = []
                nnz_in[b] = [0] * len(diffs)
            idx, val = _sparse_nonzero(td)
            if nonfinite(val):  # a diverged run's checkpoint: the input, not the weights
                raise InvalidValueError(f"{names[i]}: diff {target!r} holds NaN or infinite values")
            nnz_in[b][i] = int(idx.numel())
            if idx.numel():
                parts[b].append((i, idx, val))

    tensors: dict[str, TensorDiff] = {}
    rows: list[dict[str, Any]] = []
    for b in order:
        target, td = first_td[b]
        idx, val, stats = _merge_tensor(parts[b], w, method)
        if nonfinite(val):  # finite inputs (checked above): weights that overflow float32
            raise InvalidValueError(f"the merged δ of {target!r} is not finite: the weights {w} overflow float32",
                                    hint="use smaller --weights")
        tensors[target] = TensorDiff(b, td.shape, td.dtype, td.digest, val, idx)
        rows.append({"tensor": target, "layer": layer_of(target), "numel": td.numel, "nnz_in": nnz_in[b],
                     **stats, "nnz": int(idx.numel())})

    merged_extras, dropped = _merge_extras(diffs, names, extras)
    meta = {k: v for k, v in diffs[0].meta.items() if k not in ("metrics", "projection", "merge")}
    hp = meta.get("hyperparameters")
    if isinstance(hp, dict) and "values" in hp:  # no training saw the merged δ packed (`train --values`): it is
        meta["hyperparameters"] = {k: v for k, v in hp.items() if k != "values"}  # read and packed as stored
    if extras == "mean" and len({str(d.meta.get("task")) for d in diffs}) > 1:
        meta.pop("task", None)
    meta["merge"] = {"method": method, "weights": w, "extras": extras, "density": density, "inputs": names}
    if resolved:
        meta["merge"]["base"] = str(base)  # the base the basis records were resolved on
    first = diffs[0]
    fp = first.base_fingerprint
    if any(d.base_fingerprint != fp for d in diffs[1:]):  # inputs covering different tensors: the union's (§6)
        from diffcli.weights import fingerprint

        fp = fingerprint({td.base_name: td.digest for td in tensors.values()}.values())
    out = Diff(tensors, merged_extras, dict(first.config), first.base_ref, fp, meta)
    report = _report(rows, out, names, w, method, extras, density, dropped)
    report["densified"] = densified
    report["resolved"] = resolved
    if probe_error is not None:
        report["basis_probe_error"] = probe_error
    return MergeResult(out, report)


def merge_files(paths: Sequence[str | Path], out: str | Path, *, weights: Sequence[float] | None = None,
                method: str = "sum", extras: str = "first", density: float | None = None, values: str | None = None,
                force: bool = False, base: str | Path | None = None) -> dict[str, Any]:
    """`diffprune merge`: load diffs (packed files or checkpoints), merge, write OUT; returns the report.

    OUT ending in `.diff` is packed with `artifact.write` (`values` as in `pack`, fp16 by default; fp32 keeps the
    merge exact); any other path becomes a checkpoint folder (float32 values; `values` is refused). `base`
    (folder, alias or hub id) resolves basis records, which are refused without it.
    """
    from diffcli import checkpoint
    from diffcli.outputs import check_output
    from diffcli.sources import load_diff

    out = Path(out)
    _check_options(len(paths), weights, method, extras, density)
    check_output(out, force)
    if out.suffix == ".diff":
        from diffcli.artifact import VALUE_TYPES

        values = "fp16" if values is None else values
        if values not in VALUE_TYPES:
            raise InvalidValueError(f"--values {values!r} is not one of {', '.join(VALUE_TYPES)}")
    elif values is not None:
        raise InvalidValueError(f"--values packs an OUT.diff, and {out} is a checkpoint folder (float32 values)",
                                hint="name the output *.diff to pack it, or leave --values out")
    if base is not None:
        from diffcli.weights import resolve_model

        resolve_model(str(base))  # a missing base fails here (exit 3), before any diff is read
    names = [str(p) for p in paths]
    result = merge([load_diff(p) for p in paths], weights, method=method, extras=extras, density=density,
                   names=names, base=base)
    if out.suffix == ".diff":
        from diffcli import artifact

        artifact.write(result.diff, out, values=values, force=force)
    else:
        checkpoint.save(result.diff, out, force=force)
    return {"output": str(out), **result.report}


def _report(rows: list[dict[str, Any]], merged: Diff, names: list[str], weights: list[float], method: str,
            extras: str, density: float | None, dropped: list[str]) -> dict[str, Any]:
    keys = ("numel", "union", "shared", "conflicts", "dropped", "nnz")
    layers: dict[str, dict[str, Any]] = {}
    for r in rows:
        g = layers.setdefault(r["layer"], {"layer": r["layer"], "tensors": 0, **{k: 0 for k in keys},
                                           "nnz_in": [0] * len(names)})
        g["tensors"] += 1
        for k in keys:
            g[k] += r[k]
        g["nnz_in"] = [a + b for a, b in zip(g["nnz_in"], r["nnz_in"])]
    totals = {k: sum(r[k] for r in rows) for k in keys if k != "numel"}
    totals["budget_numel"] = merged.budget_numel
    totals["density"] = merged.density
    totals["shared_fraction"] = totals["shared"] / totals["union"] if totals["union"] else 0.0
    totals["conflict_fraction"] = totals["conflicts"] / totals["shared"] if totals["shared"] else 0.0
    inputs = [{"name": n, "weight": wt, "nnz": sum(r["nnz_in"][i] for r in rows)}
              for i, (n, wt) in enumerate(zip(names, weights))]
    return {"method": method, "extras": extras, "density": density, "inputs": inputs,
            "extras_kept": sorted(merged.extras), "extras_dropped": dropped, "totals": totals,
            "layers": sorted(layers.values(), key=lambda g: _layer_sort(g["layer"])), "tensors": rows}


def render_merge(console, report: dict[str, Any]) -> None:
    """Human rendering of the overlap report, per layer like `inspect`."""
    from rich.markup import escape
    from rich.table import Table

    t = report["totals"]
    for inp in report["inputs"]:
        console.print(f"input {inp['name']}: {inp['nnz']:,} entries, weight {inp['weight']:g}", markup=False)
    table = Table(title=f"overlap per layer ({report['method']})")
    ties = report["method"] == "ties"
    cols = ["layer", "union", "shared", "sign conflicts"] + (["dropped"] if ties else []) + ["kept"]
    for col in cols:
        table.add_column(col, justify="left" if col == "layer" else "right")
    for g in report["layers"]:
        row = [escape(g["layer"]), f"{g['union']:,}", f"{g['shared']:,}", f"{g['conflicts']:,}"]
        if report["method"] == "ties":
            row.append(f"{g['dropped']:,}")
        row.append(f"{g['nnz']:,}")
        table.add_row(*row)
    console.print(table)
    console.print(f"total: {t['union']:,} positions, {t['shared']:,} shared ({t['shared_fraction']:.1%}), "
                  f"{t['conflicts']:,} with sign conflicts ({t['conflict_fraction']:.1%} of shared); "
                  f"merged diff keeps {t['nnz']:,} of {t['budget_numel']:,} entries ({t['density']:.4%})")
    if report["extras_kept"]:
        console.print(f"extras ({report['extras']}): {', '.join(report['extras_kept'])}", markup=False)
    if report["extras_dropped"]:
        console.print(f"extras dropped: {', '.join(report['extras_dropped'])}", markup=False)
    if report.get("densified"):
        console.print(f"low-rank δ merged exactly as dense B·A (stored sparse): {len(report['densified'])} tensors, "
                      f"first {report['densified'][0]}", markup=False)
    if report.get("resolved"):
        console.print(f"basis scales resolved on the base into dense δ (stored sparse): {len(report['resolved'])} "
                      f"tensors, first {report['resolved'][0]}; largest relative probe error "
                      f"{report['basis_probe_error']:.2g}", markup=False)
