"""Resumable training state in `<output>.partial/`: safetensors tensors + a JSON document, no pickle.

Written atomically after every finished epoch (the folder is replaced as a whole), read by `train --resume`.
Optimiser states are flattened to "<prefix>/<param id>/<key>" tensors; RNG states are uint8 tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffcli.errors import InvalidValueError

if TYPE_CHECKING:
    import torch

PARTIAL_SUFFIX = ".partial"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def partial_dir(output: Path) -> Path:
    """The work folder of an output: `<output>.partial` beside it."""
    return output.with_name(output.name + PARTIAL_SUFFIX)


def optimizer_tensors(opt, prefix: str) -> dict[str, "torch.Tensor"]:
    """An optimiser's per-parameter state as flat named CPU tensors."""
    out = {}
    for pid, st in opt.state_dict()["state"].items():
        for key, val in st.items():
            import torch

            t = val if isinstance(val, torch.Tensor) else torch.tensor(float(val))
            out[f"{prefix}/{pid}/{key}"] = t.detach().to("cpu").contiguous()
    return out


def load_optimizer(opt, tensors: dict[str, "torch.Tensor"], prefix: str) -> None:
    """Put state saved by `optimizer_tensors` back into a freshly built optimiser of the same layout."""
    sd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith(prefix + "/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = val
    dev = opt.param_groups[0]["params"][0].device
    for st in state.values():
        for name in list(st):
            st[name] = st[name].to(dev) if name != "step" else st[name].to(dev if _fused(opt) else "cpu")
    sd["state"] = state
    opt.load_state_dict(sd)


def _fused(opt) -> bool:
    return bool(opt.defaults.get("fused"))


def rng_tensors(device: "torch.device", gen: "torch.Generator | None") -> dict[str, "torch.Tensor"]:
    """CPU (dropout), CUDA and gate-noise generator states."""
    import torch

    out = {"rng/cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng/cuda"] = torch.cuda.get_rng_state(device)
    if gen is not None:
        out["rng/gate"] = gen.get_state()
    return out


def restore_rng(tensors: dict, device: "torch.device", gen: "torch.Generator | None") -> None:
    """Undo `rng_tensors`: the resumed run draws exactly what the uninterrupted one would."""
    import torch

    torch.set_rng_state(tensors["rng/cpu"])
    if device.type == "cuda" and "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"], device)
    if gen is not None and "rng/gate" in tensors:
        gen.set_state(tensors["rng/gate"])


def save_state(folder: Path, tensors: dict[str, "torch.Tensor"], state: dict) -> None:
    """Replace the work folder atomically with the state after a finished epoch."""
    from safetensors.torch import save_file

    from diffcli.outputs import atomic_dir

    with atomic_dir(folder, force=True) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def load_state(folder: Path) -> tuple[dict[str, "torch.Tensor"], dict]:
    from safetensors.torch import load_file

    from diffcli.errors import FormatError

    try:
        state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / STATE_TENSORS))
    except Exception as exc:  # noqa: BLE001 - any unreadable work folder is the same failure
        raise FormatError(f"cannot resume from {folder}: {exc}",
                          hint="pass --force without --resume to start over") from exc
    return tensors, state


# options that do not change the result; a resumed run may differ in these
_RESUME_FREE = {"eval_batch_size", "activation_checkpointing"}  # memory and speed only, not the maths


def check_resume_options(saved: dict, now: dict) -> None:
    diffs = [k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k]]
    if diffs:
        shown = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now[k]!r})" for k in diffs[:4])
        raise InvalidValueError(f"the interrupted run used other options: {shown}",
                                hint="resume with the same options, or pass --force without --resume to start over")
