"""Rebuild a finetuned model from base + diff: streamed into a sharded Hugging Face folder, or in place
on a live torch model with an exact undo.

Folder apply reads one base tensor at a time (memory-mapped through `WeightStore`), computes
out = (base.float() + δ).to(dtype) — in fp32, cast once — through one reused 4 MB chunk buffer and
writes each chunk straight to its place in the output shard (the safetensors headers are planned up
front from the base's header, so no shard accumulates in memory), while worker threads hash the base
tensors. Peak memory: the largest base shard's mapped pages plus the chunk buffer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from diffcli.diff import Diff, TensorDiff, nonfinite
from diffcli.errors import BaseMismatchError, FormatError, InvalidValueError
from diffcli.outputs import atomic_dir, check_output
from diffcli.weights import (WeightStore, dtype_name, fingerprint, is_float, load_config, match_names,
                             resolve_model, tensor_digest)

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_SHARD_SIZE = "2GB"
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
# Tokenizer (and preprocessing) files copied from the base folder when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "spm.model", "bpe.codes", "chat_template.jinja", "chat_template.json")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_ST_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
             "uint16": "U16", "uint32": "U32", "uint64": "U64",
             "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
_CHUNK_BYTES = 4 << 20  # per write: big enough for few syscalls, small enough to stay in cache
_FIT_HINT = "pass the base the diff was made on (--force cannot fix a shape misfit)"


def parse_size(value: int | str) -> int:
    """Bytes from a size like transformers' max_shard_size: 2GB = 2·10⁹, 500MiB = 500·2²⁰, or a plain int."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(value).upper())
        if not m or m.group(2) not in _SIZE_UNITS:
            raise InvalidValueError(f"size {value!r} is not a size like 2GB, 500MB or 1GiB")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if size <= 0:
        raise InvalidValueError(f"size {value!r} must be positive")
    return size


def parse_dtype(value: str | None) -> str | None:
    """None/'auto' keeps each base tensor's dtype; otherwise float tensors are written in this dtype."""
    if value is None or str(value).lower() == "auto":
        return None
    name = str(value).lower().removeprefix("torch.")
    if name not in OUTPUT_DTYPES:
        raise InvalidValueError(f"dtype {value!r} is not one of auto, {', '.join(OUTPUT_DTYPES)}")
    return name


@dataclass
class ApplyReport:
    """What `apply_to_folder` wrote and whether the base matched the diff's record of it."""

    out: Path
    base: Path
    tensors: int
    shards: int
    bytes: int
    fingerprint_ok: bool
    mismatched: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dtype: str | None = None
    basis_probe_error: float | None = None  # largest relative probe error of the basis records (svd_basis)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "base": str(self.base), "tensors": self.tensors, "shards": self.shards,
                "bytes": self.bytes, "fingerprint_ok": self.fingerprint_ok, "mismatched": list(self.mismatched),
                "warnings": list(self.warnings), "dtype": self.dtype or "auto",
                "basis_probe_error": self.basis_probe_error}


@dataclass
class _Planned:
    """One output tensor: where it comes from and where its bytes go."""

    name: str
    base_name: str | None  # None for an extra
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    shard: int = 0
    offset: int = 0  # within the shard's data section


def apply_to_folder(base_ref: str | Path, diff: Diff | str | Path, out: str | Path, *, force: bool = False,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: str | None = None,
                    on_tensor: Callable[[str], None] | None = None) -> ApplyReport:
    """Write base + diff as a Hugging Face folder at `out` (config, safetensors shards, tokenizer files).

    `diff` is a Diff or a path (`.diff` file or checkpoint folder). Shape misfits always fail; a base
    whose content differs from the diff's digests fails unless `force`, which also allows overwriting.
    """
    out = Path(out)
    check_output(out, force)
    cap = parse_size(max_shard_size)
    out_dtype = parse_dtype(dtype)
    base_dir = resolve_model(str(base_ref))
    if not isinstance(diff, Diff):
        from diffcli.sources import load_diff

        diff = load_diff(diff)
    store = WeightStore(base_dir)
    try:
        _check_fit(store, diff, base_dir)
        plan = _plan(store, diff, out_dtype)
        shards = _assign_shards(plan, cap)
        with atomic_dir(out, force) as tmp:
            errors: list[float] = []
            digests = _stream(store, diff, plan, shards, tmp, stop_on_mismatch=not force, on_tensor=on_tensor,
                              errors=errors)
            report = _verdict(diff, digests, force)
            report.basis_probe_error = max(errors) if errors else None
            _write_metadata(tmp, diff, plan, shards, base_dir, out_dtype)
    finally:
        store.release()
    report.out, report.base, report.dtype = out, base_dir, out_dtype
    report.tensors, report.shards = len(plan), len(shards)
    report.bytes = sum(p.nbytes for p in plan)
    return report


def _check_fit(store: WeightStore, diff: Diff, base_dir: Path) -> None:
    """Names, shapes and dtype kinds from the base's headers only; plus the diff's own sanity."""
    for name, td in diff.tensors.items():
        if td.base_name not in store:
            raise BaseMismatchError(f"diff does not fit base: {td.base_name} is not in {base_dir}", hint=_FIT_HINT)
        shape = tuple(store.shape(td.base_name))
        if shape != tuple(td.shape):
            raise BaseMismatchError(f"diff does not fit base: {td.base_name} has shape {list(shape)}, "
                                    f"diff expects {list(td.shape)}", hint=_FIT_HINT)
        bdt = store.dtype(td.base_name)
        if is_float(bdt) != is_float(td.dtype):
            raise BaseMismatchError(f"diff does not fit base: {td.base_name} has dtype {bdt}, "
                                    f"diff expects {td.dtype}", hint=_FIT_HINT)
        if not is_float(bdt) and td.nnz:
            raise FormatError(f"diff changes integer tensor {name!r} additively; it must be an extra")
        if td.is_lowrank:
            from diffcli.lowrank import check

            check(name, td, FormatError)
        if td.is_dense and td.values.numel() != td.numel:
            raise FormatError(f"dense diff {name!r} has {td.values.numel()} values for shape {list(td.shape)}")
        if nonfinite(td.values):
            raise FormatError(f"diff values of {name!r} are not finite (NaN or Inf)")
    for name, t in diff.extras.items():
        if name in diff.tensors:
            raise FormatError(f"{name!r} is both a diff tensor and an extra")
        if nonfinite(t):
            raise FormatError(f"extra tensor {name!r} has non-finite values (NaN or Inf)")


def _plan(store: WeightStore, diff: Diff, out_dtype: str | None) -> list[_Planned]:
    """Output tensors in streaming order: base shard by base shard, then the extras."""
    def nbytes(shape: tuple[int, ...], dt: str) -> int:
        n = 1
        for d in shape:
            n *= int(d)
        return n * _itemsize(dt)

    targets_of: dict[str, list[str]] = {}
    for name, td in diff.tensors.items():
        targets_of.setdefault(td.base_name, []).append(name)
    plan: list[_Planned] = []
    for _file, names in store.files():
        for bname in names:
            for name in targets_of.get(bname, ()):
                bdt = store.dtype(bname)
                dt = out_dtype if out_dtype and is_float(bdt) else bdt
                shape = tuple(diff.tensors[name].shape)
                plan.append(_Planned(name, bname, shape, dt, nbytes(shape, dt)))
    for name, t in diff.extras.items():
        own = dtype_name(t.dtype)
        dt = out_dtype if out_dtype and t.is_floating_point() else own
        plan.append(_Planned(name, None, tuple(t.shape), dt, nbytes(tuple(t.shape), dt)))
    return plan


def _assign_shards(plan: list[_Planned], cap: int) -> list[list[_Planned]]:
    """Greedy shards of at most `cap` bytes (a bigger tensor gets its own); offsets wider dtypes first."""
    shards: list[list[_Planned]] = []
    size = 0
    for p in plan:
        if not shards or (size + p.nbytes > cap and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    for i, shard in enumerate(shards):
        offset = 0
        # Widest element first keeps every tensor aligned to its element size.
        for p in sorted(shard, key=lambda q: -_itemsize(q.dtype)):
            p.shard, p.offset = i, offset
            offset += p.nbytes
    return shards or [[]]  # an empty diff still gives a (header-only) weights file


def _itemsize(dt: str) -> int:
    import torch

    if dt not in _ST_CODES:
        raise FormatError(f"dtype {dt} cannot be stored in safetensors")
    return torch.empty(0, dtype=getattr(torch, dt)).element_size()


def shard_file_name(i: int, n: int) -> str:
    return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _header(shard: list[_Planned]) -> bytes:
    """A safetensors header (8-byte length + JSON padded to 8 bytes) for the planned tensors."""
    head: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for p in sorted(shard, key=lambda q: q.offset):
        head[p.name] = {"dtype": _ST_CODES[p.dtype], "shape": list(p.shape),
                        "data_offsets": [p.offset, p.offset + p.nbytes]}
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(fd: int, t: "torch.Tensor", offset: int) -> None:
    """Write a tensor's raw little-endian bytes at `offset` of an open file, without copying them."""
    import torch

    if t.numel() == 0:
        return
    flat = t.contiguous().reshape(-1)
    _pwrite_all(fd, memoryview(flat.view(torch.uint8).numpy() if flat.dtype != torch.bool
                               else flat.to(torch.uint8).numpy()).cast("B"), offset)


def _pwrite_all(fd: int, buf: memoryview | bytes, offset: int) -> None:
    buf = memoryview(buf)
    while buf:
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def _apply_stream(fd: int, pos: int, base: "torch.Tensor", td: TensorDiff, dt: str, name: str) -> None:
    """Write (base.float() + δ).to(dt) at fd:pos chunk by chunk through one reused buffer.

    The buffer keeps memory flat and cache-warm; `base` (mapped from the file) is only read.
    """
    import torch

    flat = base.reshape(-1)
    n = flat.numel()
    if n == 0:
        return
    target = getattr(torch, dt)
    step = max(1, _CHUNK_BYTES // max(base.element_size(), torch.empty(0, dtype=target).element_size()))
    buf = torch.empty(min(step, n), dtype=target)
    is_float = base.is_floating_point()
    sparse = is_float and td.indices is not None and td.indices.numel() > 0
    if sparse:
        cuts = torch.searchsorted(td.indices, torch.arange(0, n + step, step, dtype=torch.int64)).tolist()
        values = td.values.to(torch.float32)
    dense = td.values.to(torch.float32).reshape(-1) if is_float and td.is_dense else None
    lowrank = td.factors if is_float and td.is_lowrank else None
    for c, a in enumerate(range(0, n, step)):
        b = min(a + step, n)
        chunk = buf[:b - a]
        if lowrank is not None:  # δ = B·A, only the rows this chunk covers
            from diffcli.lowrank import rows

            chunk.copy_(flat[a:b].to(torch.float32) + rows(*lowrank, a, b))
            _finite(chunk, name)
        elif dense is not None:
            if flat.dtype == torch.float32 and target == torch.float32:
                torch.add(flat[a:b], dense[a:b], out=chunk)
            else:
                chunk.copy_(flat[a:b].to(torch.float32) + dense[a:b])
            _finite(chunk, name)
        else:
            chunk.copy_(flat[a:b])
            if is_float and target != flat.dtype:
                _finite(chunk, name)  # a narrowing cast can overflow
            if sparse and cuts[c + 1] > cuts[c]:
                idx = td.indices[cuts[c]:cuts[c + 1]]
                new = (flat.index_select(0, idx).to(torch.float32) + values[cuts[c]:cuts[c + 1]]).to(target)
                _finite(new, name)
                chunk.index_put_((idx - a,), new)
        _write_tensor(fd, chunk, pos + a * chunk.element_size())


def _finite(t: "torch.Tensor", name: str) -> None:
    import torch

    if nonfinite(t):
        if t.dtype == torch.float16 and not bool(torch.isnan(t).any()):  # the cast past ±65504, not the diff
            raise InvalidValueError(f"{name!r} overflows float16: base + diff has values beyond ±65504",
                                    hint="use float32 or bfloat16 weights (the CLI: apply --dtype float32)")
        raise FormatError(f"applying the diff gives non-finite values (NaN or Inf) in {name!r}")


def _hash_workers() -> int:
    """Threads hashing base tensors beside the main thread (hashlib releases the GIL)."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _stream(store: WeightStore, diff: Diff, plan: list[_Planned], shards: list[list[_Planned]], tmp: Path, *,
            stop_on_mismatch: bool, on_tensor: Callable[[str], None] | None,
            errors: list[float] | None = None) -> dict[str, str]:
    """Compute and write every planned tensor; return base name → digest of the base tensor read.

    Base tensors are hashed on worker threads while the main thread adds and writes; a base shard
    is unmapped once its tensors are written and hashed. After a content mismatch with
    `stop_on_mismatch`, writing stops and only hashing continues (to count the mismatches).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    import torch

    errors = [] if errors is None else errors
    file_of = {n: f for f, names in store.files() for n in names}
    remaining: dict[Path, int] = {}
    for p in plan:
        if p.base_name is not None:
            remaining[file_of[p.base_name]] = remaining.get(file_of[p.base_name], 0) + 1
    expected = {td.base_name: td.digest for td in diff.tensors.values()}
    hashing: dict[str, Future] = {}
    digests: dict[str, str] = {}
    state = {"writing": True}

    def settle(names) -> None:
        for bname in names:
            fut = hashing.pop(bname, None)
            if fut is not None:
                digests[bname] = fut.result()
                if stop_on_mismatch and digests[bname] != expected[bname]:
                    state["writing"] = False

    fd: int | None = None
    current = -1
    data_start = 0
    try:
        with ThreadPoolExecutor(max_workers=_hash_workers(), thread_name_prefix="diffprune-hash") as pool:
            for p in plan:
                settle([b for b, f in hashing.items() if f.done()])
                writing = state["writing"]
                if writing and p.shard != current:
                    if fd is not None:
                        os.close(fd)
                    current = p.shard
                    fd = os.open(tmp / shard_file_name(current, len(shards)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                 0o644)
                    head = _header(shards[current])
                    _pwrite_all(fd, head, 0)
                    data_start = len(head)
                if p.base_name is None:
                    if writing:
                        t = diff.extras[p.name]
                        t = t if dtype_name(t.dtype) == p.dtype else t.to(getattr(torch, p.dtype))
                        _finite(t, p.name)
                        _write_tensor(fd, t, data_start + p.offset)
                        if on_tensor:
                            on_tensor(p.name)
                    continue
                base = store[p.base_name]
                if p.base_name not in digests and p.base_name not in hashing:
                    hashing[p.base_name] = pool.submit(tensor_digest, base)
                if writing:
                    td = diff.tensors[p.name]
                    if p.name in diff.bases:  # basis scales: recomputed basis, probe-checked, folded into δ
                        from diffcli.svd_basis import resolve

                        td, err = resolve(p.name, base, td, diff.bases[p.name])
                        errors.append(err)
                    _apply_stream(fd, data_start + p.offset, base, td, p.dtype, p.name)
                    if on_tensor:
                        on_tensor(p.name)
                del base
                f = file_of[p.base_name]
                remaining[f] -= 1
                if remaining[f] == 0:  # unmap the finished base shard: memory follows the largest shard
                    settle([b for b in list(hashing) if file_of[b] == f])
                    store.release(f)
            settle(list(hashing))
        for i, shard in enumerate(shards):
            if not shard:
                (tmp / shard_file_name(i, len(shards))).write_bytes(_header(shard))
    finally:
        if fd is not None:
            os.close(fd)
    return digests


def _verdict(diff: Diff, digests: dict[str, str], force: bool) -> ApplyReport:
    """Compare the base's digests with the diff's record; raise unless forced, else warn."""
    expected: dict[str, str] = {}
    for td in diff.tensors.values():
        expected.setdefault(td.base_name, td.digest)
    mismatched = [b for b, d in expected.items() if b in digests and digests[b] != d]
    unread = [b for b in expected if b not in digests]
    fp_ok = not unread and fingerprint(digests.values()) == diff.base_fingerprint
    warnings: list[str] = []
    message = None
    if mismatched:
        total = len(expected)
        message = (f"diff does not fit base: {len(mismatched)} of {total} tensors differ from the base the diff "
                   f"was made on, first {mismatched[0]}")
    elif not fp_ok:
        message = (f"diff does not fit base: its fingerprint {diff.base_fingerprint} differs from the base's "
                   f"{fingerprint(digests.values())}")
    if message:
        if not force:
            raise BaseMismatchError(message)
        warnings.append(message.replace("diff does not fit base", "applied anyway (--force)", 1))
    return ApplyReport(Path(), Path(), 0, 0, 0, fp_ok, mismatched, warnings)


def _write_metadata(tmp: Path, diff: Diff, plan: list[_Planned], shards: list[list[_Planned]], base_dir: Path,
                    out_dtype: str | None) -> None:
    """config.json (the finetuned model's), the shard index when sharded, and the base's tokenizer files."""
    config = dict(diff.config) if diff.config else load_config(base_dir)
    if out_dtype:
        config["dtype"] = out_dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = out_dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(p.nbytes for p in plan)},
                 "weight_map": {p.name: shard_file_name(p.shard, len(shards))
                                for p in sorted(plan, key=lambda q: q.name)}}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    for fname in TOKENIZER_FILES:
        src = base_dir / fname
        if src.is_file():
            shutil.copyfile(src, tmp / fname)


# ---------------------------------------------------------------------------------------------------------
# In-memory apply / exact revert on a live model


@dataclass
class AppliedHandle:
    """What `apply_` changed in a live model and the original values `revert_` writes back bit for bit.

    `entries` holds, in application order, ("sparse", tensor, flat indices, old values),
    ("copy", tensor, old full tensor) or ("swap", tensor, old .data) records.
    """

    model_id: int
    entries: list[tuple] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # diff target name → model state_dict key
    skipped: list[str] = field(default_factory=list)
    reverted: bool = False


def apply_(model: "torch.nn.Module", diff: Diff, *, check: bool = True, strict: bool = True) -> AppliedHandle:
    """Add δ in place to a live model and load the diff's extras into it; `revert_` undoes it exactly.

    Names are matched across a one-level prefix (`bert.` vs bare encoder). Every check runs before
    anything is touched: a shape misfit raises BaseMismatchError; with `check`, so does a model
    tensor whose content digest differs from the diff's base (e.g. a diff already applied). An extra
    with no model tensor raises unless `strict=False` (then it is listed in `handle.skipped`); an
    extra whose shape differs (another number of labels) replaces the model's tensor wholesale.
    If anything fails midway, what was already applied is reverted before the error propagates.
    """
    import torch

    state = model.state_dict(keep_vars=True)
    mapping = match_names(state.keys(), list(diff.tensors) + list(diff.extras))
    handle = AppliedHandle(id(model), names=dict(mapping))
    ops: list[tuple[str, torch.Tensor, Any, str]] = []
    mismatched: list[str] = []
    for name, td in diff.tensors.items():
        key = mapping.get(name)
        if key is None:
            raise BaseMismatchError(f"diff does not fit model: it has no tensor for {name}", hint=_FIT_HINT)
        p = state[key]
        if tuple(p.shape) != tuple(td.shape):
            raise BaseMismatchError(f"diff does not fit model: {key} has shape {list(p.shape)}, "
                                    f"diff expects {list(td.shape)}", hint=_FIT_HINT)
        if check and tensor_digest(p.detach().cpu()) != td.digest:
            mismatched.append(key)
        elif name in diff.bases:  # basis scales: recomputed basis, probe-checked, folded into a dense δ
            from diffcli.svd_basis import resolve

            td = resolve(name, p.detach(), td, diff.bases[name])[0]
        if not p.is_floating_point():
            if td.nnz:
                raise FormatError(f"diff changes integer tensor {name!r} additively; it must be an extra")
            continue
        if td.is_lowrank:
            from diffcli.lowrank import check

            check(name, td, FormatError)
            ops.append(("tensor", p, td, key))
            continue
        if nonfinite(td.values):
            raise FormatError(f"diff values of {name!r} are not finite (NaN or Inf)")
        if td.values.numel():
            ops.append(("tensor", p, td, key))
    if mismatched:
        raise BaseMismatchError(f"diff does not fit model: {len(mismatched)} of {len(diff.tensors)} tensors differ "
                                f"from the base the diff was made on, first {mismatched[0]}",
                                hint="apply to the unmodified base (revert_ any applied diff first), "
                                     "or pass check=False")
    for name, t in diff.extras.items():
        key = mapping.get(name)
        if key is None:
            if strict:
                raise BaseMismatchError(f"diff does not fit model: it has no tensor for the diff's extra {name}",
                                        hint="use the task model class (e.g. ...ForSequenceClassification)")
            handle.skipped.append(name)
            continue
        if nonfinite(t):
            raise FormatError(f"extra tensor {name!r} has non-finite values (NaN or Inf)")
        ops.append(("extra", state[key], t, key))
    try:
        with torch.no_grad():
            for kind, p, payload, key in ops:
                handle.entries.append(_apply_tensor(p, payload, key) if kind == "tensor" else _load_extra(p, payload))
    except BaseException:
        _undo(handle.entries)
        handle.entries.clear()
        raise
    return handle


def _apply_tensor(p: "torch.Tensor", td: TensorDiff, key: str) -> tuple:
    """Add one δ to a model tensor in place; return the undo record."""
    import torch

    data = p.data
    if td.indices is None or not data.is_contiguous():  # dense or low-rank δ: keep the old values whole
        old = data.clone()
        new = (data.to(torch.float32) + td.dense().to(data.device)).to(data.dtype)
        _finite(new, key)
        data.copy_(new)
        return ("copy", p, old)
    flat = data.view(-1)
    idx = td.indices.to(data.device)
    old = flat.index_select(0, idx)
    new = (old.to(torch.float32) + td.values.to(device=data.device, dtype=torch.float32)).to(data.dtype)
    _finite(new, key)
    flat.index_put_((idx,), new)
    return ("sparse", p, idx, old)


def _load_extra(p: "torch.Tensor", t: "torch.Tensor") -> tuple:
    """Load a full tensor (e.g. a task head): in place if shapes agree, else replace the tensor wholesale."""
    data = p.data
    value = t.to(device=data.device, dtype=data.dtype if t.is_floating_point() and data.is_floating_point()
                 else t.dtype)
    if tuple(value.shape) == tuple(data.shape) and value.dtype == data.dtype:
        old = data.clone()
        data.copy_(value)
        return ("copy", p, old)
    p.data = value.clone()
    return ("swap", p, data)


def _undo(entries: list[tuple]) -> None:
    import torch

    with torch.no_grad():
        for entry in reversed(entries):
            kind, p = entry[0], entry[1]
            if kind == "sparse":
                p.data.view(-1).index_put_((entry[2],), entry[3])
            elif kind == "copy":
                p.data.copy_(entry[2])
            else:
                p.data = entry[2]


def revert_(model: "torch.nn.Module", handle: AppliedHandle) -> None:
    """Restore the values `apply_` replaced, bit for bit (written back, never subtracted)."""
    if handle.model_id != id(model):
        raise InvalidValueError("this handle was made by applying a diff to another model")
    if handle.reverted:
        raise InvalidValueError("this diff was already reverted")
    _undo(handle.entries)
    handle.reverted = True
