"""Size and speed of the packed format on a BERT-base-sized diff at 0.5% density, against simple baselines.

Run: OMP_NUM_THREADS=2 python bench/bench_size.py [--density 0.005] [--out bench/results/size.json]
Bound B = log2 C(N,k)/8 + 2k + dense extras bytes: the information limit of the positions plus raw fp16
values. Target: artifact bytes <= 0.92 * B. Throughput is compared with a safetensors COO file
(int64 positions + fp32 values) saved and loaded in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log2_binom(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def build_diff(density: float, seed: int = 0):
    """bert-base-uncased shapes, random base, dense Gaussian δ projected to `density`, random 768x2 head."""
    import torch
    from transformers import BertConfig, BertModel

    from diffcli.diff import Diff, TensorDiff
    from diffcli.projection import project
    from diffcli.weights import dtype_name, fingerprint_of, tensor_digest

    torch.manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: (tuple(t.shape), dtype_name(t.dtype)) for n, t in BertModel(BertConfig()).state_dict().items()}
    tensors = {}
    for name, (shape, dtype) in shapes.items():
        if dtype != "float32":  # integer buffers (position ids): unchanged by finetuning
            base = torch.arange(math.prod(shape)).reshape(shape).to(getattr(torch, dtype))
            tensors[name] = TensorDiff.zeros(name, shape, dtype, tensor_digest(base))
            continue
        base = torch.randn(shape) * 0.02
        delta = torch.randn(shape) * 1e-3
        tensors[name] = TensorDiff(name, shape, dtype, tensor_digest(base), delta)
        del base
    extras = {"classifier.weight": torch.randn(2, 768) * 0.02, "classifier.bias": torch.zeros(2)}
    diff = Diff(tensors, extras, {"architectures": ["BertForSequenceClassification"], "num_labels": 2},
                "bert-base-uncased", fingerprint_of({t.base_name: t.digest for t in tensors.values()}),
                {"task": "bench"})
    return project(diff, density).diff


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--density", type=float, default=0.005)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "size.json")
    args = ap.parse_args()

    import torch
    import zstandard
    from safetensors.torch import load as st_load, save as st_save

    from diffcli import artifact

    t0 = time.perf_counter()
    diff = build_diff(args.density)
    build_s = time.perf_counter() - t0
    n, k = diff.budget_numel, diff.nnz
    extras_bytes = sum(t.numel() * t.element_size() for t in diff.extras.values())
    bound = log2_binom(n, k) / 8 + 2 * k + extras_bytes

    pack_s, blob = timed(lambda: artifact.pack(diff, "fp16"), repeat=2)
    unpack_s, back = timed(lambda: artifact.loads(blob), repeat=3)
    assert back.nnz == k
    _data, stats = artifact._encode(diff, "fp16")

    other_sizes = {v: len(artifact.pack(diff, v)) for v in ("bf16", "fp32")}

    coo = {}
    for name, td in diff.tensors.items():
        if td.nnz:
            coo[f"{name}/indices"] = td.indices.contiguous()
            coo[f"{name}/values"] = td.values.float().contiguous()
    coo.update({f"extra/{name}": t for name, t in diff.extras.items()})
    coo_save_s, coo_blob = timed(lambda: st_save(coo), repeat=2)
    coo_load_s, _ = timed(lambda: st_load(coo_blob), repeat=2)

    dense16 = torch.cat([td.dense().reshape(-1).half() for td in diff.tensors.values() if td.is_float])
    zstd_level = 3  # level 19 on 220 MB would take minutes; level 3 is the usual "zstd it" baseline
    zstd_s, dense_zstd = timed(lambda: zstandard.ZstdCompressor(level=zstd_level).compress(
        dense16.view(torch.uint8).numpy().tobytes()))
    dense_zstd_bytes = len(dense_zstd) + extras_bytes
    del dense16

    dense_mb = 4 * n / 1e6
    rows = {
        "bound_B": bound,
        "artifact (fp16)": len(blob),
        "artifact_bf16": other_sizes["bf16"],
        "artifact_fp32": other_sizes["fp32"],
        "coo_safetensors": len(coo_blob),
        "zstd_dense_fp16": dense_zstd_bytes,
    }
    result = {
        "model": "bert-base-uncased shapes, random weights",
        "density": args.density, "N": n, "k": k, "extras_bytes": extras_bytes,
        "log2_binom_bytes": log2_binom(n, k) / 8, "bound_B": bound,
        "artifact_bytes": len(blob), "artifact_over_B": len(blob) / bound, "target_over_B": 0.92,
        "header_bytes": stats["header_bytes"], "index_bytes": stats["index_bytes"],
        "values_bytes": stats["values_bytes"], "extras_section_bytes": stats["extras_bytes"],
        "index_over_limit": stats["index_bytes"] / (log2_binom(n, k) / 8),
        "values_over_raw_fp16": stats["values_bytes"] / (2 * k),
        "bits_per_entry": 8 * len(blob) / k,
        "artifact_bf16_bytes": other_sizes["bf16"], "artifact_fp32_bytes": other_sizes["fp32"],
        "coo_safetensors_bytes": len(coo_blob), "zstd_dense_fp16_bytes": dense_zstd_bytes,
        "zstd_dense_level": zstd_level,
        "max_abs_error": stats["max_abs_error"],
        "pack_s": pack_s, "unpack_s": unpack_s, "coo_save_s": coo_save_s, "coo_load_s": coo_load_s,
        "zstd_dense_s": zstd_s,
        "pack_entries_per_s": k / pack_s, "unpack_entries_per_s": k / unpack_s,
        "pack_dense_mb_per_s": dense_mb / pack_s, "unpack_dense_mb_per_s": dense_mb / unpack_s,
        "pack_over_coo_save_time": pack_s / coo_save_s, "unpack_over_coo_load_time": unpack_s / coo_load_s,
        "build_s": build_s, "threads": torch.get_num_threads(),
    }

    print(f"N = {n:,} budget entries, k = {k:,} kept ({k / n:.3%}), extras {extras_bytes:,} B; "
          f"bound B = {bound:,.0f} B")
    print(f"{'file':<28}{'bytes':>14}{'/ B':>9}{'/ artifact':>12}")
    for label, size in rows.items():
        print(f"{label:<28}{size:>14,.0f}{size / bound:>9.3f}{size / len(blob):>12.2f}")
    print(f"artifact regions: header {stats['header_bytes']:,}  index {stats['index_bytes']:,} "
          f"({result['index_over_limit']:.3f} x log2C(N,k))  values {stats['values_bytes']:,} "
          f"({result['values_over_raw_fp16']:.3f} x raw fp16)  extras {stats['extras_bytes']:,}")
    print(f"{'speed':<28}{'seconds':>10}{'Mentries/s':>12}{'dense MB/s':>12}{'vs COO':>9}")
    print(f"{'pack (fp16)':<28}{pack_s:>10.3f}{k / pack_s / 1e6:>12.2f}{dense_mb / pack_s:>12.0f}"
          f"{pack_s / coo_save_s:>9.1f}x")
    print(f"{'unpack (load+verify)':<28}{unpack_s:>10.3f}{k / unpack_s / 1e6:>12.2f}{dense_mb / unpack_s:>12.0f}"
          f"{unpack_s / coo_load_s:>9.1f}x")
    print(f"{'safetensors COO save':<28}{coo_save_s:>10.3f}{k / coo_save_s / 1e6:>12.2f}")
    print(f"{'safetensors COO load':<28}{coo_load_s:>10.3f}{k / coo_load_s / 1e6:>12.2f}")
    verdict = "meets" if len(blob) <= 0.92 * bound else "MISSES"
    print(f"artifact / B = {len(blob) / bound:.3f} ({verdict} the 0.92 target); max |cast error| "
          f"{stats['max_abs_error']:.3g}; {result['bits_per_entry']:.2f} bits per kept entry")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
