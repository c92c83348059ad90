"""Cost of `train`'s L0 step vs plain full finetuning on the bundled MiniLM: step time and peak memory.

Same model, batch (default 32) and padded sequence length (default 128); each mode runs in a fresh
subprocess (so its peak RSS is its own): 2 warm-up steps, then N timed steps. Targets: step time ≤ 1.15x,
peak memory ≤ 1.6x of full finetuning (RSS on the CPU; on cuda the GPU's peak allocated memory, both modes
under the bf16 autocast `train` uses). Writes bench/results/train_cost.json (train_cost-cuda.json on cuda).

    python bench/bench_train_cost.py [--steps 10] [--batch-size 32] [--seq-len 128] [--threads 2] [--device auto]

--density runs the L0 phase instead on MRPC (GLUE_DIR or /work/shared/glue) with and without the density
controller and reports the expected and deterministic gate density it ends at, and how much of |δ| the
projection to --sparsity then keeps; writes bench/results/train_density.json.

    python bench/bench_train_cost.py --density [--density-steps 240] [--batch-size 8] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TARGET_TIME, TARGET_MEM = 1.15, 1.6


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(mode: str, steps: int, warmup: int, batch_size: int, seq_len: int, threads: int,
           device: str = "cpu", model_ref: str = "minilm") -> dict:
    import torch

    torch.set_num_threads(threads)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from diffcli.tasks import GLUE_TASKS
    from diffcli.training import L0Trainer, TrainOptions, autocast, build_task_model
    from diffcli.weights import resolve_model

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    tm = build_task_model(resolve_model(model_ref), GLUE_TASKS["mrpc"], seed=0)
    model = tm.model.to(dev).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "token_type_ids": torch.zeros_like(ids), "labels": torch.randint(0, 2, (batch_size,), generator=g)}
    batch = {k: v.to(dev) for k, v in batch.items()}
    rss_loaded = _rss_mb()
    parts: dict[str, list[float]] = {}
    if mode == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)

        def step() -> None:
            with autocast(dev):  # the precision `train` uses on this device (bf16 autocast on cuda)
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        trainer = L0Trainer(model, tm.gated, tm.head, TrainOptions(), dev, total_steps=1000)

        def timed(name, fn):
            def wrapper(*a, **k):
                sync()
                t0 = time.perf_counter()
                out = fn(*a, **k)
                sync()
                parts.setdefault(name, []).append(time.perf_counter() - t0)
                return out
            return wrapper

        trainer.gd.sample_ = timed("gate_forward", trainer.gd.sample_)
        trainer.gd.backward_ = timed("gate_backward", trainer.gd.backward_)
        trainer.opt_w.step = timed("adamw_w", trainer.opt_w.step)
        trainer.opt_a.step = timed("adamw_alpha", trainer.opt_a.step)

        def step() -> None:
            trainer.step(batch)
    times = []
    for i in range(warmup + steps):
        if i == warmup and cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"mode": mode, "device": str(dev), "step_s_median": statistics.median(times),
           "step_s_mean": statistics.mean(times), "step_s_all": times, "peak_rss_mb": _rss_mb(),
           "rss_after_load_mb": rss_loaded}
    if cuda:  # on a GPU the memory that matters is the device's: peak allocated by torch over the timed steps
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if parts:
        out["parts_s_median"] = {k: statistics.median(v[warmup:]) for k, v in parts.items()}
    return out


def _density_child(controller: bool, steps: int, batch_size: int, seq_len: int, threads: int,
                   sparsity: float) -> dict:
    import torch

    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from diffcli import data_sources, tasks
    from diffcli.training import Dist, L0Trainer, TrainOptions, build_task_model
    from diffcli.trainloop import loader as _loader
    from diffcli.weights import resolve_model

    data_dir = os.environ.get("GLUE_DIR") or str(REPO.parent / "shared" / "glue")
    data = data_sources.load_task("mrpc", data_dir=data_dir, max_eval_samples=1)
    tm = build_task_model(resolve_model("minilm"), data.spec, seed=0)
    train_set = tasks.encode(data.train, tm.tokenizer, seq_len)
    opts = TrainOptions(sparsity=sparsity, controller=controller, batch_size=batch_size, max_seq_length=seq_len)
    trainer = L0Trainer(tm.model, tm.gated, tm.head, opts, torch.device("cpu"), total_steps=steps)
    tm.model.train()
    trace, step, epoch, t0 = [], 0, 0, time.perf_counter()
    while step < steps:
        for batch in _loader(train_set, batch_size, opts.seed, epoch, Dist()):
            stats = trainer.step(batch)
            step += 1
            if step % max(1, steps // 12) == 0 or step == steps:
                trace.append({"step": step, "expected_density": stats["expected_density"], "lambda": stats["lambda"],
                              "scheduled": trainer.controller.scheduled(step), "loss": stats["loss"]})
            if step >= steps:
                break
        epoch += 1
    delta = trainer.gd.delta().abs()
    k = max(1, round(sparsity * delta.numel()))
    kept_mass = float(torch.topk(delta, k, sorted=False).values.sum() / delta.sum().clamp_min(1e-30))
    return {"controller": controller, "steps": steps, "expected_density": trace[-1]["expected_density"],
            "deterministic_density": trainer.gd.deterministic_density(), "lambda": trainer.lam,
            "projection_keeps_abs_delta_fraction": kept_mass, "seconds": time.perf_counter() - t0, "trace": trace}


def density_main(args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    arms = []
    for controller in (True, False):
        cmd = [sys.executable, __file__, "--density-child", "on" if controller else "off", "--density-steps",
               str(args.density_steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--threads", str(args.threads), "--sparsity", str(args.sparsity)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        arms.append(res)
        print(f"controller {'on ' if controller else 'off'}: after {res['steps']} L0 steps expected density "
              f"{res['expected_density']:.3%}, deterministic {res['deterministic_density']:.3%} "
              f"(target {args.sparsity:.3%}); top-k projection keeps {res['projection_keeps_abs_delta_fraction']:.1%} "
              f"of |δ| ({res['seconds']:.0f} s)", flush=True)
    doc = {"task": "mrpc", "model": "all-MiniLM-L6-v2 (bundled)", "sparsity": args.sparsity,
           "steps": args.density_steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "arms": arms,
           "command": " ".join([Path(sys.executable).name, "bench/bench_train_cost.py"] + sys.argv[1:])}
    out = (Path(args.out).parent if args.out else RESULTS) / "train_density.json"  # beside the cost file
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="alternate full/L0 subprocesses this many times")
    ap.add_argument("--model", default="minilm", help="base model folder or alias (default: the bundled MiniLM)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="where both modes run (auto: cuda when present, as train picks)")
    ap.add_argument("--child", choices=["full", "l0"], help=argparse.SUPPRESS)
    ap.add_argument("--density", action="store_true", help="density-controller demo instead of the cost run")
    ap.add_argument("--density-steps", type=int, default=240)
    ap.add_argument("--sparsity", type=float, default=0.005)
    ap.add_argument("--density-child", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help="default: bench/results/train_cost.json (train_cost-cuda.json on cuda; "
                                  "train_density.json beside it with --density)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.steps, args.warmup, args.batch_size, args.seq_len, args.threads,
                                args.device, args.model)))
        return
    if args.density_child:
        print(json.dumps(_density_child(args.density_child == "on", args.density_steps, args.batch_size,
                                        args.seq_len, args.threads, args.sparsity)))
        return
    if args.density:
        density_main(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if args.device == "auto":
        from diffcli.evaluation import pick_device

        args.device = pick_device().type
    cuda = args.device == "cuda"
    mem_key, mem_name = ("peak_gpu_mb", "GPU memory") if cuda else ("peak_rss_mb", "RSS")
    out = Path(args.out) if args.out else RESULTS / ("train_cost-cuda.json" if cuda else "train_cost.json")
    runs: dict[str, list[dict]] = {"full": [], "l0": []}
    for _ in range(args.rounds):
        for mode in ("full", "l0"):
            cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads),
                   "--device", args.device, "--model", args.model]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=True)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[mode].append(res)
            print(f"{mode:>4}: step {res['step_s_median'] * 1000:.1f} ms (median of {args.steps}), "
                  f"peak {mem_name} {res[mem_key]:.0f} MB", flush=True)
    full_t = statistics.median(r["step_s_median"] for r in runs["full"])
    l0_t = statistics.median(r["step_s_median"] for r in runs["l0"])
    full_m = max(r[mem_key] for r in runs["full"])
    l0_m = max(r[mem_key] for r in runs["l0"])
    doc = {
        "model": "all-MiniLM-L6-v2 (bundled)" if args.model == "minilm" else args.model,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
        "threads": args.threads, "rounds": args.rounds, "device": args.device, "memory": mem_key,
        "full_step_s": full_t, "l0_step_s": l0_t, "step_time_ratio": l0_t / full_t,
        "full_peak_mb": full_m, "l0_peak_mb": l0_m, "peak_memory_ratio": l0_m / full_m,
        "targets": {"step_time_ratio": TARGET_TIME, "peak_memory_ratio": TARGET_MEM},
        "l0_parts_s_median": runs["l0"][-1].get("parts_s_median"), "runs": runs,
        "command": " ".join([Path(sys.executable).name, "bench/bench_train_cost.py"] + sys.argv[1:]),
    }
    doc["meets_targets"] = doc["step_time_ratio"] <= TARGET_TIME and doc["peak_memory_ratio"] <= TARGET_MEM
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"step time ratio L0/full: {doc['step_time_ratio']:.3f} (target ≤ {TARGET_TIME})")
    print(f"peak {mem_name} ratio L0/full: {doc['peak_memory_ratio']:.3f} (target ≤ {TARGET_MEM})")
    if doc["l0_parts_s_median"]:
        print("L0 extra work per step (median): " + ", ".join(f"{k} {v * 1000:.0f} ms"
                                                           for k, v in doc["l0_parts_s_median"].items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
