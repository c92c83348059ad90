"""Peak memory a training run needs, per method, before it starts: so `train` can stop in its first seconds.

In bytes, all fp32 (P = all parameters, N = the shared base entries the diff covers, H = P − N the dense head,
k = kept entries, T = the largest shared tensor, A = activations saved for backward):

    full finetuning    4P + 8P + max(4P, A)  weights, AdamW's moments, and the gradients filling up in backward
                                             as the activations drain (the peak is the end of forward or of backward)
    L0 phase           56N + 16H + A         14 N-float buffers (θ₀, θ, w, log α, noise, z_g, segment ids, three
                                             gradients, four AdamW moments), all allocated up front
    sparse fixed mask  4P + 8T + 28k + 16H + A   the model, one tensor's dense gradient and its gather, and
                                             δ, θ₀, gradient, two moments and an int64 position per kept entry
    choosing a Fisher mask  4P + 2N + 8T + A(mask batch)   bfloat16 scores, before training starts

A for a transformer encoder layer stack at batch b, length s, hidden h, FFN width f, a heads:
per layer 4·b·s·(12h + 3f) + b·s·3h + a·b·s²·18, calibrated on measured peaks (random BERT-large, batch 8,
length 128, CPU: `bench/results/train_cost_sparse.md`; Korthikanti et al. 2022, eq. 2 counts fewer tensors
than the eager PyTorch attention and GELU keep). With activation checkpointing of every n-th layer
(`activations.checkpoint_activations`: layers 0, n, 2n, ...) the c = ⌈L/n⌉ checkpointed layers keep only their
input, 4·b·s·h, and backward rebuilds one of them at a time once the layers above it are done, beside the
(n − 1)(c − 1) plain layers below the last one: max((L − c)·layer, ((n − 1)(c − 1) + 1)·layer) + c·4·b·s·h.
On the CPU a fixed process overhead is added.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable

from diffcli.errors import InvalidValueError

if TYPE_CHECKING:
    import torch

METHODS = ("full", "l0", "sparse")
CPU_OVERHEAD = 450 * 2**20  # RSS of an idle process that imported torch and transformers (measured ~0.4 GiB)


@dataclass
class MemoryEstimate:
    method: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    overlap: bool = False  # gradients fill up while activations drain (full finetuning): the larger one counts

    @property
    def total(self) -> int:
        moving = max(self.gradients, self.activations) if self.overlap else self.gradients + self.activations
        return self.weights + self.optimizer + moving + self.overhead

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), total=self.total)


def _cfg(config: Any, *names: str, default: int | None = None) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def activation_bytes(config: Any, batch_size: int, seq_len: int, checkpoint_every: int = 0) -> int:
    """fp32 activations a transformer saves for backward, every `checkpoint_every`-th layer checkpointed (0: none;
    see the module docstring); 0 when `config` lacks sizes."""
    h = _cfg(config, "hidden_size", "n_embd", "d_model")
    layers = _cfg(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _cfg(config, "num_attention_heads", "n_head", "num_heads")
    if not (h and layers and heads):
        return 0
    f = _cfg(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * h)
    b, s = int(batch_size), int(seq_len)
    per_layer = 4 * b * s * (12 * h + 3 * f) + b * s * 3 * h + heads * b * s * s * 18
    embeddings = 4 * 4 * b * s * h  # the embeddings' sum, norm and dropout
    ckpt = -(-layers // checkpoint_every) if checkpoint_every else 0
    if not ckpt:
        return layers * per_layer + embeddings
    n = checkpoint_every
    return max(layers - ckpt, (n - 1) * (ckpt - 1) + 1) * per_layer + ckpt * 4 * b * s * h + embeddings


def estimate(model: "torch.nn.Module", method: str, *, batch_size: int, seq_len: int,
             shared: Iterable[str] | None = None, k: int | None = None, mask_batch_size: int | None = None,
             device: "str | torch.device" = "cpu", checkpoint_every: int = 0) -> MemoryEstimate:
    """Bytes a run of `method` needs at its peak; `shared` names the diff's base tensors (default: every
    parameter), `k` the kept entries (sparse only), `mask_batch_size` the batch a Fisher mask is chosen with
    (sparse only; None when the mask is given), `checkpoint_every` the activation checkpointing (0: off)."""
    import torch

    if method not in METHODS:
        raise InvalidValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    params = dict(model.named_parameters())
    shared = set(params) if shared is None else set(shared)
    p_all = sum(int(p.numel()) for p in params.values())
    n = sum(int(p.numel()) for name, p in params.items() if name in shared)
    head = p_all - n
    largest = max((int(p.numel()) for name, p in params.items() if name in shared), default=0)
    acts = activation_bytes(getattr(model, "config", None), batch_size, seq_len, checkpoint_every)
    overhead = CPU_OVERHEAD if torch.device(device).type == "cpu" else 0
    if method == "full":
        return MemoryEstimate(method, 4 * p_all, 4 * p_all, 8 * p_all, acts, overhead, overlap=True)
    if method == "l0":  # θ₀, θ, w, log α, noise, z_g and segment ids; 3 gradients; 2 moments each for w, log α
        return MemoryEstimate(method, 4 * head + 4 * n * 7, 4 * head + 4 * n * 3, 8 * head + 4 * n * 4,
                              acts, overhead)
    if k is None:
        raise InvalidValueError("the sparse estimate needs k, the number of kept entries")
    kept = int(k)
    sparse = MemoryEstimate(method, 4 * p_all, 8 * largest + 4 * kept + 4 * head, 24 * kept + 8 * head,
                            acts, overhead)
    if mask_batch_size:  # choosing a Fisher mask comes first; when its peak is the larger, it counts
        fisher = 2 * n + 8 * largest + activation_bytes(getattr(model, "config", None), mask_batch_size, seq_len,
                                                        checkpoint_every)
        sparse.gradients += max(0, fisher - (sparse.gradients + sparse.optimizer + sparse.activations))
    return sparse


def available_bytes(device: "str | torch.device") -> int | None:
    """Free memory on `device` now: cuda's free bytes, or MemAvailable of /proc/meminfo on the CPU."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
