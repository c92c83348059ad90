"""Cost of sparse fixed-mask training (a Fisher mask at 0.5%, δ and AdamW at the k kept entries only) vs full
finetuning with AdamW: peak memory and step time, each mode in a fresh subprocess, measured in the same run.

Models: a BERT-large-sized encoder with random weights built here (24 layers, hidden 1024, 16 heads, FFN
4096, vocab 30522: 335M parameters) and the bundled MiniLM. Batch 8, length 128 by default. Memory is the
peak RSS of the child process on the CPU (it includes choosing the Fisher mask), the peak allocated by torch
on cuda. Targets on the BERT-large model: memory ≤ 0.6x and step time ≤ 1.2x of full finetuning.
Writes bench/results/train_cost_sparse.{json,md} (-cuda suffix on cuda).

    python bench/bench_sparse_cost.py [--models bert-large,minilm] [--steps 3] [--warmup 1] [--threads 2] [--rounds 1]
                                      [--checkpoint-every 2,1]

`--checkpoint-every` adds sparse modes with activation checkpointing of every n-th layer (`train
--activation-checkpointing n`, `diffcli.activations`); full finetuning always runs without it. The targets are
met when one sparse mode meets both.

The Fisher mask is chosen from --fisher-batches batches of --fisher-batch-size examples: smaller batches
keep that phase's activations below the training steps' own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TARGET_TIME, TARGET_MEM = 1.2, 0.6
BASE_MODES = ("full", "sparse")


def modes_of(doc: dict) -> list[str]:
    """full, sparse, then one sparse mode per activation-checkpointing interval of the run."""
    return list(BASE_MODES) + [f"sparse-ckpt{n}" for n in doc.get("checkpoint_every", [])]


def _every(mode: str) -> int:
    return int(mode.removeprefix("sparse-ckpt")) if mode.startswith("sparse-ckpt") else 0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_hwm() -> bool:
    """Reset this process's peak RSS counter (VmHWM; Linux ≥ 4.0) so a phase's own peak can be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def _estimates(doc: dict) -> None:
    """`memory_estimate`'s figure for every model and mode of `doc`, beside the measured peaks (in place)."""
    import torch

    from diffcli import memory_estimate
    from diffcli.projection import budget

    for m in doc["models"]:
        model, shared, _ = _model(m, torch.device("meta") if m == "bert-large" else torch.device("cpu"))
        n = sum(int(p.numel()) for name, p in model.named_parameters() if name in shared)
        for mode in modes_of(doc):
            est = memory_estimate.estimate(model, mode if mode == "full" else "sparse", batch_size=doc["batch_size"],
                                           seq_len=doc["seq_len"], shared=shared, k=budget(doc["sparsity"], n),
                                           mask_batch_size=None if mode == "full" else doc["fisher_batch_size"],
                                           device=doc["device"], checkpoint_every=_every(mode))
            doc["results"][m][mode]["estimate_mb"] = est.total / 2**20


def _write(doc: dict, out: Path) -> None:
    _estimates(doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(_markdown(doc))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _model(name: str, device):
    """(model, shared names, head names): the random BERT-large built here, or the bundled MiniLM as `train` builds it."""
    import torch

    if name == "bert-large":
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                         intermediate_size=4096, max_position_embeddings=512, num_labels=2)
        with torch.device(device if device.type == "meta" else "cpu"):  # meta: sizes only, for the estimate
            model = BertForSequenceClassification(cfg)
        names = [n for n, _ in model.named_parameters()]
        head = [n for n in names if n.startswith("classifier.")]
        return model.to(device), [n for n in names if n not in head], head
    from diffcli.tasks import GLUE_TASKS
    from diffcli.training import build_task_model
    from diffcli.weights import resolve_model

    tm = build_task_model(resolve_model(name), GLUE_TASKS["mrpc"], seed=0)
    return tm.model.to(device), tm.gated, tm.head


def _child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from diffcli import masks
    from diffcli.activations import checkpoint_activations
    from diffcli.sparse_training import SparseDiffTrainer
    from diffcli.dist import autocast

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    model, shared, head = _model(args.model, dev)
    model.train()
    g = torch.Generator().manual_seed(0)

    def batch(size: int = args.batch_size) -> dict:
        ids = torch.randint(1000, 30000, (size, args.seq_len), generator=g)
        return {"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev),
                "token_type_ids": torch.zeros_like(ids).to(dev),
                "labels": torch.randint(0, 2, (size,), generator=g).to(dev)}

    batches = [batch() for _ in range(args.warmup + args.steps)]
    out: dict = {"mode": args.child, "model": args.model, "device": str(dev), "rss_after_load_mb": _rss_mb(),
                 "parameters": sum(p.numel() for p in model.parameters())}
    n = sum(int(p.numel()) for name, p in model.named_parameters() if name in shared)
    if args.child == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)

        def step(b) -> None:
            with autocast(dev):
                loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        out["checkpointed_layers"] = checkpoint_activations(model, _every(args.child))  # as `train` does: mask too
        t0 = time.perf_counter()
        fisher_batches = [batch(args.fisher_batch_size) for _ in range(args.fisher_batches)]
        mask = masks.fisher_mask(model, shared, fisher_batches, args.sparsity, device=dev)
        sync()
        out.update(mask_s=time.perf_counter() - t0, k=masks_k(mask), n=n, rss_after_mask_mb=_rss_mb())
        if cuda:
            out["peak_gpu_mask_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        del fisher_batches
        trainer = SparseDiffTrainer(model, mask, head, lr=1e-3, total_steps=1000)
        del mask
        out["train_phase_peak_reset"] = _reset_hwm() and not cuda

        def step(b) -> None:
            with autocast(dev):
                loss = model(**b).loss
            loss.backward()
            trainer.step()
            trainer.zero_grad()
    times = []
    for i, b in enumerate(batches):
        if i == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        sync()
        t0 = time.perf_counter()
        step(b)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    # the reset above also resets ru_maxrss: the process peak is the larger of the two phases' peaks
    out.update(step_s_median=statistics.median(times), step_s_all=times,
               peak_rss_mb=max(_rss_mb(), out.get("rss_after_mask_mb", 0.0)))
    if out.get("train_phase_peak_reset"):
        out["train_phase_peak_rss_mb"] = _hwm_mb()  # the training steps' own peak, after the mask was chosen
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def masks_k(mask: dict) -> int:
    return sum(int(v.numel()) for v in mask.values())


def _markdown(doc: dict) -> str:
    mem = "peak allocated (GPU)" if doc["device"] == "cuda" else "peak RSS"
    lines = [f"# Sparse fixed-mask training vs full finetuning: cost ({doc['date']})", "",
             f"Command: `{doc['command']}`", "",
             f"Machine: {doc['machine']}; device {doc['device']}; torch threads {doc['threads']}; "
             f"batch {doc['batch_size']}, length {doc['seq_len']}; {doc['warmup']} warm-up + {doc['steps']} timed "
             f"steps per mode and process, {doc['rounds']} alternated round(s) (medians of step time, max of memory); "
             f"sparse = Fisher mask at {doc['sparsity']:.2%} over {doc['fisher_batches']} batches of "
             f"{doc['fisher_batch_size']} examples, "
             "then SparseDiffTrainer (AdamW at the k kept entries); sparse-ckptN adds activation checkpointing of "
             "every N-th layer (`train --activation-checkpointing N`; full finetuning never has it). Each mode runs "
             f"in its own process; memory is its {mem} (a sparse run's includes choosing the mask).", "",
             f"| model | mode | step s (median) | {mem} MB | estimate MB | step ratio | memory ratio | targets |",
             "|---|---|---|---|---|---|---|---|"]
    for m in doc["models"]:
        r = doc["results"][m]
        for mode in modes_of(doc):
            x = r[mode]
            rt = r.get("ratios", {}).get(mode) or ({"step_time_ratio": r["step_time_ratio"], "peak_memory_ratio":
                                                     r["peak_memory_ratio"], "meets_targets": r["meets_targets"]}
                                                    if mode == "sparse" else None)
            ratio = (f"{rt['step_time_ratio']:.3f}", f"{rt['peak_memory_ratio']:.3f}",
                     ("met" if rt["meets_targets"] else "missed") if m == "bert-large" else "(no target)") \
                if rt else ("", "", "")
            lines.append(f"| {m} | {mode} | {x['step_s_median']:.3f} | {x[doc['memory']]:.0f} | "
                         f"{x['estimate_mb']:.0f} | {' | '.join(ratio)} |")
    lines += ["", f"Targets (BERT-large): step time ≤ {TARGET_TIME}x, memory ≤ {TARGET_MEM}x of full finetuning, both in "
              "one sparse mode. On MiniLM activations and the process's fixed cost dominate, so its ratio says less.",
              ""]
    for m in doc["models"]:
        for mode in modes_of(doc)[1:]:
            s = doc["results"][m][mode]
            phase = (f", the training steps' own peak RSS {s['train_phase_peak_rss_mb']:.0f} MB"
                     if s.get("train_phase_peak_rss_mb") else "")
            lines.append(f"- {m} {mode}: k = {s['k']:,} of N = {s['n']:,}; choosing the mask took {s['mask_s']:.1f} s, "
                         f"peak RSS by then {s['rss_after_mask_mb']:.0f} MB{phase}; step times "
                         + ", ".join(f"{t:.1f}" for run in doc['results'][m]['runs'][mode] for t in run['step_s_all'])
                         + " s.")
        f = doc["results"][m]["runs"]["full"]
        lines.append(f"- {m} full: step times " + ", ".join(f"{t:.1f}" for run in f for t in run["step_s_all"]) + " s.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bert-large,minilm")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.005)
    ap.add_argument("--fisher-batches", type=int, default=4)
    ap.add_argument("--fisher-batch-size", type=int, default=2,
                    help="examples per Fisher batch: choosing the mask's activations scale with it")
    ap.add_argument("--rounds", type=int, default=1, help="alternate full/sparse subprocesses this many times")
    ap.add_argument("--checkpoint-every", default="",
                    help="comma-separated n: add a sparse mode with activation checkpointing of every n-th layer")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", help="default: bench/results/train_cost_sparse.json (-cuda on cuda), .md beside it")
    ap.add_argument("--render", metavar="JSON", help="recompute the estimates of a results file and rewrite its .md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    if args.render:
        _write(json.loads(Path(args.render).read_text()), Path(args.render))
        return
    if args.device == "auto":
        from diffcli.evaluation import pick_device

        args.device = pick_device().type
    cuda = args.device == "cuda"
    mem_key = "peak_gpu_mb" if cuda else "peak_rss_mb"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    every = [int(x) for x in args.checkpoint_every.split(",") if x.strip()]
    if any(n < 1 for n in every):
        sys.exit("error: --checkpoint-every takes whole numbers ≥ 1")
    modes = modes_of({"checkpoint_every": every})
    results = {}
    for m in models:
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):  # alternated, so every mode sees the same load on a shared machine
            for mode in modes:
                cmd = [sys.executable, __file__, "--child", mode, "--model", m]
                for flag in ("steps", "warmup", "batch_size", "seq_len", "threads", "sparsity", "fisher_batches",
                             "fisher_batch_size", "device"):
                    cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
                if proc.returncode:
                    sys.exit(f"{m} {mode} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[mode].append(r)
                print(f"{m:>10} {mode:>6}: step {r['step_s_median']:.3f} s, peak {r[mem_key]:.0f} MB", flush=True)
        res = {mode: dict(runs[mode][-1], step_s_median=statistics.median(t for x in runs[mode] for t in x["step_s_all"]),
                          **{mem_key: max(x[mem_key] for x in runs[mode])}) for mode in modes}
        res["runs"] = runs
        res["ratios"] = {}
        for mode in modes[1:]:
            t = res[mode]["step_s_median"] / res["full"]["step_s_median"]
            mem = res[mode][mem_key] / res["full"][mem_key]
            res["ratios"][mode] = {"step_time_ratio": t, "peak_memory_ratio": mem,
                                   "meets_targets": t <= TARGET_TIME and mem <= TARGET_MEM}
            print(f"{m:>10} {mode}/full: step time {t:.3f}x, memory {mem:.3f}x", flush=True)
        res["meets_targets"] = any(r["meets_targets"] for r in res["ratios"].values())
        results[m] = res
    import torch

    doc = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": " ".join([Path(sys.executable).name, "bench/bench_sparse_cost.py"] + sys.argv[1:]),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}",
           "device": args.device, "threads": args.threads, "batch_size": args.batch_size, "seq_len": args.seq_len,
           "steps": args.steps, "warmup": args.warmup, "sparsity": args.sparsity,
           "fisher_batches": args.fisher_batches, "fisher_batch_size": args.fisher_batch_size,
           "rounds": args.rounds, "checkpoint_every": every, "memory": mem_key, "models": models,
           "targets": {"step_time_ratio": TARGET_TIME, "peak_memory_ratio": TARGET_MEM}, "results": results}
    out = Path(args.out) if args.out else RESULTS / ("train_cost_sparse-cuda.json" if cuda else "train_cost_sparse.json")
    _write(doc, out)


if __name__ == "__main__":
    main()
