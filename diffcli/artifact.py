"""The packed `.diff` artifact: a deterministic writer and a strict, bounded reader of every format version
(spec: docs/FORMAT.md; version 1 in `format_v1`, version 2 in `format_v2`)."""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffcli import __version__, format_v1, format_v2, quantize
from diffcli.diff import Diff
from diffcli.errors import BaseMismatchError, FormatError, InvalidValueError, NotFoundError, UnsupportedVersionError
from diffcli.format_common import MAGIC, MAX_HEADER, PREAMBLE
from diffcli.outputs import atomic_file, check_file_output

VERSION = format_v2.VERSION  # what the writer produces by default
VERSIONS = {1: format_v1, 2: format_v2}
PRODUCER = f"diffprune {__version__}"
VALUE_TYPES = quantize.QUANTIZERS  # every --values name


@dataclass
class PackReport:
    """What `pack` wrote: sizes by region, ratio against a dense fp32 diff, and the quantization error."""

    path: str
    bytes: int
    version: int
    values: str
    block: int | None
    tensors: int
    extras: int
    nnz: int
    budget_numel: int
    density: float
    max_abs_error: float
    max_rel_error: float | None
    dense_fp32_bytes: int
    ratio: float
    header_bytes: int
    index_bytes: int
    values_bytes: int
    extras_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyReport:
    """What `verify` checked; it raises instead of returning when any check fails."""

    path: str
    bytes: int
    version: int
    producer: str
    values: str
    tensors: int
    extras: int
    nnz: int
    sections: int
    fingerprint: str
    base: str | None = None
    base_tensors_checked: int = 0
    checks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- writing

def _encode(diff: Diff, values: str, version: int = VERSION, block: int | None = None) -> tuple[bytes, dict]:
    if version == 1 and diff.bases:
        raise InvalidValueError("format version 1 has no basis-scale records", hint="write version 2")
    if version == 1:
        if block is not None:
            raise InvalidValueError("format version 1 has no value blocks", hint="drop --block or write version 2")
        return format_v1.encode(diff, values, PRODUCER)
    if version != 2:
        raise InvalidValueError(f"format version {version!r} is not one of 1, 2")
    return format_v2.encode(diff, values, PRODUCER, block)


def _umask_mode(path: Path) -> None:
    """Give a temporary file the mode a plain open() would have (mkstemp makes it owner-only)."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def pack(diff: Diff, values: str = "fp16", version: int = VERSION, block: int | None = None) -> bytes:
    """Serialise a Diff to the packed format; the same Diff always gives the same bytes."""
    return _encode(diff, values, version, block)[0]


def write(diff: Diff, out: str | Path, values: str = "fp16", force: bool = False, version: int = VERSION,
          block: int | None = None) -> PackReport:
    """Pack `diff` into `out` atomically ("-" writes the bytes to stdout); nothing is left on failure."""
    check_destination(out, force)
    data, stats = _encode(diff, values, version, block)
    if str(out) == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        with atomic_file(out, force) as tmp:
            tmp.write_bytes(data)
            _umask_mode(tmp)
    extras_raw = sum(int(t.numel()) * t.element_size() for t in diff.extras.values())
    dense = 4 * int(stats["budget_numel"]) + extras_raw
    budget, nnz = int(stats["budget_numel"]), int(stats["nnz"])
    return PackReport(path=str(out), bytes=len(data), version=version, values=values, block=stats.get("block"),
                      tensors=len(diff.tensors), extras=len(diff.extras), nnz=nnz, budget_numel=budget,
                      density=nnz / budget if budget else 0.0, max_abs_error=float(stats["max_abs_error"]),
                      max_rel_error=stats["max_rel_error"], dense_fp32_bytes=dense, ratio=dense / len(data),
                      header_bytes=int(stats["header_bytes"]), index_bytes=int(stats["index_bytes"]),
                      values_bytes=int(stats["values_bytes"]), extras_bytes=int(stats["extras_bytes"]))


def check_destination(out: str | Path, force: bool) -> None:
    """Fail before any work: an existing file without force, a folder, a missing parent, or binary to a terminal."""
    if str(out) != "-":
        check_file_output(Path(out), force)
    elif sys.stdout.isatty():
        raise InvalidValueError("refusing to write a binary file to the terminal",
                                hint="redirect stdout, or pass -o FILE")


# ----------------------------------------------------------------------------------------------- reading

def _preamble(front: bytes | memoryview, file_size: int, source: str) -> tuple[Any, int]:
    """Magic, version, flags and header length; returns the version's module and the header length."""
    if file_size < PREAMBLE.size or len(front) < PREAMBLE.size:
        raise FormatError(f"{source} is too short to be a packed diff ({file_size} bytes)")
    magic, version, flags, hlen = PREAMBLE.unpack_from(front)
    if magic != MAGIC:
        raise FormatError(f"{source} is not a packed diff (wrong magic bytes)")
    if version not in VERSIONS:
        raise UnsupportedVersionError(f"{source} has format version {version}; this diffprune reads versions "
                                      f"{', '.join(map(str, VERSIONS))}")
    if flags:
        raise FormatError(f"{source} sets reserved flags {flags:#06x}")
    if hlen > MAX_HEADER:
        raise FormatError(f"{source} declares a {hlen}-byte header; the limit is {MAX_HEADER}")
    return VERSIONS[version], hlen


def validate_header(h: Any, payload_size: int) -> list:
    """Check a parsed header (of the version it names) against every rule of the spec."""
    version = h.get("version") if isinstance(h, dict) else None
    fmt = VERSIONS.get(version) if type(version) is int else None
    if fmt is None:
        raise FormatError(f"invalid header: version {version!r} is not one of {', '.join(map(str, VERSIONS))}")
    return fmt.validate_header(h, payload_size)


def _open_path(path: str | Path) -> Path:
    """A path every reader may open: it exists and is a regular file (a pipe or device has no trustworthy size)."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise FormatError(f"{path} is a folder, not a packed diff file",
                          hint="pack a checkpoint folder first: diffprune pack FOLDER -o FILE.diff")
    if not stat.S_ISREG(path.stat().st_mode):
        raise FormatError(f"{path} is not a regular file (a pipe, socket or device)",
                          hint="save the diff to a file first")
    return path


def read_header(path: str | Path) -> dict:
    """The validated header of a packed file, without reading or decoding its payload."""
    path = _open_path(path)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        front = fh.read(PREAMBLE.size)
        fmt, hlen = _preamble(front, size, str(path))
        front += fh.read(fmt.front_length(hlen))
    return fmt.parse_front(memoryview(front), size, str(path), hlen)[0]


def loads_header(data: bytes) -> dict:
    """The validated header of a packed file held in memory (payload checksums not checked)."""
    view = memoryview(data)
    fmt, hlen = _preamble(view, len(view), "<bytes>")
    return fmt.parse_front(view, len(view), "<bytes>", hlen)[0]


def _decode(data: bytes | memoryview, source: str) -> tuple[dict, Diff]:
    view = memoryview(data)
    fmt, hlen = _preamble(view, len(view), source)
    return fmt.decode(view, source, hlen)


def loads(data: bytes) -> Diff:
    """Decode a packed file held in memory, verifying every checksum and bound."""
    return _decode(data, "<bytes>")[1]


def load(path: str | Path) -> Diff:
    """Read and fully verify a packed file into a Diff."""
    path = _open_path(path)
    return _decode(path.read_bytes(), str(path))[1]


def describe(header: dict) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-record rows, the values description and the bytes split of a validated header of any version."""
    return VERSIONS[header["version"]].describe(header)


def verify(path: str | Path, base: str | None = None) -> VerifyReport:
    """Check a packed file end to end and, with `base`, that it was made on that base; writes nothing."""
    from diffcli.weights import WeightStore, fingerprint, resolve_model, tensor_digest

    path = _open_path(path)
    data = path.read_bytes()
    header, diff = _decode(data, str(path))
    version = header["version"]
    if version == 1:
        n_sections, values = format_v1.section_count(header), header["values"]
    else:
        n_sections, values = len(format_v2.STREAMS), header["values"]["quantizer"]
    report = VerifyReport(path=str(path), bytes=len(data), version=version, producer=header["producer"],
                          values=values, tensors=len(diff.tensors), extras=len(diff.extras),
                          nnz=header["nnz"], sections=n_sections, fingerprint=header["base"]["fingerprint"])
    report.checks += ["preamble (magic, version, flags, header length)", "header checksum and schema",
                      f"{n_sections} section checksums and bounds",
                      f"{header['nnz']} positions and values decoded"]
    if base is None:
        return report
    store = WeightStore(resolve_model(base))
    differ: list[tuple[str, str]] = []
    digests: dict[str, str] = {}  # one per base tensor, as the writer's fingerprint counts them
    for name in sorted(diff.tensors):
        t = diff.tensors[name]
        bname = t.base_name
        if bname not in store:
            differ.append((name, f"base has no tensor {bname!r}"))
            continue
        if tuple(store.shape(bname)) != tuple(t.shape) or store.dtype(bname) != t.dtype:
            differ.append((name, f"shape/dtype {list(store.shape(bname))} {store.dtype(bname)} "
                                 f"!= {list(t.shape)} {t.dtype}"))
            continue
        digest = digests[bname] if bname in digests else tensor_digest(store[bname])
        digests[bname] = digest
        if digest != t.digest:
            differ.append((name, "content differs"))
    if differ:
        first, why = differ[0]
        raise BaseMismatchError(f"{len(differ)} of {len(diff.tensors)} base tensors differ from the base "
                                f"the diff was made on; first: {first!r} ({why})",
                                hint="pass the base the diff was made on")
    if fingerprint(digests.values()) != header["base"]["fingerprint"]:
        raise BaseMismatchError("the base's fingerprint differs from the one the diff records",
                                hint="pass the base the diff was made on")
    report.base = base
    report.base_tensors_checked = len(digests)
    report.checks.append(f"base {base}: {len(digests)} tensor digests and the fingerprint match")
    if diff.bases:  # the recomputed bases must reproduce every basis record's probe
        from diffcli.svd_basis import check_probe

        worst = max(check_probe(n, store[diff.tensors[n].base_name], diff.tensors[n], bs)[3]
                    for n, bs in sorted(diff.bases.items()))
        report.checks.append(f"basis probes of {len(diff.bases)} matrices within tolerance (largest relative "
                             f"error {worst:.2g})")
    return report
