"""One base in memory, many tasks: switch a shared encoder between diffs in place, each task with its own head.

`DiffBank` loads the base encoder once and moves its floating-point parameters into one flat
buffer per dtype (the parameters become views of it). Each added task gets a thin task model
(e.g. BertForSequenceClassification) built on the meta device from the diff's config, whose
encoder submodule is the shared encoder and whose head is materialised from the diff's extras:
memory per task is its positions and values plus the head, never a second encoder.

At `add`, the diff is applied once with `applying.apply_` to the flat buffers (one sparse δ over
global positions) and reverted with `applying.revert_`; the bank keeps, per task, the flat
positions and the values there before (the base) and after (base + δ, computed by apply_ in fp32,
cast once). A switch then writes cached values: `scatter_` the previous task's "before" values
(restoring the base bit for bit, no subtraction) and the new task's "after" values — two indexed
writes, no arithmetic. Anything the flat buffers do not hold (extras that land in the encoder,
e.g. a pooler the base lacked) and every low-rank δ = B·A (whose cached after-values would be a whole
tensor; the task keeps only B and A) go through apply_/revert_ on the task model at each switch.
A task stays applied after its `with` block, so using it again costs nothing; `reset()` returns
the encoder to the base.

    bank = DiffBank("minilm")
    bank.add("rte", "rte.diff")
    with bank.use("rte") as model:
        logits = model(**batch).logits
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from diffcli.diff import Diff, TensorDiff, nonfinite
from diffcli.errors import BaseMismatchError, FormatError, InvalidValueError
from diffcli.weights import match_names, resolve_model, tensor_digest

if TYPE_CHECKING:
    import torch

_NUMPY_FLOATS = ("torch.float16", "torch.float32", "torch.float64")


@dataclass
class _Task:
    name: str
    model: "torch.nn.Module"
    slices: list[tuple[int, "torch.Tensor", "torch.Tensor", "torch.Tensor"]]  # (flat no, positions, before, after)
    rest: Diff | None  # what the flat buffers do not hold, applied with apply_ at each switch
    head_keys: list[str]
    source: str
    meta: dict[str, Any]
    probe_error: float | None = None  # largest relative probe error of its basis records (None: it has none)

    @property
    def nbytes(self) -> int:
        """Tensor bytes this task holds: positions, before/after values, the rest diff and its own head."""
        def size(t) -> int:
            return t.numel() * t.element_size()

        n = sum(size(i) + size(b) + size(a) for _, i, b, a in self.slices)
        if self.rest is not None:
            n += sum(size(td.values) + (size(td.indices) if td.indices is not None else 0)
                     + (sum(size(f) for f in td.factors) if td.factors is not None else 0)
                     for td in self.rest.tensors.values())
            n += sum(size(t) for t in self.rest.extras.values())
        state = self.model.state_dict()
        return n + sum(size(state[k]) for k in self.head_keys)


def task_config(diff: Diff):
    """The finetuned model's transformers config, rebuilt from the diff's recorded config dict."""
    from transformers import AutoConfig

    cfg = dict(diff.config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise InvalidValueError("the diff's config has no model_type; cannot build its task model")
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError, TypeError) as exc:  # TypeError: a value of the wrong type (num_labels "2")
        raise InvalidValueError(f"cannot build a config for model type {model_type!r}: {exc}") from None


class _BaseHeads:
    """Tensors of the base folder under task-model names (for heads the bare encoder does not hold)."""

    def __init__(self, folder: Path):
        from diffcli.weights import WeightStore

        self.store = WeightStore(folder)
        self.names = self.store.names()
        self.loaded: dict[str, "torch.Tensor"] = {}

    def get(self, key: str, device) -> "torch.Tensor | None":
        """The base tensor for task-model name `key` on `device`, one shared copy per base tensor."""
        bname = match_names(self.names, [key]).get(key)
        if bname is None:
            return None
        if bname not in self.loaded:
            self.loaded[bname] = self.store[bname].detach().to(device).clone()
        return self.loaded[bname]


def _flatten(encoder) -> tuple[list, dict[str, tuple[int, int, tuple[int, ...]]], "torch.nn.Module"]:
    """Move the encoder's floating-point parameters into one flat buffer per dtype; they become views.

    Returns the flat buffers, name → (buffer no, offset, shape), and a holder module whose parameters
    `flat0`, `flat1`, ... are the buffers (so `applying.apply_` can address them by name).
    """
    import torch

    groups: dict[tuple, list[tuple[str, torch.nn.Parameter]]] = {}
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in encoder.named_parameters(remove_duplicate=False):
        if not p.is_floating_point():
            continue
        if id(p) in first_name:  # tied parameters share one slot
            aliases[name] = first_name[id(p)]
            continue
        first_name[id(p)] = name
        groups.setdefault((p.dtype, p.device), []).append((name, p))
    flats, slots = [], {}
    holder = torch.nn.Module()
    with torch.no_grad():
        for g, ((dtype, device), params) in enumerate(groups.items()):
            flat = torch.empty(sum(p.numel() for _, p in params), dtype=dtype, device=device)
            off = 0
            for name, p in params:
                n = p.numel()
                flat[off:off + n].copy_(p.detach().reshape(-1))
                p.data = flat[off:off + n].view(p.shape)
                slots[name] = (g, off, tuple(p.shape))
                off += n
            flats.append(flat)
            holder.register_parameter(f"flat{g}", torch.nn.Parameter(flat, requires_grad=False))
    for name, target in aliases.items():
        slots[name] = slots[target]
    return flats, slots, holder


class SharedEncoderError(InvalidValueError):
    """A diff that replaces an encoder tensor by one of another shape (resized embeddings): the bank's tasks share
    one encoder, so it cannot hold it (`eval` evaluates such a diff on the model `apply` rebuilds)."""


def _made_on(diff: Diff) -> str:
    """The hint of a diff that does not fit the bank's base (a bank, like eval, has no --force)."""
    return f"use the base it was made on ({diff.base_ref})" if diff.base_ref else "use the base it was made on"


def quiet_load(auto_cls, folder: Path):
    """from_pretrained without transformers' loading bar or load report (stderr is for our own lines): a base
    folder holding tensors the bare model does not take (an untied LM head, an MLM head) is expected here."""
    from transformers.utils import logging as hf_logging

    was, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return auto_cls.from_pretrained(folder)
    finally:
        hf_logging.set_verbosity(level)
        if was:
            hf_logging.enable_progress_bar()


class DiffBank:
    """A base model loaded once, switched in place between task diffs (see the module docstring)."""

    def __init__(self, base: str | Path, *, device: "str | torch.device | None" = None):
        import torch
        from transformers import AutoModel

        self.base_ref = str(base)
        self.folder = resolve_model(str(base))
        from diffcli.prediction import pick_device

        self.device = torch.device(device) if device is not None else pick_device()  # cuda when present
        self.encoder = quiet_load(AutoModel, self.folder).to(self.device).eval()
        self._flats, self._slots, self._holder = _flatten(self.encoder)
        # One parameter per flat buffer, to notice if someone moved or re-cast the encoder behind our back.
        params = dict(self.encoder.named_parameters())
        self._sentinels = [(params[n], g, off) for n, (g, off, _) in self._slots.items() if n in params]
        self._sentinels = list({g: (p, g, off) for p, g, off in self._sentinels}.values())
        self._tasks: dict[str, _Task] = {}
        self._digests: dict[str, str] = {}
        self._base_heads: _BaseHeads | None = None
        self._active: str | None = None
        self._rest_handle = None
        self._depth = 0

    # ------------------------------------------------------------------ adding tasks

    def add(self, name: str, diff: Diff | str | Path, *, task_type: str | None = None,
            source: str | None = None) -> None:
        """Register a task from a Diff or a path (`.diff` file or checkpoint); checks its base once, here.

        The task model's class follows `task_type`, else the type the diff records (its metadata or its
        config's architecture): sequence classification, token classification or a causal LM. Errors name
        the diff by `source`, else its path, else the task name.
        """
        if not isinstance(name, str) or not name:
            raise InvalidValueError("a task name must be a non-empty string")
        if name in self._tasks:
            raise InvalidValueError(f"task {name!r} is already in the bank", hint="pick another name")
        if self._depth:
            raise InvalidValueError(f"cannot add task {name!r} while task {self._active!r} is in use")
        source = source or (str(diff) if not isinstance(diff, Diff) else name)
        if not isinstance(diff, Diff):
            from diffcli.sources import load_diff

            diff = load_diff(diff)
        bad = diff.nonfinite_extra
        if bad is not None:  # a diverged head: refused as `apply` refuses it, not scored as NaN logits
            raise FormatError(f"{source}: extra tensor {bad!r} has non-finite values (NaN or Inf)")
        self.reset()  # digests and the trial apply need the encoder as loaded
        self._check_base(diff, source)
        from diffcli.task_types import of_diff

        scaled = set(diff.bases)
        diff, probe_error = self._resolve_bases(diff, source)
        model, head_keys = self._task_model(diff, source, of_diff(diff.config, diff.meta, task_type))
        slices, rest = self._prepare(diff, model, head_keys, source, whole=scaled)
        self._tasks[name] = _Task(name, model, slices, rest, head_keys, source, dict(diff.meta), probe_error)

    def _check_base(self, diff: Diff, source: str) -> None:
        """Every base tensor the diff builds on must be in the loaded base with the same content.

        Tensors the bare encoder does not hold (an untied LM head) are checked against the base folder.
        """
        state = self.encoder.state_dict()
        mapping = match_names(state.keys(), [td.base_name for td in diff.tensors.values()])
        differ = []
        for td in diff.tensors.values():
            key = mapping.get(td.base_name)
            if key is None and td.nnz and td.base_name in self._outside().names:
                key, tensor = f"base:{td.base_name}", self._outside().store[td.base_name]
            elif key is not None:
                tensor = state[key]
            elif td.nnz == 0:  # e.g. a non-persistent buffer the checkpoint kept: nothing to apply
                continue
            else:
                raise BaseMismatchError(f"{source} does not fit base {self.base_ref}: it has no tensor {td.base_name}",
                                        hint=_made_on(diff))
            if tuple(tensor.shape) != tuple(td.shape):
                raise BaseMismatchError(f"{source} does not fit base {self.base_ref}: {key} has shape "
                                        f"{list(tensor.shape)}, diff expects {list(td.shape)}", hint=_made_on(diff))
            if key not in self._digests:
                self._digests[key] = tensor_digest(tensor.detach().cpu())
            if self._digests[key] != td.digest:
                differ.append(key)
        if differ:
            raise BaseMismatchError(f"{source} was made on another base than {self.base_ref} "
                                    f"({len(differ)} of {len(diff.tensors)} tensors differ, first {differ[0]})",
                                    hint=_made_on(diff))

    def _outside(self) -> "_BaseHeads":
        """The base folder's tensors, for those the bare encoder does not hold (opened once)."""
        if self._base_heads is None:
            self._base_heads = _BaseHeads(self.folder)
        return self._base_heads

    def _resolve_bases(self, diff: Diff, source: str) -> tuple[Diff, float | None]:
        """Basis scales folded into dense δ from the loaded base (probe-checked), and the largest probe error;
        other diffs pass unchanged (error None)."""
        from diffcli.svd_basis import resolve_diff

        if not diff.bases:
            return diff, None
        state = self.encoder.state_dict()
        mapping = match_names(state.keys(), [td.base_name for td in diff.tensors.values()])

        def base_of(name: str):
            if name in mapping:
                return state[mapping[name]]
            if name in self._outside().names:  # an untied LM head: in the base folder, not the bare encoder
                return self._outside().store[name]
            raise BaseMismatchError(f"{source} does not fit base {self.base_ref}: it has no tensor {name}",
                                    hint=_made_on(diff))

        return resolve_diff(diff, base_of)

    def _task_model(self, diff: Diff, source: str, kind) -> tuple["torch.nn.Module", list[str]]:
        """A task model sharing the bank's encoder, with its own head from the diff's extras (else the base's).

        Returns the model and the names of the head tensors it owns (those from the diff's extras).
        """
        import torch

        cfg = task_config(diff)
        kind.check_model(cfg)  # a type the architecture cannot serve: one clear line, not transformers' error
        with torch.device("meta"):
            model = kind.model_class().from_config(cfg)
        prefix = model.base_model_prefix
        own = getattr(model, prefix, None)
        if own is None:
            raise InvalidValueError(f"{type(model).__name__} has no base model {prefix!r} to share")
        want = {k: tuple(v.shape) for k, v in own.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in self.encoder.state_dict().items()}
        misfit = [k for k in want if k in have and want[k] != have[k]] + [k for k in want if k not in have]
        resized = [k for k in misfit if k in have and f"{prefix}.{k}" in diff.extras
                   and tuple(diff.extras[f"{prefix}.{k}"].shape) == want[k]]
        if misfit and resized == misfit:  # the diff carries each such tensor whole, at its new shape
            k = misfit[0]
            raise SharedEncoderError(f"{source} resizes {prefix}.{k} from {list(have[k])} in the base to "
                                     f"{list(want[k])}: the bank's tasks share one encoder, so it cannot hold this diff",
                                     hint="rebuild the model with `diffprune apply` and load that folder")
        if misfit:
            k = misfit[0]
            what = ("is missing from the base" if k not in have
                    else f"has shape {list(have[k])} in the base, {list(want[k])} in the diff's config")
            raise BaseMismatchError(f"{source}'s model does not fit base {self.base_ref}: {prefix}.{k} {what}",
                                    hint=_made_on(diff))
        setattr(model, prefix, self.encoder)
        shared = {id(p) for p in self.encoder.parameters()}
        if getattr(cfg, "tie_word_embeddings", False) and hasattr(model, "get_output_embeddings"):
            out = model.get_output_embeddings()
            if out is not None and tuple(out.weight.shape) == tuple(model.get_input_embeddings().weight.shape):
                out.weight = model.get_input_embeddings().weight  # an LM head tied to the shared embeddings
        tied = {k for k, v in model.named_parameters(remove_duplicate=False) if id(v) in shared}
        head_keys = [k for k in model.state_dict() if not k.startswith(prefix + ".") and k not in tied]
        head_state, own = {}, []
        dtype = next(self.encoder.parameters()).dtype  # the task model runs in the shared encoder's dtype
        for key in head_keys:
            expect = tuple(model.state_dict()[key].shape)
            t = diff.extras.get(key)
            if t is not None:
                t = t.detach().to(self.device).clone()
                own.append(key)
            else:  # a head the base has too (an untied LM head): one copy for all tasks, each δ applied at switch
                t = self._outside().get(key, self.device)
            if t is None:
                raise InvalidValueError(f"{source} has no task head: its extras lack {key}",
                                        hint="diffs for the bank must carry their classifier head")
            if tuple(t.shape) != expect:
                raise BaseMismatchError(f"{source}'s head does not fit its config: {key} has shape {list(t.shape)}, "
                                        f"num_labels={cfg.num_labels} needs {list(expect)}",
                                        hint="its head and config disagree: make the diff again from its finetune")
            head_state[key] = t.to(dtype) if t.is_floating_point() else t  # a head saved in another dtype
        model.load_state_dict(head_state, strict=False, assign=True)
        left = [k for k, v in model.state_dict().items() if v.is_meta]
        if left:
            raise InvalidValueError(f"{source}: cannot materialise {left[0]} of the task model")
        return model.eval(), own

    def _prepare(self, diff: Diff, model, head_keys: list[str], source: str, whole: set[str] = frozenset()):
        """Apply the diff once (apply_ on the flat buffers), cache positions with before/after values, revert.

        Returns the cached slices and the rest diff (tensors outside the flat buffers, the `whole` ones: the
        dense δ of basis scales, and encoder extras), which is also tried once here so every name, shape and
        value problem shows up at `add`.
        """
        import torch

        from diffcli.applying import apply_, revert_

        prefix = model.base_model_prefix + "."
        mapping = match_names(model.state_dict().keys(), list(diff.tensors))
        parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        rest_tensors: dict[str, TensorDiff] = {}
        for target, td in diff.tensors.items():
            if td.nnz == 0:  # nothing to add; also skips buffers the live model does not save
                continue
            if target in whole:  # a dense δ (basis scales): 4 bytes an entry in the rest diff, not 16 as positions
                rest_tensors[target] = td
                continue
            key = mapping.get(target)
            if key is None:
                raise BaseMismatchError(f"{source} does not fit the task model: it has no tensor for {target}",
                                        hint=_made_on(diff))
            slot = self._slots.get(key[len(prefix):]) if key.startswith(prefix) else None
            if slot is None or slot[2] != tuple(td.shape) or td.is_lowrank:  # B·A: applied at each switch
                rest_tensors[target] = td
                continue
            if nonfinite(td.values):  # named here: in the flat buffers it would be flat0
                raise FormatError(f"diff values of {target!r} are not finite (NaN or Inf)")
            s = td.sparse()
            keep = s.values != 0
            idx, val = (s.indices, s.values) if bool(keep.all()) else (s.indices[keep], s.values[keep])
            parts.setdefault(slot[0], []).append((idx.to(self.device) + slot[1], val.float().to(self.device)))
        heads = set(head_keys)
        shared = {k for k, v in model.named_parameters(remove_duplicate=False)  # tied to the encoder, or the base's
                  if not k.startswith(prefix) and k not in heads}
        extras = {k: t for k, t in diff.extras.items() if k not in heads and k not in shared}
        flat_tensors = {}
        for g, chunks in parts.items():
            idx = torch.cat([c[0] for c in chunks])
            val = torch.cat([c[1] for c in chunks])
            idx, order = torch.sort(idx)
            if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):
                raise InvalidValueError(f"{source} changes one (tied) parameter under two names")
            flat = self._flats[g]
            flat_tensors[f"flat{g}"] = TensorDiff(f"flat{g}", (flat.numel(),), str(flat.dtype).removeprefix("torch."),
                                                  "", val[order].contiguous(), idx.contiguous())
        slices = []
        flat_diff = Diff(flat_tensors, {}, {}, diff.base_ref, diff.base_fingerprint)
        before = {name: self._flats[int(name[4:])].index_select(0, td.indices) for name, td in flat_tensors.items()}
        handle = apply_(self._holder, flat_diff, check=False)
        try:
            for name, td in flat_tensors.items():
                g = int(name[4:])
                slices.append((g, td.indices, before[name], self._flats[g].index_select(0, td.indices)))
        finally:
            revert_(self._holder, handle)
        rest = None
        if rest_tensors or extras:
            rest = Diff(rest_tensors, {k: t.to(self.device) for k, t in extras.items()}, diff.config, diff.base_ref,
                        diff.base_fingerprint)
            revert_(model, apply_(model, rest, check=False))
        return slices, rest

    # ------------------------------------------------------------------ switching

    @contextmanager
    def use(self, name: str) -> Iterator["torch.nn.Module"]:
        """Make `name` the active task and yield its model. Nesting the same task is fine; another is refused."""
        self._task(name)
        if self._depth and name != self._active:
            raise InvalidValueError(f"cannot use task {name!r} inside `bank.use({self._active!r})`: "
                                    "the encoder is shared, so only one task can be active",
                                    hint="leave the outer `with` block first")
        self._switch(name)
        self._depth += 1
        try:
            yield self._tasks[name].model
        finally:
            self._depth -= 1

    def _check_alias(self) -> None:
        """The encoder's parameters must still be views of the flat buffers the switches write to."""
        for p, g, off in self._sentinels:
            flat = self._flats[g]
            if p.data.data_ptr() != flat.data_ptr() + off * flat.element_size():
                raise InvalidValueError("the bank's encoder was moved or re-cast (.to/.half/.cuda) after loading; "
                                        "its task switches would be lost",
                                        hint="create the bank with DiffBank(base, device=...) instead")

    def _switch(self, name: str) -> None:
        import torch

        from diffcli.applying import apply_

        if self._active == name:
            return
        self._check_alias()
        self.reset()
        task = self._tasks[name]
        if task.rest is not None:
            self._rest_handle = apply_(task.model, task.rest, check=False)
        with torch.no_grad():
            for g, idx, _before, after in task.slices:
                self._write(g, idx, after)
        self._active = name

    def _write(self, g: int, idx: "torch.Tensor", values: "torch.Tensor") -> None:
        """flat[idx] = values; on the CPU through NumPy, whose fancy assignment is ~1.5x torch's scatter_ here."""
        flat = self._flats[g]
        if flat.device.type == "cpu" and str(flat.dtype) in _NUMPY_FLOATS:
            flat.detach().numpy()[idx.numpy()] = values.numpy()
        else:
            flat.scatter_(0, idx, values)

    def reset(self) -> None:
        """Revert the active task, leaving the encoder bit for bit as loaded from the base."""
        from diffcli.applying import revert_

        if self._depth:
            raise InvalidValueError(f"cannot reset the bank while task {self._active!r} is in use")
        if self._active is not None:
            import torch

            task = self._tasks[self._active]
            with torch.no_grad():
                for g, idx, before, _after in task.slices:
                    self._write(g, idx, before)
            if self._rest_handle is not None:
                revert_(task.model, self._rest_handle)
            self._active, self._rest_handle = None, None

    def generate(self, name: str, *args, **kwargs):
        """`model.generate(*args, **kwargs)` of a causal-LM task with its diff applied (the task stays active)."""
        with self.use(name) as model:
            if not callable(getattr(model, "generate", None)) or not model.can_generate():
                raise InvalidValueError(f"task {name!r} is a {type(model).__name__}: it cannot generate",
                                        hint="generate needs a causal-lm diff")
            return model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ introspection

    @property
    def active(self) -> str | None:
        return self._active

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def _task(self, name: str) -> "_Task":
        if name not in self._tasks:
            raise InvalidValueError(f"no task {name!r} in the bank; tasks: {', '.join(self._tasks) or 'none'}")
        return self._tasks[name]

    def config(self, name: str):
        """The task model's config (num_labels, id2label, ...)."""
        return self._task(name).model.config

    def meta(self, name: str) -> dict[str, Any]:
        """The diff's metadata (task, metrics, hyperparameters) as recorded when it was made."""
        return dict(self._task(name).meta)

    def basis_probe_error(self, name: str) -> float | None:
        """The largest relative probe error of the task's basis records, checked at `add` (None: it has none)."""
        return self._task(name).probe_error

    def task_nbytes(self, name: str) -> int:
        """Tensor bytes held for one task: sparse δ, encoder extras and its head."""
        return self._task(name).nbytes

    def encoder_nbytes(self) -> int:
        """Tensor bytes of the shared encoder (held once, whatever the number of tasks)."""
        return sum(t.numel() * t.element_size() for t in self.encoder.state_dict().values())

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks
