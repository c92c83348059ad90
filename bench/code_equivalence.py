"""Check that a code change computes the same benchmark runs, and record it so cached entries stay valid.

A cached entry of the quality tables is retrained when a file its run imported changes (code_record.py). A change
that only refuses bad input, or reads the same file with less memory, would then retrain every entry (days of CPU)
for the same numbers. This checks that claim instead of trusting it: both commits run the quick protocol of both
tables (every method; capped data, one seed, one lr) from their own worktrees on this machine, one thread each, and
every run's entry (scores, per-epoch history, bytes, density, ranks: everything but times, memory, paths and code
hashes) and the bytes of every .diff it wrote must match bit for bit. Only then does `record` add the change to
bench/results/code-equivalence.json: per changed file, old hash → new hash. A change that computes anything
differently fails the check, and its entries go stale as before.

    python bench/code_equivalence.py run COMMIT           # the quick protocol of both tables at COMMIT (resumes)
    python bench/code_equivalence.py compare OLD NEW      # every run of both, field by field; exit 1 on a difference
    python bench/code_equivalence.py record OLD NEW --why TEXT   # compare, then add the check to the record

Limits, said in the record: the quick protocol is one task (RTE by default), capped data and short phases on this
machine's kind (CPU or GPU); it exercises every method's code path from training to the scored .diff, not every input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import code_record  # noqa: E402

WORK = REPO / "bench" / "work" / "equivalence"
TABLES = ("quality", "methods")
# What differs between two runs of the same code: when and where it ran and how long it took, not what it computed.
VOLATILE = {"code", "command", "finished", "machine", "versions", "imported", "resumed", "peak_rss_bytes",
            "cuda_peak_allocated", "train_seconds", "seconds", "diff_path", "artifact", "torch_threads"}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def full_commit(ref: str) -> str:
    return git("rev-parse", "--verify", f"{ref}^{{commit}}")


def tree_of(commit: str) -> Path:
    """A detached worktree of the commit (made once)."""
    tree = WORK / f"tree-{commit[:12]}"
    if not tree.is_dir():
        git("worktree", "add", "--detach", str(tree), commit)
    return tree


def store_of(commit: str, table: str) -> Path:
    return WORK / commit[:12] / table / "quick"


def run(commit: str, tasks: str, data_dir: str) -> None:
    """The quick protocol of both tables at `commit`, one run at a time and one thread (cached: reruns resume)."""
    tree = tree_of(commit)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for table in TABLES:
        cmd = [sys.executable, "bench/quality_v2.py", "--quick", "--no-report", "--table", table, "--tasks", tasks,
               "--data-dir", data_dir, "--work-dir", str(WORK / commit[:12] / table)]
        print(f"[{commit[:12]}] {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, cwd=tree, env=env, check=True)


def _flatten(value, prefix: str = "") -> dict[str, object]:
    """Leaves of a JSON value by dotted path, volatile keys left out."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k not in VOLATILE:
                out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: value}


def runs_of(commit: str) -> dict[str, dict]:
    """Every finished or failed run of the commit's check: {table/name: entry}."""
    out = {}
    for table in TABLES:
        for f in sorted(store_of(commit, table).glob("*.json")):
            out[f"{table}/{f.name}"] = json.loads(f.read_text())
    return out


def diff_digests(commit: str, name: str) -> dict[str, str]:
    """sha256 of every .diff and safetensors file the run wrote (its run folder), by name."""
    table, entry = name.split("/", 1)
    stem = entry[:-len(".failed.json")] if entry.endswith(".failed.json") else entry[:-len(".json")]
    folder = store_of(commit, table) / "runs" / stem
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.suffix in (".diff", ".safetensors")} if folder.is_dir() else {}


_snapshots: dict[Path, code_record.Snapshot] = {}


def own_code(commit: str, entry: dict) -> list[str]:
    """Files the entry recorded whose hash is not the commit's: a run that imported code from elsewhere."""
    tree = tree_of(commit)
    snap = _snapshots.get(tree)
    if snap is None:  # one per tree: each file is hashed once, not once per run
        snap = _snapshots[tree] = code_record.Snapshot(tree, checked=False)  # the tree's own bytes only
    code = entry.get("code") or {}
    bad = [rel for rel, h in code.items() if snap.digest(rel) != h]
    if not any(rel.startswith("diffcli/") for rel in code):
        bad.append("(no diffcli module recorded)")
    return bad


def compare(old: str, new: str) -> tuple[list[str], dict]:
    """Differences between the two commits' runs (empty: identical), and a summary of what was compared."""
    a, b = runs_of(old), runs_of(new)
    problems = [f"only at {old[:12]}: {n}" for n in sorted(set(a) - set(b))]
    problems += [f"only at {new[:12]}: {n}" for n in sorted(set(b) - set(a))]
    fields = diffs = 0
    for name in sorted(set(a) & set(b)):
        if name.endswith(".failed.json"):
            problems.append(f"{name}: the run failed ({a[name].get('error', '')[-200:]})")
            continue
        for commit, entry in ((old, a[name]), (new, b[name])):
            bad = own_code(commit, entry)
            if bad:
                problems.append(f"{name}: the run at {commit[:12]} did not run that commit's code: {bad[:3]}")
        fa, fb = _flatten(a[name]), _flatten(b[name])
        fields += len(fa)
        for key in sorted(set(fa) | set(fb)):
            if fa.get(key, "<absent>") != fb.get(key, "<absent>"):
                problems.append(f"{name}: {key}: {fa.get(key, '<absent>')!r} → {fb.get(key, '<absent>')!r}")
        da, db = diff_digests(old, name), diff_digests(new, name)
        diffs += len(da)
        if da != db:
            problems.append(f"{name}: the .diff files differ ({sorted(da)} vs {sorted(db)})")
    runs = sorted(set(a) & set(b))
    summary = {"runs": len(runs), "fields": fields, "diff_files": diffs,
               "scores": {n: a[n].get("score") for n in runs if not n.endswith(".failed.json")}}
    if not runs:
        problems.append("no runs to compare: run both commits first")
    return problems, summary


def changed_files(old: str, new: str) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Code files (code_record's kind) changed between the commits: {file: [old hash, new hash]}, added, removed."""
    names = git("diff", "--name-status", "--no-renames", old, new, "--", "diffcli", "bench").splitlines()
    files, added, removed = {}, [], []
    for line in names:
        status, rel = line.split("\t", 1)
        if not rel.endswith(".py") or not code_record._is_code(rel):
            continue
        if status == "A":
            added.append(rel)
        elif status == "D":
            removed.append(rel)
        else:
            files[rel] = [_blob_hash(old, rel), _blob_hash(new, rel)]
    return files, added, removed


def _blob_hash(commit: str, rel: str) -> str:
    data = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{rel}"], check=True, capture_output=True).stdout
    return code_record.content_hash(data)


def record(old: str, new: str, why: str, tasks: str) -> dict:
    """Compare, and when every run matched add the check to bench/results/code-equivalence.json."""
    problems, summary = compare(old, new)
    if problems:
        raise SystemExit("not recorded: the runs differ\n" + "\n".join(problems))
    files, added, removed = changed_files(old, new)
    path = REPO / code_record.EQUIVALENCE
    doc = json.loads(path.read_text()) if path.is_file() else {
        "what": "Code changes checked to compute the same benchmark runs (bench/code_equivalence.py); an entry "
                "whose recorded file hash leads through `files` to the file's hash now counts as current.",
        "checks": []}
    import measured

    check = {"from": old, "to": new, "why": why, "result": "identical", "files": files, "added": added,
             "removed": removed, "protocol": f"quality_v2.py --quick --table {{{','.join(TABLES)}}} --tasks {tasks}",
             "command": f"python bench/code_equivalence.py record {old[:12]} {new[:12]}",
             "compared": summary, "machine": measured.machine(None), "volatile": sorted(VOLATILE)}
    doc["checks"] = [c for c in doc["checks"] if (c.get("from"), c.get("to")) != (old, new)] + [check]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return check


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("run", "compare", "record"))
    ap.add_argument("commits", nargs="+")
    ap.add_argument("--tasks", default="rte")
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR") or str(REPO.parent / "shared" / "glue"))
    ap.add_argument("--why", help="record: what the change does, in one line")
    args = ap.parse_args(argv)
    commits = [full_commit(c) for c in args.commits]
    if args.action == "run":
        for c in commits:
            run(c, args.tasks, str(Path(args.data_dir).resolve()))
        return 0
    if len(commits) != 2:
        ap.error(f"{args.action} takes two commits: OLD NEW")
    if args.action == "compare":
        problems, summary = compare(*commits)
        print(json.dumps(summary, indent=1))
        print("\n".join(problems) if problems else "identical")
        return 1 if problems else 0
    if not args.why:
        ap.error("record needs --why")
    check = record(*commits, args.why, args.tasks)
    print(f"recorded: {len(check['files'])} changed file(s), {check['compared']['runs']} runs identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
