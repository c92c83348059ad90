"""Baselines for the quality benchmarks (full finetuning, PEFT LoRA, BitFit, linear probe) on the data, collate and metrics `train` uses."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

METHODS = ("full", "lora", "lora-all", "bitfit", "head")
DEFAULT_LR = {"full": 5e-5, "lora": 5e-4, "lora-all": 1e-3, "bitfit": 3e-3, "head": 3e-3}
# What users typically write for "LoRA r=8 on query and value, head trained".
LORA_TARGETS = ("query", "value")
HEAD_MODULES = ("classifier",)
# How a run stores what it trained: `save_pretrained` (fp32, the first benchmark) or only the trained tensors as
# fp16 safetensors, scored after that rounding (quality_v2: the same value precision as a packed .diff).
STORES = ("save_pretrained", "fp16-trained")


@dataclass
class BaselineConfig:
    """Every knob of a baseline run; recorded with its result so cached runs can be matched to settings."""

    method: str
    task: str
    model: str = "minilm"
    data_dir: str | None = None
    epochs: int = 1
    seed: int = 42
    batch_size: int = 32
    max_seq_length: int = 128
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    grad_clip: float = 1.0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = field(default_factory=lambda: LORA_TARGETS)
    match_bytes: int | None = None  # lora-all: the largest rank whose fp16 adapter file fits in this many bytes
    store: str = "save_pretrained"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown baseline method {self.method!r}; known: {', '.join(METHODS)}")
        if self.store not in STORES:
            raise ValueError(f"unknown store {self.store!r}; known: {', '.join(STORES)}")
        if self.method == "lora-all" and self.match_bytes is None:
            raise ValueError("lora-all needs match_bytes (the .diff size its adapter is matched to)")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        self.lora_targets = tuple(self.lora_targets)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        if not self.method.startswith("lora"):
            for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"):
                d.pop(k)
        if self.method != "lora-all":
            d.pop("match_bytes")
        return d


def load_model(base_dir: Path, spec):
    """The task model exactly as `train` builds it: the base with a fresh head sized for the task."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_labels": spec.num_labels,
              "problem_type": "regression" if spec.is_regression else "single_label_classification"}
    if spec.labels is not None:
        kwargs["id2label"] = dict(enumerate(spec.labels))
        kwargs["label2id"] = {name: i for i, name in enumerate(spec.labels)}
    return AutoModelForSequenceClassification.from_pretrained(str(base_dir), **kwargs)


def wrap_lora(model, cfg: BaselineConfig, r: int | None = None, head_modules=HEAD_MODULES):
    """PEFT LoRA on `cfg.lora_targets` (module names or suffixes), with the head trained and saved densely."""
    from peft import LoraConfig, TaskType, get_peft_model

    r = cfg.lora_r if r is None else r
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=cfg.lora_alpha if cfg.method == "lora" else 2 * r,
                      lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets),
                      modules_to_save=list(head_modules))
    return get_peft_model(model, lora)


def head_modules(head: list[str]) -> list[str]:
    """The modules that own the new (not-in-the-base) head parameters, e.g. ['classifier']."""
    return sorted({n.rsplit(".", 1)[0] for n in head})


def linear_modules(model, head: list[str]) -> list[str]:
    """Full names of every nn.Linear outside the new head: 'LoRA on every linear layer'."""
    import torch

    owners = head_modules(head)
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and not any(name == o or name.startswith(o + ".") for o in owners)]


def freeze_for(model, method: str, head: list[str]) -> None:
    """BitFit trains biases + the head, the linear probe the head only, full finetuning everything."""
    keep = set(head)
    for name, p in model.named_parameters():
        if method == "bitfit":
            p.requires_grad_(name in keep or name.endswith(".bias"))
        elif method == "head":
            p.requires_grad_(name in keep)


def fp16_state(model) -> dict:
    """The trainable tensors as fp16: what a fp16-trained run stores."""
    import torch

    return {n: p.detach().to("cpu", dtype=torch.float16).contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def lora_shapes(model, cfg: BaselineConfig, head: list[str]) -> dict[str, list[int]]:
    """Name → shape of every tensor a rank-1 adapter (+ head) on `model`'s architecture stores.

    The probe lives on the meta device: no weights, so it adds nothing to the run's measured peak memory.
    """
    import torch

    with torch.device("meta"):
        probe = type(model)(model.config)
    probe = wrap_lora(probe, cfg, r=1, head_modules=head_modules(head))
    return {n: list(p.shape) for n, p in probe.named_parameters() if p.requires_grad}


def lora_file_bytes(shapes: dict[str, list[int]], r: int) -> int:
    """The exact size of the fp16 safetensors file of the rank-r adapter whose rank-1 shapes are `shapes`."""
    import torch
    from safetensors.torch import save

    def at_rank(name: str, shape: list[int]) -> list[int]:
        if ".lora_A." in name:
            return [r] + shape[1:]
        if ".lora_B." in name:
            return shape[:1] + [r] + shape[2:]
        return shape

    return len(save({n: torch.zeros(at_rank(n, s), dtype=torch.float16) for n, s in shapes.items()}))


def match_rank(model, cfg: BaselineConfig, head: list[str], max_rank: int = 512) -> tuple[int, int]:
    """The largest LoRA rank whose fp16 adapter file is at most cfg.match_bytes (at least 1), and that file's size."""
    shapes = lora_shapes(model, cfg, head)
    lo, hi = 1, max_rank
    while lo < hi:  # file size grows with r: bisect for the last r that fits
        mid = (lo + hi + 1) // 2
        if lora_file_bytes(shapes, mid) <= cfg.match_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo, lora_file_bytes(shapes, lo)


def _linear_schedule(optimizer, total_steps: int, warmup_steps: int):
    import torch

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _trainable_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _dir_bytes(folder: Path, name: str) -> int:
    return (folder / name).stat().st_size


def run_baseline(cfg: BaselineConfig, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Train one baseline, keep the best dev epoch, store it, and return its scores, bytes and cost.

    The model is built as `train` builds it (`training.build_task_model`: same head init, same base copy).
    full: every parameter; lora / lora-all: PEFT LoRA on query+value / every linear layer (rank matched to
    `match_bytes`), head trained; bitfit: biases + head; head: the head only (linear probe). AdamW, linear decay,
    gradient norm clipped, dynamic padding via `tasks.collate`, dev metrics via `evaluation.evaluate` every epoch.
    store save_pretrained: `save_pretrained` as users would (fp32); fp16-trained: the trained tensors as fp16
    safetensors, the score re-measured after that rounding.
    """
    import torch

    from diffcli import data_sources, evaluation, metrics, tasks, weights
    from diffcli.dist import autocast
    from diffcli.task_types import build_task_model  # not via diffcli.training: a baseline imports no method's code

    base_dir = weights.resolve_model(cfg.model)
    data = data_sources.load_task(cfg.task, data_dir=cfg.data_dir, max_train_samples=cfg.max_train_samples,
                                  max_eval_samples=cfg.max_eval_samples)
    spec = data.spec
    tm = build_task_model(base_dir, spec, cfg.seed)  # seeds torch, as train does
    model, tokenizer = tm.model, tm.tokenizer
    extra: dict = {}
    if cfg.method == "lora-all":
        cfg.lora_targets = tuple(linear_modules(model, tm.head))
        rank, planned = match_rank(model, cfg, tm.head)
        cfg.lora_r, cfg.lora_alpha = rank, 2 * rank
        extra.update(lora_rank=rank, planned_bytes=planned)
        log(f"[lora-all {cfg.task}] rank {rank}: {planned} B fp16 adapter file for a {cfg.match_bytes} B budget")
    if cfg.method.startswith("lora"):
        model = wrap_lora(model, cfg, head_modules=head_modules(tm.head))
    else:
        freeze_for(model, cfg.method, tm.head)
    device = evaluation.pick_device()
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())

    train_set = tasks.encode(data.train, tokenizer, cfg.max_seq_length, tasks.padding_id(tm.model.config))  # as train
    # The same batches in the same order as `diffprune train` (a seeded DistributedSampler, reshuffled per epoch).
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed,
                                                  drop_last=False)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                         collate_fn=train_set.collate)
    total_steps = cfg.epochs * len(loader)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _linear_schedule(optimizer, total_steps, int(cfg.warmup_ratio * total_steps))
    split = spec.eval_splits[0]

    def dev_score() -> tuple[dict, float]:
        dev = evaluation.evaluate(model, tokenizer, data, max_seq_length=cfg.max_seq_length)
        return dev, 100 * metrics.main_score(spec, dev[split])

    history: list[dict] = []
    best_score, best_state, best_epoch = -math.inf, None, 0
    t_start = time.perf_counter()
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        sampler.set_epoch(epoch - 1)
        model.train()
        running, t_epoch = 0.0, time.perf_counter()
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device):  # the precision `diffprune train` uses here: bf16 autocast on cuda, fp32 on cpu
                loss = model(**batch).loss
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.item()
            step += 1
            if step % 20 == 0 or step == total_steps:
                rate = (time.perf_counter() - t_start) / step
                log(f"[{cfg.method} {cfg.task}] step {step}/{total_steps} loss {running / ((step - 1) % len(loader) + 1):.4f} "
                    f"{rate:.2f}s/step eta {rate * (total_steps - step) / 60:.1f} min")
        train_s = time.perf_counter() - t_epoch
        dev, score = dev_score()
        history.append({"epoch": epoch, "train_loss": running / len(loader), "train_seconds": train_s,
                        "metrics": dev, "score": score})
        log(f"[{cfg.method} {cfg.task}] epoch {epoch}: {split} {dev[split]} (score {score:.2f})")
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = _trainable_state(model) if epoch < cfg.epochs else None
    if best_state is not None:
        model.load_state_dict(best_state)
    elapsed = time.perf_counter() - t_start
    best = history[best_epoch - 1]
    score, dev = best["score"], best["metrics"]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.store == "fp16-trained":
        from safetensors.torch import save_file

        artifact = out_dir / "trained.fp16.safetensors"
        state = fp16_state(model)
        save_file(state, str(artifact))
        with torch.no_grad():  # score what the file holds: the trained tensors rounded to fp16
            for n, p in model.named_parameters():
                if n in state:
                    p.copy_(state[n].to(p.device, p.dtype))
        dev, score = dev_score()
        extra["score_before_fp16"] = best["score"]
    else:
        model.save_pretrained(str(out_dir))
        artifact = out_dir / ("model.safetensors" if cfg.method == "full" else "adapter_model.safetensors")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "method": cfg.method,
        "task": spec.name,
        "settings": cfg.to_dict(),
        "score": score,
        "metrics": dev,
        "best_epoch": best_epoch,
        "history": history,
        "artifact": str(artifact),
        "bytes": artifact.stat().st_size,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "train_examples": len(data.train),
        "steps": total_steps,
        "seconds": elapsed,
        "cuda_peak_allocated": peak,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    """Run one baseline from the command line and print its result as JSON (used for background runs)."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("method", choices=METHODS)
    ap.add_argument("task")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-dir")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--max-train-samples", type=int)
    ap.add_argument("--max-eval-samples", type=int)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--match-bytes", type=int, help="lora-all: the byte budget of the fp16 adapter file")
    ap.add_argument("--store", choices=STORES, default="save_pretrained")
    ap.add_argument("--result", help="also write the result JSON to this file")
    args = ap.parse_args(argv)
    cfg = BaselineConfig(args.method, args.task, model=args.model, data_dir=args.data_dir, epochs=args.epochs,
                         seed=args.seed, batch_size=args.batch_size, max_seq_length=args.max_seq_length, lr=args.lr,
                         max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
                         match_bytes=args.match_bytes, store=args.store)
    result = json.dumps(run_baseline(cfg, Path(args.out), log=lambda line: print(line, file=sys.stderr, flush=True)),
                        indent=2)
    if args.result:
        Path(args.result).write_text(result + "\n")
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
