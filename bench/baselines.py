"""Full-finetuning and PEFT-LoRA baselines for the quality benchmark, on the very data, collate and metrics `train` uses."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

METHODS = ("full", "lora")
DEFAULT_LR = {"full": 5e-5, "lora": 5e-4}
# What users typically write for "LoRA r=8 on query and value, head trained".
LORA_TARGETS = ("query", "value")
HEAD_MODULES = ("classifier",)


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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown baseline method {self.method!r}; known: {', '.join(METHODS)}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        self.lora_targets = tuple(self.lora_targets)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        if self.method != "lora":
            for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"):
                d.pop(k)
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


def wrap_lora(model, cfg: BaselineConfig):
    """PEFT LoRA on the attention query/value projections, with the classifier head trained and saved densely."""
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets),
                      modules_to_save=list(HEAD_MODULES))
    return get_peft_model(model, lora)


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
    """Train one baseline, keep the best dev epoch, save it as users would, and return its scores and artifact bytes.

    full: every parameter trained (AdamW), saved with `save_pretrained` (model.safetensors, fp32).
    lora: PEFT LoRA, saved with PEFT's `save_pretrained` (adapter_model.safetensors incl. the head).
    Both: linear decay from `lr`, gradient norm clipped, dynamic padding via `tasks.collate`, dev metrics via
    `evaluation.evaluate` after every epoch.
    """
    import torch
    from transformers import AutoTokenizer

    from diffcli import evaluation, metrics, tasks, weights
    from diffcli.training import autocast

    torch.manual_seed(cfg.seed)
    base_dir = weights.resolve_model(cfg.model)
    data = tasks.load_task(cfg.task, data_dir=cfg.data_dir, max_train_samples=cfg.max_train_samples,
                           max_eval_samples=cfg.max_eval_samples)
    spec = data.spec
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = load_model(base_dir, spec)
    if cfg.method == "lora":
        model = wrap_lora(model, cfg)
    device = evaluation.pick_device()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())

    train_set = tasks.encode(data.train, tokenizer, cfg.max_seq_length)
    # The same batches in the same order as `diffprune train` (a seeded DistributedSampler, reshuffled per epoch).
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed,
                                                  drop_last=False)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                         collate_fn=train_set.collate)
    total_steps = cfg.epochs * len(loader)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _linear_schedule(optimizer, total_steps, int(cfg.warmup_ratio * total_steps))

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
        dev = evaluation.evaluate(model, tokenizer, data, max_seq_length=cfg.max_seq_length)
        split = spec.eval_splits[0]
        score = metrics.main_score(spec, dev[split])
        history.append({"epoch": epoch, "train_loss": running / len(loader), "train_seconds": train_s,
                        "metrics": dev, "score": 100 * score})
        log(f"[{cfg.method} {cfg.task}] epoch {epoch}: {split} {dev[split]} (score {100 * score:.2f})")
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = _trainable_state(model) if epoch < cfg.epochs else None
    if best_state is not None:
        model.load_state_dict(best_state)
    elapsed = time.perf_counter() - t_start

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    if cfg.method == "full":
        artifact = out_dir / "model.safetensors"
    else:
        artifact = out_dir / "adapter_model.safetensors"
    best = history[best_epoch - 1]
    return {
        "method": cfg.method,
        "task": spec.name,
        "settings": cfg.to_dict(),
        "score": best["score"],
        "metrics": best["metrics"],
        "best_epoch": best_epoch,
        "history": history,
        "artifact": str(artifact),
        "bytes": artifact.stat().st_size,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "train_examples": len(data.train),
        "steps": total_steps,
        "seconds": elapsed,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
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
    args = ap.parse_args(argv)
    cfg = BaselineConfig(args.method, args.task, data_dir=args.data_dir, epochs=args.epochs, seed=args.seed,
                         lr=args.lr, max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples)
    print(json.dumps(run_baseline(cfg, Path(args.out)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
