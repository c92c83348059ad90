"""Diff checkpoint folders (what `train` and `prune` write, `pack` reads): safetensors + JSON, no pickle.

Layout (docs/CHECKPOINT.md):
  diffprune.json      metadata: format, version, base reference and fingerprint, per-tensor entries,
                      the finetuned model's config, task/metrics/hyperparameters
  diff.safetensors    tensors: "sparse.indices/<name>" int64, "sparse.values/<name>" float32,
                      "dense/<name>" float32 (dense δ), "lowrank.B/<name>" + "lowrank.A/<name>" float32
                      (δ = B·A), "extra/<name>" (full tensor, own dtype), "basis.kept/<name>" int64 and
                      "basis.values/<name>" float32 (basis scales, a − 1)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffcli import __version__
from diffcli.diff import BasisScales, Diff, TensorDiff
from diffcli.errors import FormatError, InvalidValueError, NotFoundError, UnsupportedVersionError
from diffcli.outputs import atomic_dir
from diffcli.weights import DIGEST_ALGORITHM, torch_dtype

META_FILE = "diffprune.json"
TENSOR_FILE = "diff.safetensors"
FORMAT_NAME = "diffprune-checkpoint"
VERSION = 1


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def write_into(folder: Path, diff: Diff) -> None:
    """Write `diff` as checkpoint files into an existing (temporary) folder."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    entries: dict[str, Any] = {}
    for name, td in diff.tensors.items():
        entry = {"base": td.base_name, "shape": list(td.shape), "dtype": td.dtype, "digest": td.digest}
        if td.is_lowrank:
            entry["storage"] = "lowrank"
            tensors[f"lowrank.B/{name}"] = td.factors[0].float().contiguous()
            tensors[f"lowrank.A/{name}"] = td.factors[1].float().contiguous()
        elif td.is_dense:
            entry["storage"] = "dense"
            tensors[f"dense/{name}"] = td.values.float().reshape(td.shape).contiguous()
        else:
            entry["storage"] = "sparse"
            tensors[f"sparse.indices/{name}"] = td.indices.contiguous()
            tensors[f"sparse.values/{name}"] = td.values.float().contiguous()
        if name in diff.bases:  # basis scales on top of δ: the kept bases, a − 1 there, the probe
            bs = diff.bases[name]
            entry["basis"] = {"rank": bs.rank, "probe": list(bs.probe)}
            tensors[f"basis.kept/{name}"] = bs.kept.contiguous()
            tensors[f"basis.values/{name}"] = bs.values.float().contiguous()
        entries[name] = entry
    extras = {}
    for name, t in diff.extras.items():
        extras[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        tensors[f"extra/{name}"] = t.contiguous()
    meta = {
        "format": FORMAT_NAME,
        "version": VERSION,
        "producer": f"diffprune {__version__}",
        "base": {"ref": diff.base_ref, "fingerprint": diff.base_fingerprint, "digest": DIGEST_ALGORITHM},
        "budget_numel": diff.budget_numel,
        "nnz": diff.nnz,
        "tensors": entries,
        "extras": extras,
        "config": diff.config,
        "meta": diff.meta,
    }
    save_file(tensors, str(folder / TENSOR_FILE))
    from diffcli.json_safe import finite  # a diverged run's NaN metrics: null, so the file is JSON and packs

    text = json.dumps(finite(meta), indent=1, sort_keys=True, allow_nan=False)
    (folder / META_FILE).write_text(text + "\n", encoding="utf-8")


def save(diff: Diff, out: str | Path, force: bool = False) -> Path:
    """Write a checkpoint folder atomically: an interrupted save leaves nothing at `out`."""
    if not isinstance(diff, Diff):  # e.g. DiffPruningCallback.diff of a run stopped before its switch
        raise InvalidValueError(f"nothing to save at {out}: expected a Diff, got {type(diff).__name__}",
                                hint="a DiffPruningCallback run stopped before its switch has no diff")
    with atomic_dir(out, force) as tmp:
        write_into(tmp, diff)
    return Path(out)


def load(path: str | Path) -> Diff:
    """Read a checkpoint folder back into a Diff, rejecting anything malformed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist")
    if not path.is_dir() or not (path / META_FILE).is_file():
        raise FormatError(f"{path} is not a diff checkpoint (no {META_FILE})")
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path / META_FILE} is not valid JSON") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise FormatError(f"{path} is not a diff checkpoint")
    if meta.get("version") != VERSION:
        raise UnsupportedVersionError(f"{path} has checkpoint version {meta.get('version')}; "
                                      f"this diffprune reads version {VERSION}")
    algorithm = meta.get("base", {}).get("digest") if isinstance(meta.get("base"), dict) else None
    if algorithm != DIGEST_ALGORITHM:
        raise UnsupportedVersionError(f"{path} records tensor digests as {algorithm!r}; this diffprune uses "
                                      f"{DIGEST_ALGORITHM!r}", hint="re-run prune or train to rewrite it")
    try:
        tensors = load_file(str(path / TENSOR_FILE))
    except FileNotFoundError as exc:
        raise FormatError(f"{path} lacks {TENSOR_FILE}") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{path / TENSOR_FILE} is corrupt: {exc}") from exc
    try:
        diffs: dict[str, TensorDiff] = {}
        bases: dict[str, BasisScales] = {}
        for name, e in meta["tensors"].items():
            shape = tuple(int(d) for d in e["shape"])
            torch_dtype(e["dtype"])  # a dtype torch does not know: corrupt here, not a bad value later
            if e["storage"] == "dense":
                td = TensorDiff(e["base"], shape, e["dtype"], e["digest"], tensors[f"dense/{name}"])
                if tuple(td.values.shape) != shape:
                    raise FormatError(f"dense diff {name!r} has shape {tuple(td.values.shape)}, expected {shape}")
            elif e["storage"] == "lowrank":
                from diffcli import lowrank

                td = lowrank.make(e["base"], shape, e["dtype"], e["digest"], tensors[f"lowrank.B/{name}"],
                                  tensors[f"lowrank.A/{name}"])
                lowrank.check(name, td, FormatError)
            elif e["storage"] == "sparse":
                idx, val = tensors[f"sparse.indices/{name}"], tensors[f"sparse.values/{name}"]
                td = TensorDiff(e["base"], shape, e["dtype"], e["digest"], val, idx)
                _check_sparse(name, td)
            else:
                raise FormatError(f"unknown storage {e['storage']!r} for {name!r}")
            diffs[name] = td
            if "basis" in e:
                bases[name] = _basis(name, e, tensors)
        extras = {name: _extra(name, e, tensors) for name, e in meta["extras"].items()}
        for key in ("config", "meta"):  # what a packed file's header requires of them too (docs/FORMAT.md)
            if not isinstance(meta.get(key, {}), dict):
                raise FormatError(f"{path / META_FILE}: {key} must be an object")
        return Diff(diffs, extras, meta["config"], meta["base"]["ref"], meta["base"]["fingerprint"],
                    meta.get("meta", {}), bases)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # AttributeError: a list or str for a dict
        raise FormatError(f"{path} is inconsistent: missing or bad entry {exc}") from exc


def _check_sparse(name: str, td: TensorDiff) -> None:
    """Indices must be int64, strictly increasing, within the tensor, and match the values."""
    import torch

    idx = td.indices
    if idx.dtype != torch.int64 or idx.dim() != 1 or td.values.shape != idx.shape:
        raise FormatError(f"sparse diff {name!r} has malformed indices/values")
    if idx.numel():
        if int(idx[0]) < 0 or int(idx[-1]) >= td.numel or bool((idx[1:] <= idx[:-1]).any()):
            raise FormatError(f"sparse diff {name!r} has unsorted or out-of-range positions")


def _extra(name: str, entry: dict, tensors: dict) -> Any:
    """A head tensor, as the shape and dtype its entry records (else a model rebuilt with it would not load)."""
    t = tensors[f"extra/{name}"]
    shape, dtype = [int(d) for d in entry["shape"]], str(entry["dtype"])
    if list(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
        raise FormatError(f"extra tensor {name!r} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, "
                          f"its entry says {dtype} {shape}")
    return t


def _basis(name: str, entry: dict, tensors: dict) -> BasisScales:
    """A tensor entry's basis scales, checked as a packed file's are."""
    from diffcli.svd_basis import check_scales

    b = entry["basis"]
    bs = BasisScales(int(b["rank"]), tensors[f"basis.kept/{name}"], tensors[f"basis.values/{name}"],
                     [float(p) for p in b["probe"]])
    check_scales(name, tuple(int(d) for d in entry["shape"]), entry["dtype"], bs)
    return bs
