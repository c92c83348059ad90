"""One epoch's work per task in the two units a run's time is a positive mix of: optimizer steps and padded tokens.

quality_v2.py scales a run measured on one task to another with these. If t = a·steps + b·tokens with a, b ≥ 0 (a
step's optimizer and gate work over all N parameters; the model's work per token), then t'/t lies between the two
ratios steps'/steps and tokens'/tokens, so the smaller gives a lower and the larger an upper estimate.

    python bench/task_work.py --data-dir ../shared/glue --model minilm rte mrpc stsb cola   # prints JSON
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHUFFLES = 4  # training batches are random: the padded token count is averaged over a few seeded shuffles


def padded_tokens(lengths: list[int], batch_size: int, shuffles: int = SHUFFLES) -> float:
    """Mean over seeded shuffles of Σ over batches of (longest example in the batch)·(batch size): what dynamic
    padding of randomly drawn batches computes on."""
    if not lengths:
        return 0.0
    total = 0
    for seed in range(shuffles):
        order = list(lengths)
        random.Random(seed).shuffle(order)
        total += sum(max(order[i:i + batch_size]) * len(order[i:i + batch_size])
                     for i in range(0, len(order), batch_size))
    return total / shuffles


def epoch_work(train_lengths: list[int], eval_lengths: list[int], batch_size: int) -> dict:
    """steps: training batches; tokens: 3x the padded training tokens (forward + a backward of about twice its
    cost) plus the evaluation's tokens (length-sorted batches: about no padding)."""
    return {"train_examples": len(train_lengths),
            "steps": math.ceil(len(train_lengths) / batch_size),
            "tokens": round(3 * padded_tokens(train_lengths, batch_size) + sum(eval_lengths))}


def measure(tasks: list[str], data_dir: str, model: str, max_seq_length: int, batch_size: int,
            max_train_samples: int | None = None, max_eval_samples: int | None = None) -> dict[str, dict]:
    """epoch_work of every task whose data loads (a task that does not is left out)."""
    from transformers import AutoTokenizer

    from diffcli.data_sources import load_task
    from diffcli.tasks import encode
    from diffcli.weights import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model(model)))
    out = {}
    for task in tasks:
        try:
            data = load_task(task, data_dir=data_dir, max_train_samples=max_train_samples,
                             max_eval_samples=max_eval_samples)
        except Exception as exc:  # noqa: BLE001 - a task without data has no estimate; the others still do
            print(f"{task}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        train = encode(data.train or [], tok, max_seq_length).lengths
        evals = [n for split in data.eval.values() for n in encode(split, tok, max_seq_length).lengths]
        out[task] = epoch_work(train, evals, batch_size)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tasks", nargs="+")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-train-samples", type=int)
    ap.add_argument("--max-eval-samples", type=int)
    a = ap.parse_args(argv)
    print(json.dumps(measure(a.tasks, a.data_dir, a.model, a.max_seq_length, a.batch_size,
                             a.max_train_samples, a.max_eval_samples), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
