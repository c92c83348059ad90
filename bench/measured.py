"""Run a Python module or script in this process and write its peak memory: one process per benchmark run.

    python bench/measured.py USAGE.json -m diffcli train ...
    python bench/measured.py USAGE.json bench/baselines.py full rte ...

USAGE.json gets the process's peak RSS (bytes) and, when the run used cuda, torch's peak allocated memory.
The run's exit status is passed on.
"""

from __future__ import annotations

import json
import resource
import runpy
import sys
from pathlib import Path


def usage() -> dict:
    """Peak RSS of this process (ru_maxrss is KiB on Linux) and cuda peak allocated when cuda was used."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cuda_peak_allocated": None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated"] = int(torch.cuda.max_memory_allocated())
    return out


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: measured.py USAGE.json (-m MODULE | SCRIPT) ARGS...")
    out, rest = sys.argv[1], sys.argv[2:]
    code = 0
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
            json.dump(usage(), fh)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
