"""Resumable training state in `<output>.partial/`: safetensors tensors + a JSON document, no pickle.

Written atomically after every finished epoch (the folder is replaced as a whole), read by `train --resume`.
Optimiser states are flattened to "<prefix>/<param id>/<key>" tensors; RNG states are uint8 tensors, under
torchrun every rank's (`gather_rng`), so that each rank resumes its own streams (`own_rng`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from diffcli.errors import InvalidValueError

if TYPE_CHECKING:
    import torch

    from diffcli.dist import Dist

PARTIAL_SUFFIX = ".partial"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def partial_dir(output: Path) -> Path:
    """The work folder of an output: `<output>.partial` beside it."""
    return output.with_name(output.name + PARTIAL_SUFFIX)


def optimizer_tensors(opt, prefix: str) -> dict[str, "torch.Tensor"]:
    """An optimiser's per-parameter state as flat named CPU tensors."""
    import torch

    out = {}
    for pid, st in opt.state_dict()["state"].items():
        for key, val in st.items():
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


def gather_rng(tensors: dict[str, "torch.Tensor"], dist: "Dist", device: "torch.device") -> dict[str, "torch.Tensor"]:
    """`tensors` plus every rank's RNG states as `rng/<stream>/<rank>` beside the one-process keys (a collective)."""
    out = {k: v for k, v in tensors.items() if not _per_rank(k)}
    if dist.world <= 1:
        return out
    import torch
    import torch.distributed as td

    on = device if td.get_backend() == "nccl" else torch.device("cpu")  # nccl gathers cuda tensors, gloo cpu ones
    for key in sorted(k for k in out if k.startswith("rng/")):
        mine = out[key].to(on)
        every = [torch.empty_like(mine) for _ in range(dist.world)]  # a stream's state has one size on every rank
        td.all_gather(every, mine)
        out.update({f"{key}/{rank}": t.cpu() for rank, t in enumerate(every)})
    return out


def own_rng(tensors: dict[str, "torch.Tensor"], rank: int) -> dict[str, "torch.Tensor"]:
    """Saved tensors with this rank's RNG states (`rng/<stream>/<rank>`, when saved) under the one-process keys."""
    own = {k.rsplit("/", 1)[0]: v for k, v in tensors.items() if _per_rank(k) and k.rsplit("/", 1)[1] == str(rank)}
    return {**{k: v for k, v in tensors.items() if not _per_rank(k)}, **own}


def _per_rank(key: str) -> bool:
    return key.startswith("rng/") and key.count("/") == 2


def check_resume_world(saved: dict, world: int, work: Path) -> None:
    """Refuse to resume with another number of processes: the data split, the steps and the RNG streams differ."""
    was = saved.get("world_size")  # absent in folders written before it was recorded: not checked
    if was is not None and int(was) != world:
        was = int(was)
        how = f"torchrun --nproc_per_node {was}" if was > 1 else "one process (without torchrun)"
        raise InvalidValueError(f"the interrupted run at {work} trained with {was} processes, now {world}",
                                hint=f"resume it with {how}, or pass --force without --resume to start over")


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


def read_state(folder: Path) -> dict:
    """The interrupted run's state.json alone (cheap): what the resume checks read before anything is built."""
    from diffcli.errors import FormatError

    try:
        state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        missing = [k for k in ("options", "phase", "epochs_done") if not isinstance(state, dict) or k not in state]
        if missing or not (folder / STATE_TENSORS).is_file():
            raise ValueError(f"{STATE_JSON} lacks {', '.join(missing)}" if missing else f"{STATE_TENSORS} is missing")
        return state
    except Exception as exc:  # noqa: BLE001 - any unreadable work folder is the same failure
        raise FormatError(f"cannot resume from {folder}: {exc}",
                          hint="pass --force without --resume to start over") from exc


def data_identity(task_data) -> dict:
    """What a resumed run must train on again: its columns, labels, the examples each split holds and a digest of
    them (a custom task is `custom` whatever its files, and one folder has many spellings, so names say little)."""
    import hashlib

    spec = task_data.spec
    fields = getattr(spec, "text_fields", None)
    splits = {"train": task_data.train or [], **task_data.eval}
    digest = hashlib.sha256()
    for split, examples in splits.items():
        digest.update(split.encode())
        for example in examples:  # its content: not `where` (the path as typed, line) of LM and tagged rows
            names = getattr(example, "_fields", ())
            content = tuple(v for f, v in zip(names, example) if f != "where") if names else example
            digest.update(repr(content).encode("utf-8", "surrogateescape"))
    return {"identity": 2, "text_fields": list(fields) if fields is not None else None,
            "label_field": getattr(spec, "label_field", None),
            "labels": list(spec.labels) if spec.labels is not None else None,
            "examples": {k: len(v) for k, v in splits.items()}, "sha256": digest.hexdigest()}


def check_resume_source(saved: dict, task: str, model: str, work: Path, data: dict | None = None) -> None:
    """Refuse to resume a run of another task, base model or data (`data_identity`; a state written before it
    was recorded is not checked for it)."""
    if saved.get("task") != task or saved.get("model") != model:
        raise InvalidValueError(f"the interrupted run at {work} trained {saved.get('task')} on {saved.get('model')}",
                                hint="pass --force without --resume to start over")
    was = saved.get("data")
    if isinstance(was, dict) and "identity" not in was and data is not None:
        # identity 1 recorded the last example's field names as text_fields: compare everything else
        was = {k: v for k, v in was.items() if k != "text_fields"}
        data = {k: v for k, v in data.items() if k not in ("text_fields", "identity")}
    if data is not None and isinstance(was, dict) and was != data:
        order = ("identity", "text_fields", "label_field", "labels", "examples", "sha256")  # the digest last
        key = next(k for k in sorted({**was, **data}, key=lambda k: order.index(k) if k in order else -1)
                   if was.get(k) != data.get(k))
        what = ("examples of the same counts but other content" if key == "sha256"
                else f"its {key.replace('_', ' ')} {was.get(key)!r} (now {data.get(key)!r})")
        raise InvalidValueError(f"the interrupted run at {work} trained on other data: {what}",
                                hint="resume with the same data options, or pass --force without --resume to start over")


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


def check_resume_options(saved: dict, now: dict, takes: Callable[[str], bool] | None = None) -> None:
    """Refuse a resume whose options differ; only those the method `takes` when given: another method's option sits
    at its default, and a default a later version changed must not block a run that ignores it."""
    diffs = [k for k in now if k not in _RESUME_FREE and (takes is None or takes(k)) and saved.get(k) != now[k]]
    if diffs:
        shown = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now[k]!r})" for k in diffs[:4])
        raise InvalidValueError(f"the interrupted run used other options: {shown}",
                                hint="resume with the same options, or pass --force without --resume to start over")
