"""Where and with what a table's runs trained: machine phrases and letters, CPU or GPU, environment, versions."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import measured

REPO = Path(__file__).resolve().parents[1]


def machine_text(m: dict | None) -> str | None:
    """A run's machine in one phrase (None: the entry predates recording it)."""
    if not m:
        return None
    return (f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('threads')} thread(s), "
            + (m["gpu"] if m.get("gpu") else "no GPU"))


def machine_letters(doc: dict) -> dict:
    """A letter per machine the table's runs ran on, in order of each one's first finished run; '?' for none."""
    runs = [c["result"] for by_m in doc["cells"].values() for by_seed in by_m.values()
            for c in by_seed.values() if c["result"] is not None]
    runs += [run for by_m in doc.get("table", {}).values() for cell in by_m.values()
             for run in (cell.get("grid_cost") or {}).values()]  # lr-grid runs that no cell shows yet
    runs.sort(key=lambda r: r.get("finished") or "")
    letters: dict = {}
    for r in runs:
        text = r.get("machine")
        if text not in letters:
            letters[text] = "?" if text is None else "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[sum(k is not None for k in letters)]
    return letters


def times_text(c: dict, letters: dict) -> str:
    """'25.6 min (A)', or '25.6 min (A); 80.6 min (?)' for a cell whose seeds ran on two machines."""
    by = c.get("train_seconds_by_machine") or [[mt, c.get("train_seconds")] for mt in c.get("machines") or [None]]
    text = "; ".join(f"{sec / 60:.1f} min ({letters[mt]})" for mt, sec in by if sec is not None) or "—"
    return text + (f" [{c['resumed_runs']} resumed run(s) left out]" if c.get("resumed_runs") else "")


def machine_legend(letters: dict) -> list[str]:
    """The legend of machine_letters, and why train times compare only within one letter."""
    lines = [f"- {letter}: {text}" for text, letter in letters.items() if text is not None]
    if None in letters:
        lines.append("- ?: not recorded (entries finished before runs recorded their machine, 2026-12-02)")
    return ["Machines (train times compare only between runs on the same machine; memory and bytes do not depend "
            "on it):", ""] + lines + [""]


def device_of(r: dict) -> str:
    """Where a run trained: 'GPU' (under the bf16 autocast `diffprune train` and the baselines use on cuda), 'CPU'
    (fp32), or '?' for an entry that recorded neither its machine nor its device."""
    m = r.get("machine")
    m = machine_text(m) if isinstance(m, dict) else m
    if str(r.get("device") or "").startswith("cuda") or r.get("cuda_peak_allocated") or (m and not m.endswith("no GPU")):
        return "GPU"
    return "CPU" if m or r.get("device") == "cpu" else "?"


def task_devices(doc: dict, task: str) -> str:
    """The kinds of machine a task's finished runs (cells and lr grids) trained on, e.g. 'CPU fp32' or 'GPU bf16'."""
    runs = [c["result"] for by_seed in doc["cells"][task].values() for c in by_seed.values() if c["result"]]
    runs += [r for cell in doc["table"][task].values() for r in (cell.get("grid_cost") or {}).values()]
    kinds = sorted({device_of(r) for r in runs}, key=("CPU", "GPU", "?").index)
    return " + ".join({"CPU": "CPU fp32", "GPU": "GPU bf16", "?": "? (not recorded)"}[k] for k in kinds) or "—"


DEVICE_NOTE = ("`ran on`: where the task's finished runs trained: CPU in fp32, or a lent GPU under the bf16 autocast "
               "that `diffprune train` and the baselines use on cuda (bench/device_lanes.sh). A task's methods are "
               "compared on one kind of machine unless its row names both.")


# Said under both tables' Cost line: what a CPU run's wall time carries beside its own work.
CPU_LOAD = ("On CPU the lanes (one thread each) share the machine's cores with each other and at times with other "
            "work (test runs, code checks), so a CPU run's time carries that load: compare times across methods "
            "roughly, not to the minute.")


def environment() -> dict:
    versions = {k: v for k, v in measured.versions().items() if k != "python"}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - informative only
        pass
    return {"python": platform.python_version(), "packages": versions, "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores" + (f", {gpu}" if gpu else ", no GPU"),
            "platform": platform.platform()}



def versions_text(doc: dict) -> str:
    """The package versions the runs recorded (each distinct set with its run count), and how many recorded none."""
    rows = doc.get("run_versions") or []
    if not rows:
        return "Versions of the runs: none finished yet."
    listed = "; ".join(f"{k} ({n} run{'s' * (n != 1)})" for k, n in rows if k is not None)
    none = sum(n for k, n in rows if k is None)
    return ("Versions the runs recorded: " + (listed or "none") + "."
            + (f" {none} run(s) finished before runs recorded their versions (2026-12-03); they ran in this "
               "repository's `make setup` environment of their day." if none else ""))
