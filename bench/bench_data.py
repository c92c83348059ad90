"""Data-layer speed on real CoLA with the bundled MiniLM tokenizer: batched encode and length-aware evaluation.

Run: OMP_NUM_THREADS=1 python bench/bench_data.py [--glue-dir /work/shared/glue] [--eval-rows 512]
Baselines measured in the same run: tokenizing one example at a time into tensors (a naive Dataset), and evaluation with every batch padded
to max_seq_length in input order. Targets: CoLA train (8551 rows) encoded in under 2 s; encode speedup > 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue")))
    parser.add_argument("--eval-rows", type=int, default=512)
    parser.add_argument("--max-seq-length", type=int, default=128)
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from diffcli import evaluation
    from diffcli.data_sources import load_task
    from diffcli.tasks import encode
    from diffcli.weights import bundled_minilm_path

    path = bundled_minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    t_load, data = timed(lambda: load_task("cola", data_dir=args.glue_dir))
    t_enc, enc = timed(lambda: encode(data.train, tok, args.max_seq_length))
    t_base, _ = timed(lambda: [tok(e.texts[0], truncation=True, max_length=args.max_seq_length, return_tensors="pt")
                               for e in data.train])

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    rows = data.eval["validation"][: args.eval_rows]
    t_eval, (logits, _) = timed(lambda: evaluation.predict(model, tok, rows, max_seq_length=args.max_seq_length))

    def padded_baseline():
        model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(rows), 64):
                batch = tok([e.texts[0] for e in rows[i:i + 64]], truncation=True, padding="max_length",
                            max_length=args.max_seq_length, return_tensors="pt")
                out.append(model(**batch).logits.numpy())
        return np.concatenate(out)

    t_eval_base, base_logits = timed(padded_baseline)
    report = {
        "cola_train_rows": len(data.train), "load_s": round(t_load, 3),
        "encode_s": round(t_enc, 3), "encode_one_by_one_s": round(t_base, 3),
        "encode_speedup": round(t_base / t_enc, 2), "encode_under_2s": t_enc < 2.0,
        "eval_rows": len(rows), "eval_s": round(t_eval, 3), "eval_padded_max_len_s": round(t_eval_base, 3),
        "eval_speedup": round(t_eval_base / t_eval, 2),
        "max_abs_logit_diff": float(np.abs(logits - base_logits).max()),
        "tokens_per_example_mean": round(float(np.mean(enc.lengths)), 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
