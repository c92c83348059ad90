"""DiffBank on the bundled MiniLM: task switching in place vs loading the finetuned model with from_pretrained.

Run: OMP_NUM_THREADS=1 python bench/bench_bank.py [--switches 400] [--loads 20] [--rounds 10] [--out bench/results/bank.json]
         [--diffs TASK_A.diff TASK_B.diff]
Two (four for memory) random 0.5% diffs are made without training: a dense Gaussian perturbation of every
float base tensor projected to 0.5%, and classifier heads with 2 and 3 labels; packed as .diff files. These are
the worst case for a switch (every entry its own cache line). With --diffs, the switch speed is measured on two
real trained task diffs instead (e.g. the MRPC and STS-B diffs of bench_quality.py); memory still uses random ones.
Speed: median time of `bank.use` alternating A→B→A… vs median `AutoModelForSequenceClassification.from_pretrained`
of the `apply` output folders, same process, same threads, in interleaved rounds. Target: ratio >= 50x.
Memory (in a fresh subprocess): tensor bytes the bank holds per task vs one model's parameter bytes, and RSS
growth when adding N=4 tasks vs loading the same 4 finetuned models.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DENSITY = 0.005
LABELS = (2, 3, 2, 4)


def make_diff(base_dir: Path, num_labels: int, seed: int):
    """A random sparse diff of MiniLM at 0.5% with a fresh head of `num_labels` (no training)."""
    import torch
    from transformers import AutoConfig

    from diffcli.extract import diff_between
    from diffcli.projection import project
    from diffcli.weights import WeightStore

    g = torch.Generator().manual_seed(seed)
    store = WeightStore(base_dir)
    target = {}
    for name in store.names():
        t = store[name]
        target["bert." + name] = t + torch.randn(t.shape, generator=g) * 0.01 if t.is_floating_point() else t
    cfg = AutoConfig.from_pretrained(base_dir, num_labels=num_labels)
    cfg.architectures = ["BertForSequenceClassification"]
    hidden = cfg.hidden_size
    target["classifier.weight"] = torch.randn(num_labels, hidden, generator=g) * 0.02
    target["classifier.bias"] = torch.zeros(num_labels)
    diff = diff_between(store, target, config=cfg.to_dict(), base_ref="minilm", meta={"task": f"random{seed}"})
    return project(diff, DENSITY).diff


def cache_lines(path: Path) -> tuple[int, int]:
    """Entries of a diff and the 64-byte fp32 cache lines they fall on (what a switch writes), per tensor."""
    from diffcli.sources import load_diff

    nnz = lines = 0
    for td in load_diff(path).tensors.values():
        if td.nnz:
            idx = td.sparse().indices
            nnz += idx.numel()
            lines += int(idx.div(16, rounding_mode="floor").unique().numel())
    return nnz, lines


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def settle() -> int:
    """RSS after returning freed heap pages to the OS (glibc), so growth reflects what is still held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return rss_bytes()


def memory_child(work: Path) -> dict:
    """Fresh process: RSS growth of a bank with N tasks vs N loaded finetuned models."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from diffcli.bank import DiffBank

    torch.set_num_threads(1)
    batch = {"input_ids": torch.randint(1000, 2000, (1, 8))}
    r0 = settle()
    bank = DiffBank("minilm")
    r1 = settle()
    growth = []
    for i in range(len(LABELS)):
        bank.add(f"t{i}", work / f"t{i}.diff")
        with bank.use(f"t{i}") as m, torch.no_grad():
            m(**batch)
        growth.append(settle())
    per_task = [bank.task_nbytes(f"t{i}") for i in range(len(LABELS))]
    enc = bank.encoder_nbytes()
    del bank
    r2 = settle()
    models = []
    for i in range(len(LABELS)):
        models.append(AutoModelForSequenceClassification.from_pretrained(work / f"merged_t{i}").eval())
        with torch.no_grad():  # a loaded model is used: its weights become resident
            models[-1](**batch)
    r3 = settle()
    model_params = sum(p.numel() * p.element_size() for p in models[0].parameters())
    return {"rss_start": r0, "rss_bank_base": r1 - r0, "rss_after_each_task": [g - r1 for g in growth],
            "rss_per_task": (growth[-1] - r1) / len(LABELS),
            # the first add also pays one-time costs (lazy imports, allocator arenas, decoder buffers)
            "rss_first_task": growth[0] - r1,
            "rss_per_further_task": (growth[-1] - growth[0]) / (len(LABELS) - 1),
            "bank_tensor_bytes_per_task": per_task,
            "encoder_bytes": enc, "model_param_bytes": model_params,
            "rss_n_models": r3 - r2, "rss_per_model": (r3 - r2) / len(LABELS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switches", type=int, default=400)
    ap.add_argument("--loads", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds of switches and loads")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bank.json")
    ap.add_argument("--diffs", type=Path, nargs=2, metavar="DIFF", help="two trained .diff files of MiniLM")
    ap.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)))
        return

    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from diffcli import artifact
    from diffcli.applying import apply_to_folder
    from diffcli.bank import DiffBank
    from diffcli.weights import resolve_model

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    base_dir = resolve_model("minilm")
    with tempfile.TemporaryDirectory(prefix="bench_bank_") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        sizes = []
        for i, labels in enumerate(LABELS):
            diff = make_diff(base_dir, labels, seed=i)
            sizes.append(artifact.write(diff, work / f"t{i}.diff").bytes)
            apply_to_folder("minilm", work / f"t{i}.diff", work / f"merged_t{i}")
            del diff
        print(f"made {len(LABELS)} diffs at {DENSITY:.1%} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        pair = [work / "t0.diff", work / "t1.diff"]
        merged = [work / "merged_t0", work / "merged_t1"]
        if args.diffs:
            pair = list(args.diffs)
            merged = [work / "merged_A", work / "merged_B"]
            for diff_path, folder in zip(pair, merged):
                apply_to_folder("minilm", diff_path, folder)
        sources = [str(p) if args.diffs else f"random {DENSITY:.1%} diff (seed {i})" for i, p in enumerate(pair)]
        lines = [cache_lines(p) for p in pair]

        bank = DiffBank("minilm")
        bank.add("A", pair[0])
        bank.add("B", pair[1])
        # correctness on the way: the bank's model gives the from_pretrained model's logits
        batch = {"input_ids": torch.randint(1000, 2000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
        max_err = 0.0
        for name, folder in (("A", merged[0]), ("B", merged[1])):
            ref = AutoModelForSequenceClassification.from_pretrained(folder).eval()
            with bank.use(name) as m, torch.no_grad():
                max_err = max(max_err, float((m(**batch).logits - ref(**batch).logits).abs().max()))
            del ref

        # Interleaved rounds, so that both sides see the same machine (load on a shared box drifts).
        switch_s, switch_cpu, load_s, load_cpu = [], [], [], []
        rounds = max(1, min(args.rounds, args.loads))
        for r in range(rounds):
            for i in range(args.switches // rounds):
                name = "A" if len(switch_s) % 2 == 0 else "B"
                t0, c0 = time.perf_counter(), time.process_time()
                with bank.use(name):
                    pass
                switch_s.append(time.perf_counter() - t0)
                switch_cpu.append(time.process_time() - c0)
            for i in range(args.loads // rounds):
                folder = merged[len(load_s) % 2]
                t0, c0 = time.perf_counter(), time.process_time()
                AutoModelForSequenceClassification.from_pretrained(folder)
                load_s.append(time.perf_counter() - t0)
                load_cpu.append(time.process_time() - c0)
        bank.reset()
        del bank
        gc.collect()

        child = subprocess.run([sys.executable, __file__, "--memory-child", str(work)], capture_output=True,
                               text=True, check=True)
        mem = json.loads(child.stdout.strip().splitlines()[-1])

    sw, ld = statistics.median(switch_s), statistics.median(load_s)
    sw_cpu, ld_cpu = statistics.median(switch_cpu), statistics.median(load_cpu)
    per_task = statistics.mean(mem["bank_tensor_bytes_per_task"])
    result = {
        "model": "all-MiniLM-L6-v2 (bundled)", "density": DENSITY, "torch_threads": 1,
        "switch_diffs": sources, "switch_diff_nnz_and_cache_lines": lines,
        "diff_file_bytes": sizes,
        "switch_median_s": sw, "switch_p90_s": sorted(switch_s)[int(0.9 * len(switch_s)) - 1],
        "switches": len(switch_s),
        "from_pretrained_median_s": ld, "loads": len(load_s),
        "speedup": ld / sw, "target_speedup": 50.0, "speedup_ok": ld / sw >= 50.0,
        "switch_cpu_median_s": sw_cpu, "from_pretrained_cpu_median_s": ld_cpu,
        "speedup_cpu_time": ld_cpu / sw_cpu if sw_cpu else None,
        "load_average": Path("/proc/loadavg").read_text().split()[:3],
        "max_abs_logit_diff_vs_from_pretrained": max_err,
        "memory": mem,
        "bank_bytes_per_task_over_model_bytes": per_task / mem["model_param_bytes"],
        "rss_per_task_over_rss_per_model": mem["rss_per_task"] / mem["rss_per_model"] if mem["rss_per_model"] else None,
        "rss_per_further_task_over_rss_per_model":
            mem["rss_per_further_task"] / mem["rss_per_model"] if mem["rss_per_model"] else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    mb = 1 / 2**20
    print("switching between: " + " and ".join(
        f"{s} ({n:,} entries on {c:,} cache lines)" for s, (n, c) in zip(sources, lines)))
    print(f"switch (bank.use, A<->B): median {sw * 1e3:.2f} ms over {len(switch_s)}")
    print(f"from_pretrained(merged):  median {ld * 1e3:.1f} ms over {len(load_s)}")
    print(f"speedup: {ld / sw:.0f}x wall (target >= 50x: {'ok' if ld / sw >= 50 else 'MISSED'}); "
          f"process CPU time {sw_cpu * 1e3:.2f} vs {ld_cpu * 1e3:.1f} ms: "
          f"{(ld_cpu / sw_cpu) if sw_cpu else float('inf'):.0f}x; "
          f"load average {Path('/proc/loadavg').read_text().split()[0]}")
    print(f"logits vs from_pretrained: max abs diff {max_err:.2e}")
    print(f"bank tensor bytes per task: {per_task * mb:.2f} MiB vs one model's parameters "
          f"{mem['model_param_bytes'] * mb:.1f} MiB ({per_task / mem['model_param_bytes']:.2%})")
    print(f"RSS growth: bank base {mem['rss_bank_base'] * mb:.0f} MiB; first task {mem['rss_first_task'] * mb:.1f} MiB "
          f"(one-time costs included), each further task {mem['rss_per_further_task'] * mb:.1f} MiB "
          f"(mean over {len(LABELS)}: {mem['rss_per_task'] * mb:.1f} MiB); per loaded model {mem['rss_per_model'] * mb:.1f} MiB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
