"""`diffprune train`: choose a mask with a method of `diffcli.methods`, finetune its entries, write the best diff.

Phases: (1) the method's own (for `magnitude`, the default: a dense run, then its k largest |δ|; for `l0`: gated
training and the exact top-k projection), which
yields exactly k = round(S·N) kept entries and their start values; (2) the shared fixed-mask phase — only the
kept entries (and the dense new head) are finetuned; the best dev epoch is written. Resumable after every
epoch; under torchrun every rank trains and rank 0 alone evaluates and writes. The steps, the projection,
the fixed phase and the export are a `DiffPruner`'s (`diffcli.api`), the library's own implementation.
"""

from __future__ import annotations

import atexit
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from diffcli.activations import checkpoint_activations
from diffcli.dist import Dist, check_device, init_dist, launched_world, wrap_ddp
from diffcli.errors import DataError, InvalidValueError, OutputExistsError
from diffcli.fisher import fisher_diagonal
from diffcli.fixmask import fixmask_phase
from diffcli.methods import get_method
from diffcli.methods.l0 import DensityController, L0Trainer
from diffcli.positions import DEFAULT_MAX_SEQ_LENGTH, seq_length_for
from diffcli.task_types import build_task_model
from diffcli.taskmodel import TaskModel
from diffcli.tasks import padding_id
from diffcli.train_options import FILLS, FIXMASK_STARTS, TrainOptions, option_names
from diffcli.train_state import (STATE_JSON, check_resume_options, check_resume_source, check_resume_world,
                                 data_identity, load_state, own_rng, partial_dir, read_state)
from diffcli.trainloop import Reporter, Run, autocast

# re-exported: the public names the benchmarks and the tests import from here
__all__ = ["DensityController", "Dist", "FILLS", "FIXMASK_STARTS", "L0Trainer", "Reporter", "TaskModel",
           "TrainOptions", "autocast", "build_task_model", "check_device", "fisher_diagonal", "option_names",
           "partial_dir", "train"]


def _check_regression(task: str | None, train_file, validation_file, task_type: str) -> None:
    """--regression names how to read the user's own label column: a GLUE task or another task type has its own."""
    from diffcli import task_types

    if task_type != task_types.DEFAULT:
        raise InvalidValueError(f"--regression applies to --task-type {task_types.DEFAULT}, not {task_type}")
    if task is not None and task.strip().lower() != "custom":
        raise InvalidValueError(f"--regression applies to your own files (no --task): task {task} has its own labels")
    if train_file is None and validation_file is None:
        raise InvalidValueError("--regression applies to --train-file/--validation-file")


def train(*, task: str | None = None, data_dir: str | None = None, train_file: str | None = None,
          validation_file: str | None = None, text_fields: list[str] | None = None, label_field: str | None = None,
          model: str = "minilm", max_train_samples: int | None = None, max_eval_samples: int | None = None,
          output: str | Path, options: TrainOptions | None = None, resume: bool = False, force: bool = False,
          reporter: Reporter | None = None, device: str | None = None, task_type: str | None = None,
          on_epoch_end: Callable[[str, int], None] | None = None, regression: bool = False) -> dict[str, Any]:
    """Run the method's phases and the fixed-mask phase; write the best diff as a checkpoint at `output`; return a summary.

    Resumable: after each epoch the state goes to `<output>.partial/`; `resume=True` continues from it.
    Under torchrun every rank trains; rank 0 alone evaluates and writes. `task_type` (`diffcli.task_types`,
    default sequence-classification) gives the data, the head, the encoding and the metric. `regression` reads a
    custom file's labels as scores even when all are whole numbers.
    """
    import torch

    from diffcli import checkpoint, task_types
    from diffcli.outputs import check_output
    from diffcli.weights import load_config, resolve_model

    opts = options or TrainOptions()
    opts.validate()
    method = get_method(opts.method)
    if opts.fixmask_epochs == 0 and ("epochs" not in method.options or opts.epochs == 0):
        zero = "--epochs 0 and --fixmask-epochs 0" if "epochs" in method.options else "--fixmask-epochs 0"
        raise InvalidValueError(f"--method {opts.method} with {zero} trains nothing: its diff would be empty",
                                hint="give it at least one epoch")
    kind = task_types.get(task_type)
    if regression:
        _check_regression(task, train_file, validation_file, kind.name)
    check_device(device)
    rep = reporter or Reporter()
    output = Path(output)
    check_output(output, force)
    work = partial_dir(output)
    resuming = resume and (work / STATE_JSON).is_file()
    if resume and not resuming:
        rep.warning(f"no interrupted run at {work}; starting from the beginning")
    if not resume and work.exists():
        if not force:
            raise OutputExistsError(f"{work} holds an interrupted run",
                                    hint="pass --resume to continue it, or --force to start over")
    interrupted = read_state(work) if resuming else None  # what cannot resume is refused before anything is built
    if interrupted is not None:
        if opts.max_seq_length is None:  # not given: the length the interrupted run resolved (same model, checked)
            opts = replace(opts, max_seq_length=interrupted["options"].get("max_seq_length"))
        check_resume_options(interrupted["options"], asdict(opts), method.takes)
        check_resume_world(interrupted, launched_world(), work)
    base_dir = resolve_model(model)
    opts = replace(opts, max_seq_length=seq_length_for(load_config(base_dir), opts.max_seq_length, f"model {model}"))
    kind.check(base_dir)  # an architecture that cannot serve the task type: refused before any data is read
    task_data = kind.load(task, data_dir=data_dir, train_file=train_file, validation_file=validation_file,
                          text_fields=text_fields, label_field=label_field,
                          max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
                          **({"labels": []} if regression else {}))  # no label names: a regression
    if task_data.source.get("kind") == "example":
        rep.warning(f"training on {task_data.source['name']}: {task_data.source['why']} "
                    "(pass --data-dir or set GLUE_DIR to train on GLUE)")
    if not task_data.train:
        raise DataError("the training data is empty")
    if not task_data.eval or not any(task_data.eval.values()):
        raise DataError("training needs evaluation data to pick the best checkpoint",
                        hint="pass --validation-file")
    identity = None
    if interrupted is not None:
        identity = data_identity(task_data)
        check_resume_source(interrupted, task_data.spec.name, model, work, identity)

    if launched_world() > 1 and not _group_joined():  # ours to leave: a caller's own group stays theirs
        atexit.register(_leave_group)
    dist, dev = init_dist(device)
    if not dist.main:
        rep = Reporter()
    started = time.monotonic()
    tm = kind.build(base_dir, task_data, opts.seed)
    checkpoint_activations(tm.model, opts.activation_checkpointing)
    check_memory(tm, opts, dev)
    tm.model.to(dev)
    train_set = kind.encode(task_data.train, tm.tokenizer, task_data.spec, opts.max_seq_length,
                            padding_id(tm.model.config))
    run = Run(opts, rep, dist, dev, tm, task_data, train_set, work, model, on_epoch_end, identity)

    pruner = method.setup(run)  # the run's DiffPruner (every method's); sets run.flat and run.sparse
    run.ddp = wrap_ddp(tm.model, dist, dev)
    torch.manual_seed(opts.seed + dist.rank)  # dropout streams
    phase, done, tensors, saved = "select", 0, {}, None
    if resuming:
        tensors, saved = load_state(work)  # its options, world size, task and model were checked above
        tensors = own_rng(tensors, dist.rank)  # each rank's dropout stream, not rank 0's on every rank
        phase, done = saved["phase"], int(saved["epochs_done"])
        run.record = saved["record"]
        if phase in method.phases:
            method.restore(run, pruner, tensors, saved)
        elif phase == "fixmask":
            method.resume_fixed(run, pruner, tensors)
        rep.line(f"resuming {phase} phase after epoch {done}")

    if phase == "select" or phase in method.phases:  # a fresh run, or one stopped in a phase of the method's own
        tensors = method.select(run, pruner, done)
        done, saved = 0, None
    if method.own_fixed_phase:  # select trained its own fixed phase (swr: no sparse mask); the method builds the diff
        make_diff = lambda meta: method.build(run, pruner, tensors, model_ref=model, meta=meta)  # noqa: E731
    else:
        best_tensors = fixmask_phase(run, pruner, tensors, saved, done)  # frees the L0 phase's w, log α, optimisers
        make_diff = lambda meta: pruner.export(best=best_tensors, meta=meta)  # noqa: E731

    summary: dict[str, Any] = {}
    if dist.main:
        diff = make_diff({
            "method": method.meta_name, "method_options": method_options(opts), "task": task_data.spec.name,
            "task_type": kind.name, "hyperparameters": run.opt_dict,
            "data": {"task": task, "train_file": str(train_file) if train_file else None,
                     "validation_file": str(validation_file) if validation_file else None,
                     "max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples,
                     "train_examples": len(task_data.train), "source": task_data.source,
                     **({"text_fields": list(text_fields)} if text_fields else {}),
                     **({"label_field": label_field} if label_field else {})},
            "world_size": dist.world,
            "results": {"after_l0": run.record.get("after_l0"), "projection": run.record.get("projection"),
                        "best": run.record["best"], **({"bases": run.record["bases"]} if "bases" in run.record else {})},
            "history": run.history,
        })
        diff = method.finish(run, tensors, diff)
        checkpoint.save(diff, output, force=force)
        shutil.rmtree(work, ignore_errors=True)
        summary = {
            "output": str(output), "task": task_data.spec.name, "task_type": kind.name, "model": model,
            "data": task_data.source,
            "after_l0": run.record.get("after_l0"), "after_projection": run.record.get("projection"),
            "after_fixmask": run.record["best"], "density": diff.density, "nnz": diff.nnz,
            **({"bases": run.record["bases"]} if "bases" in run.record else {}),
            "budget_numel": diff.budget_numel, "extras_numel": diff.extras_numel,
            "method": opts.method, "method_options": method_options(opts),
            "epochs": {**({method.epochs_phase: opts.epochs} if method.epochs_phase else {}),
                       "fixmask": opts.fixmask_epochs}, "world_size": dist.world,
            "seconds": round(time.monotonic() - started, 1),
        }
    dist.barrier()
    return summary

def _group_joined() -> bool:
    import torch.distributed as td

    return td.is_available() and td.is_initialized()


def _leave_group() -> None:
    """Destroy the process group at exit, while Python still runs: gloo's threads otherwise abort the rank (SIGABRT)."""
    import torch.distributed as td

    if td.is_initialized():
        td.destroy_process_group()


def method_options(opts: TrainOptions) -> dict[str, Any]:
    """The options the run's method takes, by name (recorded in the checkpoint and the summary)."""
    return {name: getattr(opts, name) for name in get_method(opts.method).options}


def check_method_flags(method: str, given: list[str]) -> None:
    """Refuse, before any work, an unknown method or a flag given to a method that does not take it."""
    from diffcli.methods.registry import foreign_message

    m = get_method(method)
    foreign = [n for n in given if n in option_names() and not m.takes(n)]
    if foreign:
        default = "method" not in given  # the user never named it: say which method they got
        raise InvalidValueError(foreign_message(method, foreign),
                                hint=(f"--method {method} is the default; " if default else "")
                                + "drop them, or pick a method that takes them")


def memory_needs(tm: TaskModel, opts: TrainOptions, device, checkpoint_every: int | None = None,
                 methods: list[str] | None = None) -> dict[str, int]:
    """Estimated peak bytes of this run for `methods` (default: every method; `memory_estimate`), by method name;
    `checkpoint_every` overrides the run's activation checkpointing."""
    from diffcli.memory_estimate import estimate
    from diffcli.methods import all_methods
    from diffcli.projection import budget

    params = dict(tm.model.named_parameters())
    k = budget(opts.sparsity, sum(int(params[n].numel()) for n in tm.gated))
    every = opts.activation_checkpointing if checkpoint_every is None else checkpoint_every
    seq_len = opts.max_seq_length if opts.max_seq_length is not None else DEFAULT_MAX_SEQ_LENGTH  # unresolved: API
    kinds = {kind: estimate(tm.model, kind, batch_size=opts.batch_size, seq_len=seq_len,
                            shared=tm.gated, k=k, device=device, checkpoint_every=every).total
             for kind in ("full", "l0", "sparse")}
    chosen = all_methods() if methods is None else {name: get_method(name) for name in methods}
    return {name: kinds[m.memory] for name, m in chosen.items()}


def check_memory(tm: TaskModel, opts: TrainOptions, device) -> None:
    """Stop before training, with one line, when the device cannot hold the run; name the methods that fit."""
    from diffcli.memory_estimate import available_bytes

    free = available_bytes(device)
    if free is None:
        return
    if device.type == "cpu":  # the process (the model included) already holds part of what the estimate counts
        free += _rss()
    need = memory_needs(tm, opts, device, methods=[opts.method])[opts.method]
    if need <= free:
        return
    needs = memory_needs(tm, opts, device)  # which methods would fit (imports every method: the refusal path only)
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    fits = [f"--method {n} needs about {gib(v)}" for v, n in sorted((v, n) for n, v in needs.items() if v <= free)]
    if getattr(tm.model, "supports_gradient_checkpointing", False):  # the least recompute that fits, first
        for every in (2, 1):
            ckpt = memory_needs(tm, opts, device, checkpoint_every=every, methods=[opts.method])[opts.method]
            if opts.activation_checkpointing not in range(1, every + 1) and ckpt <= free:
                fits.insert(0, f"--activation-checkpointing {every} needs about {gib(ckpt)}")
                break
    hint = ", ".join(fits) if fits else "lower --batch-size or --max-seq-length, or use a device with more memory"
    raise InvalidValueError(f"--method {opts.method} needs about {gib(need)} on {device.type} but only {gib(free)} "
                            f"is free", hint=hint)


def _rss() -> int:
    """This process's resident memory in bytes (0 where /proc is absent)."""
    import os

    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
