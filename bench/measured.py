"""Run a Python module or script in this process and write its peak memory: one process per benchmark run.

    python bench/measured.py USAGE.json -m diffcli train ...
    python bench/measured.py USAGE.json bench/baselines.py full rte ...

USAGE.json gets the process's peak RSS (bytes), torch's peak allocated memory when the run used cuda, the machine it
ran on (train times compare only within one machine), and the repository files the run imported (`imported`, which
keys its cache entry: code_record.py). The exit status is passed on.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import runpy
import sys
from pathlib import Path

import code_record

REPO = Path(__file__).resolve().parents[1]


def usage(entry: str | None = None) -> dict:
    """Peak RSS of this process (ru_maxrss is KiB on Linux), cuda peak allocated when cuda was used, files imported."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cuda_peak_allocated": None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated"] = int(torch.cuda.max_memory_allocated())
    out["machine"] = machine(torch)
    out["versions"] = versions()
    out["imported"] = code_record.imported(REPO, extra=(entry,) if entry else ())
    return out


def versions() -> dict:
    """Python's and the packages' versions that decide what a run computes (None: not installed)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "safetensors", "numpy", "zstandard"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def machine(torch=None) -> dict:
    """The CPU (model name and family/model/stepping from /proc/cpuinfo), cores, threads and GPU of this process."""
    cpu: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "stepping") and key not in cpu:
                    cpu[key] = value.strip()
                elif not line.strip() and cpu:
                    break
    except OSError:
        pass
    name = cpu.get("model name") or platform.processor() or platform.machine()
    ident = "/".join(cpu[k] for k in ("cpu family", "model", "stepping") if k in cpu)
    gpu = None
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {"cpu": f"{name} (family/model/stepping {ident})" if ident else name, "cores": os.cpu_count(),
            "threads": torch.get_num_threads() if torch is not None else None, "gpu": gpu}


def entry_file(rest: list[str]) -> str | None:
    """The file the run starts in: the script, or the module that `-m` runs (its __main__ leaves sys.modules)."""
    if rest[0] != "-m":
        return rest[0]
    import importlib.util

    spec = importlib.util.find_spec(rest[1])
    if spec is not None and spec.submodule_search_locations:
        spec = importlib.util.find_spec(rest[1] + ".__main__")
    return spec.origin if spec is not None else None


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: measured.py USAGE.json (-m MODULE | SCRIPT) ARGS...")
    out, rest = sys.argv[1], sys.argv[2:]
    code = 0
    sys.path.insert(0, str(REPO))  # the run imports this checkout's code, the code its entry records (not an installed copy)
    entry = entry_file(rest)
    try:
        if rest[0] == "-m":
            sys.argv = [rest[1]] + rest[2:]
            runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = rest
            sys.path.insert(0, str(Path(rest[0]).resolve().parent))
            runpy.run_path(rest[0], run_name="__main__")
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        with open(out, "w") as fh:
            json.dump(usage(entry), fh)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
