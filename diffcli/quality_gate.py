"""`diffprune eval`: score base + diff on a task's dev data in memory and check --min thresholds (a CI gate)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from diffcli.errors import InvalidValueError, ThresholdNotMetError
from diffcli.metrics import COMBINED, LOWER_IS_BETTER, METRIC_NAMES

KNOWN_METRICS = (*METRIC_NAMES, COMBINED)
_THRESHOLD = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|=)\s*(.*?)\s*")


def bound_op(metric: str) -> str:
    """'<=' for a metric that must stay at most its bound (loss, perplexity), '>=' for a score."""
    return "<=" if metric in LOWER_IS_BETTER else ">="


def parse_thresholds(items: Sequence[str] | None) -> dict[str, float]:
    """['accuracy=0.9', 'f1>=0.85', 'perplexity<=12'] → {metric: bound}; bad names or directions fail before any work.

    A score's bound is a minimum (METRIC=VALUE or METRIC>=VALUE, a fraction); loss and perplexity are lower
    is better, so theirs is a maximum and must be written METRIC<=VALUE.
    """
    out: dict[str, float] = {}
    for item in items or ():
        m = _THRESHOLD.fullmatch(str(item))
        if not m or not m.group(3):
            raise InvalidValueError(f"threshold {item!r} is not METRIC=VALUE, e.g. accuracy=0.9 (or perplexity<=12)")
        name, op, raw = m.group(1).lower(), m.group(2), m.group(3)
        if name not in KNOWN_METRICS:
            raise InvalidValueError(f"unknown metric {name!r} in --min {item}; known: {', '.join(KNOWN_METRICS)}")
        want = bound_op(name)
        if (op == "<=") != (want == "<="):
            better = "lower" if want == "<=" else "higher"
            raise InvalidValueError(f"{name} is {better} is better: --min {item} bounds it the wrong way",
                                    hint=f"write --min '{name}{want}{raw}'")
        try:
            value = float(raw[:-1]) / 100 if raw.endswith("%") and want == ">=" else float(raw)
        except ValueError:
            raise InvalidValueError(f"threshold value {raw!r} for {name} is not a number") from None
        if not math.isfinite(value):
            raise InvalidValueError(f"threshold {name}{want}{raw} is not a finite number")
        if want == "<=":
            if value < (1 if name == "perplexity" else 0):
                raise InvalidValueError(f"threshold {name}<={raw} can never be met ({name} is at least "
                                        f"{1 if name == 'perplexity' else 0})")
        elif not -1 <= value <= 1:
            hint = f"did you mean {value / 100:g}?" if 1 < value <= 100 and not raw.endswith("%") else None
            raise InvalidValueError(f"threshold {name}={raw} is outside [-1, 1]; metrics are fractions", hint=hint)
        if name in out:
            raise InvalidValueError(f"--min {name} given twice")
        out[name] = value
    return out


def missed(metric: str, value: float, bound: float) -> bool:
    """Whether `value` misses the threshold `bound` of `metric` (above it for a loss, below it for a score); a NaN
    or infinite value meets no bound (a diverged model must not pass the gate)."""
    if not math.isfinite(value):
        return True
    return value > bound if bound_op(metric) == "<=" else value < bound


def _task_from_meta(meta: Mapping[str, Any]) -> str | None:
    task = meta.get("task")
    if isinstance(task, dict):
        task = task.get("name")
    return str(task) if task else None


def _label_names(config: Mapping[str, Any]) -> list[str] | None:
    """The head's labels in class-id order, for custom tasks (so file labels map to the right logits)."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return None


def _recorded_columns(meta, text_fields, label_field):
    """--text-fields and --label-field as given, else as the diff's training recorded them (`meta.data`)."""
    data = (meta or {}).get("data") if isinstance(meta, dict) else None
    data = data if isinstance(data, dict) else {}
    fields = data.get("text_fields")
    if text_fields is None and isinstance(fields, list) and fields and all(isinstance(f, str) for f in fields):
        text_fields = fields
    if label_field is None and isinstance(data.get("label_field"), str):
        label_field = data["label_field"]
    return text_fields, label_field


def evaluate_diff(base: str, diff_path: str | Path, *, task: str | None = None, task_type: str | None = None,
                  data_dir: str | Path | None = None, validation_file: str | Path | None = None,
                  text_fields: Sequence[str] | None = None, label_field: str | None = None,
                  max_eval_samples: int | None = None, max_seq_length: int | None = None, batch_size: int = 64,
                  thresholds: Mapping[str, float] | None = None, device: str | None = None) -> dict[str, Any]:
    """Metrics of base + diff on the task's evaluation splits, and which --min thresholds failed.

    The task model is built in memory (`DiffBank`: base weights + `applying.apply_`), never written,
    on cuda when present; a diff that resizes encoder tensors, which a bank cannot share, is evaluated on the model
    `apply` writes to a temporary folder (removed after). `task` defaults to the task recorded in the diff's metadata, `task_type` to the
    type it records (or its config's architecture); token classification takes its tags from the diff's head.
    A diff with basis records also reports `basis_probe_error`, the largest relative probe error of its rebuild.
    `max_seq_length` defaults to 128 (the model's positions where fewer); more than the model takes is refused.
    """
    from diffcli.positions import seq_length_for
    from diffcli.sources import load_diff
    from diffcli.task_types import DEFAULT, of_diff

    for flag, value, least in (("--batch-size", batch_size, 1), ("--max-eval-samples", max_eval_samples, 1),
                               ("--max-seq-length", max_seq_length, 8)):
        if value is not None and value < least:  # the flags' names, before the data or the model is read
            raise InvalidValueError(f"{flag} must be at least {least}, got {value}")
    thresholds = dict(thresholds or {})
    unknown = [m for m in thresholds if m not in KNOWN_METRICS]
    if unknown:
        raise InvalidValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(KNOWN_METRICS)}")
    diff = load_diff(diff_path)
    max_seq_length = seq_length_for(diff.config or {}, max_seq_length, f"the model of {diff_path}")
    kind = of_diff(diff.config, diff.meta, task_type)
    task = task or _task_from_meta(diff.meta)
    if kind.name == DEFAULT:
        if task is None and validation_file is None:
            raise InvalidValueError(f"{diff_path} records no task; pass --task (or --validation-file)")
        custom = task is None or task.lower() == "custom"
        labels = _label_names(diff.config) if custom else None
        if (diff.config or {}).get("problem_type") == "regression" or (labels is not None and len(labels) == 1):
            # a regression head: its one-entry id2label (LABEL_0) is transformers' filler, not a class; no labels
            # ([]) keeps a custom dev file a regression even where its scores are whole numbers
            labels = [] if custom else None
        if validation_file is not None:  # the columns a custom run was trained on, unless named here
            text_fields, label_field = _recorded_columns(diff.meta, text_fields, label_field)
    else:
        labels = _label_names(diff.config)
        if labels is None and kind.name == "token-classification":
            raise InvalidValueError(f"{diff_path}: its config has no id2label, so its tags are unknown")
    data = kind.load(task, data_dir=data_dir, validation_file=validation_file, text_fields=text_fields,
                     label_field=label_field, max_eval_samples=max_eval_samples, need_train=False, labels=labels)
    spec = data.spec
    reported = (*spec.metrics, COMBINED) if kind.name == DEFAULT and len(spec.metrics) > 1 else spec.metrics
    for name in thresholds:
        if name not in reported:
            raise InvalidValueError(f"task {spec.name} reports {', '.join(reported)}; it has no {name} to check")
    from diffcli.bank import DiffBank, SharedEncoderError, task_config

    if kind.name == DEFAULT:
        head = task_config(diff).num_labels  # config.json omits the default (2 labels)
        if head != spec.num_labels:
            raise InvalidValueError(f"the diff's head predicts {head} label{'s' if head != 1 else ''} but task "
                                    f"{spec.name} has {spec.num_labels}", hint="pass the --task the diff was trained on")
    if not data.eval:
        raise InvalidValueError("no evaluation data", hint="pass --validation-file")

    from diffcli.evaluation import evaluate
    from diffcli.prediction import pick_device

    bank = DiffBank(base, device=device if device is not None else pick_device())
    tokenizer = kind.tokenizer(bank.folder)
    try:
        bank.add(spec.name, diff, task_type=kind.name, source=str(diff_path))
        shared = True
    except SharedEncoderError:  # resized embeddings: evaluated on the model `apply` rebuilds, as its users load it
        shared = False  # evaluated after this block: the exception's frames hold the bank while it is live
    if shared:
        with bank.use(spec.name) as model:
            results = evaluate(model, tokenizer, data, max_seq_length=max_seq_length, batch_size=batch_size)
        probe_error = bank.basis_probe_error(spec.name)
    else:
        folder, dev = bank.folder, bank.device
        del bank  # one model in memory at a time
        import gc

        gc.collect()
        results, probe_error = _evaluate_applied(folder, diff, kind, data, tokenizer, dev, max_seq_length, batch_size)
    checks = [{"split": split, "metric": m, "op": bound_op(m), "bound": t, "value": float(values[m]),
               "passed": not missed(m, float(values[m]), t)}
              for split, values in results.items() for m, t in thresholds.items()]
    # failures: the checks that missed; "min" repeats "bound" for scripts written before "bound" (it held maxima too)
    failures = [{k: c[k] for k in ("split", "metric", "value", "op", "bound")} | {"min": c["bound"]}
                for c in checks if not c["passed"]]
    report = {"base": str(base), "diff": str(diff_path), "task": spec.name, "task_type": kind.name,
              "data": data.source, "examples": {split: len(ex) for split, ex in data.eval.items()}, "metrics": results,
              "thresholds": thresholds, "checks": checks, "failures": failures, "passed": not failures}
    if probe_error is not None:  # basis records: the rebuild's reconstruction error (docs/FORMAT.md §11)
        report["basis_probe_error"] = probe_error
    return report


def _evaluate_applied(folder, diff, kind, data, tokenizer, device, max_seq_length: int, batch_size: int):
    """Metrics of the model `apply` writes (in a temporary folder), and its basis probe error: for a diff that
    resizes encoder tensors, which a bank's shared encoder cannot take."""
    import tempfile

    from diffcli.applying import apply_to_folder
    from diffcli.bank import quiet_load
    from diffcli.evaluation import evaluate

    with tempfile.TemporaryDirectory(prefix="diffprune-eval-") as tmp:
        report = apply_to_folder(folder, diff, Path(tmp) / "model")
        model = quiet_load(kind.model_class(), report.out).to(device).eval()
        results = evaluate(model, tokenizer, data, max_seq_length=max_seq_length, batch_size=batch_size)
    return results, report.basis_probe_error


def enforce(report: Mapping[str, Any]) -> None:
    """Raise ThresholdNotMetError (exit 8) naming every missed threshold of an `evaluate_diff` report."""
    fails = report["failures"]
    if fails:
        parts = [(f"{f['metric']} {f['value']:.4f} {'>' if f['op'] == '<=' else '<'} {f['bound']:g}"
                  if math.isfinite(f["value"]) else f"{f['metric']} is {f['value']}, which meets no bound")
                 + (f" ({f['split']})" if len(report["metrics"]) > 1 else "") for f in fails]
        raise ThresholdNotMetError(f"quality gate failed for {report['task']}: {'; '.join(parts)}")


def render_eval(console, report: Mapping[str, Any]) -> None:
    """Human rendering: one line per split with its metrics, and the gate's verdict."""
    n = ", ".join(f"{split} {count:,}" for split, count in report["examples"].items())
    console.print(f"{report['task']} ({n} examples; data: {report['data'].get('name', '-')})", markup=False)
    for split, values in report["metrics"].items():
        shown = "  ".join(f"{m}={v:.4f}" for m, v in values.items())
        console.print(f"  {split}: {shown}", markup=False)
    if report.get("basis_probe_error") is not None:
        console.print(f"basis records rebuilt from the base's SVD; largest relative probe error "
                      f"{report['basis_probe_error']:.2g}", markup=False)
    if report["thresholds"]:
        wanted = ", ".join(f"{m}{bound_op(m)}{t:g}" for m, t in report["thresholds"].items())
        console.print(f"gate {'passed' if report['passed'] else 'FAILED'} ({wanted})", markup=False)
