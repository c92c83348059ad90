"""Speed and peak memory of `apply_to_folder` on a BERT-base-sized random model with a 0.5% diff.

Run: OMP_NUM_THREADS=1 python bench/bench_apply.py [--density 0.005] [--reps 3] [--tmp DIR] [--out ...]
Baseline, measured in the same run: copy the base with safetensors load_file + save_file (target: apply
<= 1.5x its time). Each measurement runs in a fresh subprocess that reports its wall time, CPU time
(all threads) and peak RSS (VmHWM); a subprocess that only imports and loads the diff gives the
interpreter's own footprint, "hash" times the content digests (`weights.tensor_digest`) of every base tensor alone, and "inplace"
times one warm apply_ + revert_ (check=False) of the diff on a live BertModel. Files go to
/dev/shm by default so disk writeback by other users of the machine does not swamp the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
INPLACE_REPS = 5  # warm apply_ + revert_ pairs timed per measurement (seconds reported per pair)
SHARD_SIZE = "120MB"  # ~4 shards for the 440 MB base; also the output cap of the sharded run


def build(root: Path, density: float, seed: int = 0) -> None:
    """Random bert-base model saved twice (one file, ~4 shards) and a random sparse diff checkpoint."""
    import torch
    from transformers import BertConfig, BertModel

    from diffcli import checkpoint
    from diffcli.diff import Diff, TensorDiff
    from diffcli.weights import WeightStore, dtype_name, fingerprint_of, tensor_digest

    torch.manual_seed(seed)
    model = BertModel(BertConfig())
    model.save_pretrained(root / "single", max_shard_size="10GB")
    model.save_pretrained(root / "sharded", max_shard_size=SHARD_SIZE)
    del model
    store = WeightStore(root / "single")
    tensors = {}
    for name in store.names():
        t = store[name]
        k = max(1, round(density * t.numel())) if t.is_floating_point() else 0
        idx = torch.randperm(t.numel())[:k].sort().values
        tensors["bert." + name] = TensorDiff(name, tuple(t.shape), dtype_name(t.dtype), tensor_digest(t),
                                             torch.randn(k) * 0.01, idx)
    cfg = BertConfig(num_labels=2, architectures=["BertForSequenceClassification"]).to_dict()
    extras = {"classifier.weight": torch.randn(2, 768) * 0.02, "classifier.bias": torch.zeros(2)}
    fp = fingerprint_of({t.base_name: t.digest for t in tensors.values()})
    checkpoint.save(Diff(tensors, extras, cfg, str(root / "single"), fp), root / "diff")


def worker(mode: str, root: Path, out: Path) -> dict:
    """One measurement in this (fresh) process: returns seconds and peak RSS in bytes."""
    import torch

    torch.set_num_threads(1)
    from safetensors.torch import load_file, save_file

    from diffcli import checkpoint
    from diffcli.applying import apply_to_folder

    diff = checkpoint.load(root / "diff")
    if mode == "inplace":  # apply_ + revert_ on a live model (no digest check), model load not timed
        from transformers import BertModel

        from diffcli.applying import apply_, revert_

        model = BertModel.from_pretrained(root / "single")
        revert_(model, apply_(model, diff, check=False, strict=False))  # warm: first touch of the weights
    c0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if mode == "copy":
        out.mkdir()
        save_file(load_file(str(root / "single" / "model.safetensors")), str(out / "model.safetensors"),
                  metadata={"format": "pt"})
    elif mode == "apply-single":
        apply_to_folder(root / "single", diff, out)
    elif mode == "apply-sharded":
        apply_to_folder(root / "sharded", diff, out, max_shard_size=SHARD_SIZE)
    elif mode == "hash":
        from diffcli.weights import WeightStore, tensor_digest

        for _name, t in WeightStore(root / "single").items():
            tensor_digest(t)
    elif mode == "inplace":
        for _ in range(INPLACE_REPS):
            revert_(model, apply_(model, diff, check=False, strict=False))
    elif mode != "idle":
        raise SystemExit(f"unknown mode {mode}")
    per = INPLACE_REPS if mode == "inplace" else 1
    seconds = (time.perf_counter() - t0) / per
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ((c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)) / per
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss": _vm_hwm()}


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(mode: str, root: Path) -> dict:
    out = root / f"out-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    res = subprocess.run([sys.executable, __file__, "--worker", mode, str(root), str(out)], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--density", type=float, default=0.005)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "apply.json")
    ap.add_argument("--tmp", type=Path, default=Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None,
                    help="where the models and outputs are written (default /dev/shm)")
    ap.add_argument("--worker", nargs=3, metavar=("MODE", "ROOT", "OUT"))
    args = ap.parse_args()
    if args.worker:
        mode, root, out = args.worker
        print(json.dumps(worker(mode, Path(root), Path(out))))
        return
    root = Path(tempfile.mkdtemp(prefix="bench-apply-", dir=args.tmp))
    load_before = os.getloadavg()
    try:
        t0 = time.perf_counter()
        build(root, args.density)
        print(f"built model and diff in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        model_bytes = (root / "single" / "model.safetensors").stat().st_size
        shard_bytes = max(f.stat().st_size for f in (root / "sharded").glob("*.safetensors"))
        n_shards = len(list((root / "sharded").glob("*.safetensors")))
        modes = ("idle", "copy", "apply-single", "apply-sharded", "hash", "inplace")
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        measure("copy", root)  # warm the page cache for both bases before timing anything
        measure("apply-sharded", root)
        for _ in range(args.reps):  # interleaved so drifting machine load hits every mode alike
            for mode in runs:
                runs[mode].append(measure(mode, root))
                print(f"{mode}: {runs[mode][-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    load_after = os.getloadavg()

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    idle = med("idle", "peak_rss")
    sharded_extra = med("apply-sharded", "peak_rss") - idle
    result = {
        "model": "bert-base-uncased shapes, random fp32", "density": args.density, "reps": args.reps,
        "model_bytes": model_bytes, "base_shards": n_shards, "largest_shard_bytes": shard_bytes,
        "cpus": os.cpu_count(), "load_average_before_after": [load_before[0], load_after[0]],
        "files_in": str(args.tmp or tempfile.gettempdir()),
        "seconds": {m: med(m, "seconds") for m in runs if m != "idle"},
        "cpu_seconds": {m: med(m, "cpu_seconds") for m in runs if m != "idle"},
        "peak_rss_bytes": {m: med(m, "peak_rss") for m in runs},
        "ratios": {
            "apply_single_vs_copy_time": med("apply-single", "seconds") / med("copy", "seconds"),
            "apply_sharded_vs_copy_time": med("apply-sharded", "seconds") / med("copy", "seconds"),
            "apply_single_vs_copy_cpu": med("apply-single", "cpu_seconds") / med("copy", "cpu_seconds"),
            "hash_vs_copy_time": med("hash", "seconds") / med("copy", "seconds"),
            "apply_sharded_peak_rss_vs_model": med("apply-sharded", "peak_rss") / model_bytes,
            "apply_sharded_peak_rss_vs_largest_shard": med("apply-sharded", "peak_rss") / shard_bytes,
            "apply_sharded_rss_above_idle_vs_model": sharded_extra / model_bytes,
            "apply_sharded_rss_above_idle_vs_largest_shard": sharded_extra / shard_bytes,
            "copy_rss_above_idle_vs_model": (med("copy", "peak_rss") - idle) / model_bytes,
        },
        "targets": {"apply_vs_copy_time_max": 1.5},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    mb = 1e6
    print(f"model {model_bytes / mb:.0f} MB; sharded base: {n_shards} shards, largest {shard_bytes / mb:.0f} MB")
    print(f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    for m in ("copy", "apply-single", "apply-sharded", "hash", "inplace"):
        print(f"{m:14s} {result['seconds'][m]:6.2f} s wall  {result['cpu_seconds'][m]:6.2f} s CPU   "
              f"peak RSS {result['peak_rss_bytes'][m] / mb:7.0f} MB")
    print(f"{'idle':14s} {'':6s}     peak RSS {idle / mb:7.0f} MB (interpreter + torch + diff)")
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
