"""Where a task's examples come from: csv/tsv/json files, a GLUE folder, the hub, or the bundled example set."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from diffcli import example_data, hub
from diffcli.errors import DataError, DiffpruneError, HubUnavailableError, InvalidValueError, NotFoundError
from diffcli.tasks import (GLUE_TASKS, Example, TaskData, TaskSpec, _label_parser, _norm_name, infer_labels,
                           task_spec)

HUB_DATASET = "nyu-mll/glue"
FILE_FORMATS = ("csv", "tsv", "json", "jsonl")
# Text column pairs tried, in order, when a custom file is given without --text-fields.
_CUSTOM_TEXT_GUESSES = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
                        ("question", "sentence"), ("sentence",), ("text",))


@dataclass(frozen=True)
class _GlueLayout:
    """Where a task lives in the original GLUE folder and which TSV column feeds each spec field.

    A column is a header name, or an index (negative counts from the end) for headerless files.
    """

    folder: str
    columns: dict[str, str | int]
    header: bool = True
    num_columns: int | None = None  # headerless files only
    files: dict[str, str] = field(default_factory=lambda: {"train": "train.tsv", "validation": "dev.tsv"})


_PAIR = {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}
_GLUE_LAYOUTS: dict[str, _GlueLayout] = {
    "cola": _GlueLayout("CoLA", {"sentence": 3, "label": 1}, header=False, num_columns=4),
    "sst2": _GlueLayout("SST-2", {"sentence": "sentence", "label": "label"}),
    "mrpc": _GlueLayout("MRPC", {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}),
    "stsb": _GlueLayout("STS-B", {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}),
    "qqp": _GlueLayout("QQP", {"question1": "question1", "question2": "question2", "label": "is_duplicate"}),
    "mnli": _GlueLayout("MNLI", {"premise": "sentence1", "hypothesis": "sentence2", "label": -1},
                        files={"train": "train.tsv", "validation_matched": "dev_matched.tsv",
                               "validation_mismatched": "dev_mismatched.tsv"}),
    "qnli": _GlueLayout("QNLI", {"question": "question", "sentence": "sentence", "label": "label"}),
    "rte": _GlueLayout("RTE", dict(_PAIR)),
    "wnli": _GlueLayout("WNLI", dict(_PAIR)),
}


# ---------------------------------------------------------------------------------------------- reading tables

_MISSING = object()


@dataclass
class Table:
    """Rows of one file: column names and (location, values) pairs; values align with columns."""

    source: str
    columns: list[str]
    rows: list[tuple[str, Sequence[Any]]]


def _file_format(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    if ext not in FILE_FORMATS:
        raise DataError(f"{path}: unsupported file type '.{ext}'; use one of: {', '.join('.' + f for f in FILE_FORMATS)}")
    return ext


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise NotFoundError(f"data file not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start})") from None


def _read_tsv(path: Path, *, header: bool = True, num_columns: int | None = None) -> Table:
    """Tab-separated, no quoting at all (GLUE sentences contain stray quotes); blank lines skipped."""
    lines = _read_text(path).split("\n")
    rows: list[tuple[str, Sequence[Any]]] = []
    columns: list[str] | None = None if header else [str(i) for i in range(num_columns or 0)]
    seen_any = False
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line:
            continue
        seen_any = True
        values = line.split("\t")
        if columns is None:
            columns = [c.strip() for c in values]
            continue
        if not columns:  # headerless with unknown width: the first row sets it
            columns = [str(i) for i in range(len(values))]
        if len(values) != len(columns):
            raise DataError(f"{path}:{lineno}: expected {len(columns)} tab-separated columns, found {len(values)}",
                            hint="GLUE files are read without quoting; check for stray tabs in this row")
        rows.append((f"{path}:{lineno}", values))
    if not rows:
        raise DataError(f"{path}: no data rows" if seen_any else f"{path}: file is empty")
    return Table(str(path), columns or [], rows)


def _read_csv(path: Path) -> Table:
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    columns: list[str] | None = None
    rows: list[tuple[str, Sequence[Any]]] = []
    try:
        for values in reader:
            if not values or values == [""]:
                continue
            if columns is None:
                columns = [c.strip() for c in values]
                continue
            if len(values) != len(columns):
                raise DataError(f"{path}:{reader.line_num}: expected {len(columns)} comma-separated columns, "
                                f"found {len(values)}")
            rows.append((f"{path}:{reader.line_num}", values))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: no data rows" if columns else f"{path}: file is empty")
    return Table(str(path), columns or [], rows)


def _records_table(source: str, records: list[tuple[str, Any]]) -> Table:
    columns: list[str] = []
    seen: set[str] = set()
    for where, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object per row, found {type(rec).__name__}")
        for key in rec:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    rows = [(where, [rec.get(c, _MISSING) for c in columns]) for where, rec in records]
    return Table(source, columns, rows)


def _read_jsonl(path: Path, text: str | None = None) -> Table:
    text = _read_text(path) if text is None else text
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    if not records:
        raise DataError(f"{path}: file is empty")
    return _records_table(str(path), records)


def _read_json(path: Path) -> Table:
    """A JSON list of row objects, an object holding such a list under "data", or JSON lines."""
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("Extra data"):  # one object per line, as `datasets` writes .json files
            return _read_jsonl(path, text)
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if isinstance(doc, dict):
        return _read_jsonl(path, text)  # a single object: a one-row JSON-lines file
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a list of row objects, found {type(doc).__name__}")
    if not doc:
        raise DataError(f"{path}: no data rows")
    return _records_table(str(path), [(f"{path}: row {i + 1}", rec) for i, rec in enumerate(doc)])


def read_table(path: str | Path) -> Table:
    """Read a csv, tsv, json or jsonl data file into rows, with file:line locations for error messages."""
    path = Path(path).expanduser()
    fmt = _file_format(path)
    if not path.exists():
        raise NotFoundError(f"data file not found: {path}")
    return {"csv": _read_csv, "tsv": _read_tsv, "json": _read_json, "jsonl": _read_jsonl}[fmt](path)


# ---------------------------------------------------------------------------------------------- rows -> examples

def _resolve(table: Table, wanted: str | int, what: str) -> int:
    if isinstance(wanted, int):
        return wanted % len(table.columns)
    try:
        return table.columns.index(wanted)
    except ValueError:
        raise DataError(f"{table.source}: missing {what} column '{wanted}'; columns are: {', '.join(table.columns)}",
                        hint="pass --text-fields/--label-field to name the columns") from None


def _check_columns(table: Table, text_cols: Sequence[str | int], label_col: str | int) -> None:
    missing = [c for c in (*text_cols, label_col) if isinstance(c, str) and c not in table.columns]
    if missing:
        raise DataError(f"{table.source}: missing column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(repr(m) for m in missing)}; columns are: {', '.join(table.columns)}",
                        hint="pass --text-fields/--label-field to name the columns")


def _examples(table: Table, text_cols: Sequence[str | int], label_col: str | int,
              parse: Callable[[Any, str], int | float], limit: int | None) -> list[Example]:
    _check_columns(table, text_cols, label_col)
    t_idx = [_resolve(table, c, "text") for c in text_cols]
    l_idx = _resolve(table, label_col, "label")
    out: list[Example] = []
    rows = table.rows if limit is None else table.rows[:limit]
    for where, values in rows:
        texts = []
        for i in t_idx:
            value = values[i]
            if value is _MISSING or value is None:
                raise DataError(f"{where}: no value for text column '{table.columns[i]}'")
            texts.append(value if isinstance(value, str) else str(value))
        raw = values[l_idx]
        if raw is _MISSING or raw is None:
            raise DataError(f"{where}: no value for label column '{table.columns[l_idx]}'")
        out.append(Example(tuple(texts), parse(raw, where)))
    return out


def _label_values(table: Table, label_col: str) -> list[Any]:
    _check_columns(table, (), label_col)
    idx = table.columns.index(label_col)
    return [values[idx] for _, values in table.rows if values[idx] is not _MISSING]


# ---------------------------------------------------------------------------------------------- sources

def _check_limit(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InvalidValueError(f"{name} must be at least 1, got {value}")


def _find_task_dir(root: Path, spec: TaskSpec) -> Path | None:
    layout = _GLUE_LAYOUTS[spec.name]
    wanted = _norm_name(layout.folder)
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.is_dir() and _norm_name(child.name) == wanted:
                return child
        if _norm_name(root.name) == wanted:  # the task folder itself
            return root
    return None


def _read_glue_tsv(path: Path, layout: _GlueLayout) -> Table:
    return _read_tsv(path, header=layout.header, num_columns=layout.num_columns)


def _fits_layout(table_columns: list[str], layout: _GlueLayout) -> bool:
    return all(isinstance(c, int) or c in table_columns for c in layout.columns.values())


def _load_from_glue_dir(spec: TaskSpec, root: Path, need_train: bool, max_train: int | None,
                        max_eval: int | None, from_env: bool) -> TaskData:
    layout = _GLUE_LAYOUTS[spec.name]
    task_dir = _find_task_dir(root, spec)
    where = "GLUE_DIR" if from_env else "--data-dir"
    if not root.is_dir():
        raise NotFoundError(f"GLUE data folder not found: {root} (from {where})")
    if task_dir is None:
        raise NotFoundError(f"no {layout.folder} folder in {root} (from {where})",
                            hint=f"expected {root}/{layout.folder}/{'/'.join(layout.files.values())}")
    text_cols = [layout.columns[f] for f in spec.text_fields]
    label_col = layout.columns["label"]
    parse = _label_parser(spec)

    def load(split: str, limit: int | None) -> list[Example]:
        path = task_dir / layout.files[split]
        if not path.is_file():
            raise NotFoundError(f"data file not found: {path}")
        return _examples(_read_glue_tsv(path, layout), text_cols, label_col, parse, limit)

    train = load("train", max_train) if need_train else None
    evals = {split: load(split, max_eval) for split in spec.eval_splits}
    return TaskData(spec, train, evals)


def _load_from_hub(spec: TaskSpec, need_train: bool, max_train: int | None, max_eval: int | None,
                   offline: str | None = None) -> TaskData:
    """The task from the hub; with `offline` (why the hub cannot be used), from the local cache only, at once."""
    import datasets

    quiet = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [log.level for log in quiet]
    try:
        for log in quiet:  # their retry warnings would print around our one error line
            log.setLevel(logging.ERROR)
        with hub.datasets_offline() if offline else contextlib.nullcontext():
            ds = datasets.load_dataset(HUB_DATASET, spec.name)
    except DiffpruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, missing, or a hub error: all mean "no data"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        why = f"; {offline}, so only the local cache was looked at" if offline else ""
        raise HubUnavailableError(f"cannot load GLUE task {spec.name} from the hub ({HUB_DATASET}): {first[:200]}{why}",
                                  hint="pass --data-dir with a folder in the GLUE layout (or set GLUE_DIR), "
                                       f"or {_file_options(need_train)}") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    parse = _label_parser(spec)

    def load(split: str, limit: int | None) -> list[Example]:
        part = ds[split]
        if limit is not None and limit < len(part):
            part = part.select(range(limit))
        cols = list(part.column_names)
        data = [part[c] for c in cols]
        table = Table(f"{HUB_DATASET}/{spec.name}/{split}", cols,
                       [(f"{HUB_DATASET}/{spec.name}/{split} row {i}", vals) for i, vals in enumerate(zip(*data))])
        return _examples(table, spec.text_fields, spec.label_field, parse, None)

    train = load("train", max_train) if need_train else None
    return TaskData(spec, train, {split: load(split, max_eval) for split in spec.eval_splits})


def _guess_text_fields(table: Table) -> tuple[str, ...]:
    for guess in _CUSTOM_TEXT_GUESSES:
        if all(c in table.columns for c in guess):
            return guess
    raise DataError(f"{table.source}: cannot tell which columns hold the text; columns are: "
                    f"{', '.join(table.columns)}", hint="pass --text-fields (one or two column names)")


def _peek_header(path: Path) -> list[str]:
    for line in _read_text(path).split("\n"):
        if line.strip("\r"):
            return [c.strip() for c in line.rstrip("\r").split("\t")]
    return []


def _read_for_task(path: str | Path, spec: TaskSpec | None, overridden: bool):
    """Read one explicit file; a named task's original GLUE TSV (e.g. MRPC/train.tsv) is read in its GLUE layout.

    Returns (table, text columns, label column), the columns None when the file uses the spec's own names.
    """
    p = Path(path).expanduser()
    layout = _GLUE_LAYOUTS.get(spec.name) if spec is not None else None
    if layout is not None and not overridden and _file_format(p) == "tsv" and p.is_file():
        head = _peek_header(p)
        if head and not all(c in head for c in (*spec.text_fields, spec.label_field)):
            if (layout.header and _fits_layout(head, layout)) or (not layout.header and len(head) == layout.num_columns):
                return (_read_glue_tsv(p, layout), [layout.columns[f] for f in spec.text_fields],
                        layout.columns["label"])
    return read_table(p), None, None


def _load_from_files(spec: TaskSpec | None, train_file, validation_file, text_fields, label_field, labels,
                     need_train: bool, max_train: int | None, max_eval: int | None) -> TaskData:
    if need_train and train_file is None:
        raise InvalidValueError("training needs --train-file (--validation-file alone only evaluates)")
    if not need_train and validation_file is None:
        raise InvalidValueError("nothing to evaluate: pass --validation-file")
    if text_fields is not None:
        text_fields = tuple(text_fields)
        if not 1 <= len(text_fields) <= 2:
            raise DataError(f"--text-fields takes one or two column names, got {len(text_fields)}: "
                            f"{', '.join(text_fields) or '(none)'}")
        if spec is not None and len(text_fields) != len(spec.text_fields):
            raise DataError(f"task {spec.name} takes {len(spec.text_fields)} text field"
                            f"{'s' if len(spec.text_fields) > 1 else ''} ({', '.join(spec.text_fields)}), "
                            f"got {len(text_fields)}: {', '.join(text_fields)}")
    overridden = text_fields is not None or label_field is not None
    train_read = _read_for_task(train_file, spec, overridden) if train_file is not None else None
    val_read = _read_for_task(validation_file, spec, overridden) if validation_file is not None else None
    first = (train_read or val_read)[0]

    label_field = label_field or (spec.label_field if spec is not None else "label")
    if text_fields is None:
        text_fields = spec.text_fields if spec is not None else _guess_text_fields(first)
    if spec is None:
        if labels is not None:
            label_names: tuple[str, ...] | None = tuple(str(x) for x in labels) or None
        else:
            label_names = infer_labels(_label_values(first, label_field))
        metrics = ("pearson", "spearmanr") if label_names is None else ("accuracy",)
        spec = TaskSpec("custom", text_fields, label_field, label_names, metrics,
                        "combined_score" if label_names is None else "accuracy")
    else:
        spec = replace(spec, text_fields=text_fields, label_field=label_field)
    parse = _label_parser(spec)

    def examples(read, limit):
        table, t_cols, l_col = read
        return _examples(table, t_cols or text_fields, l_col if l_col is not None else label_field,
                         parse, limit)

    train = examples(train_read, max_train) if need_train else None
    evals = {"validation": examples(val_read, max_eval)} if val_read is not None else {}
    return TaskData(spec, train, evals, files_source(train_file, validation_file))


def files_source(*paths) -> dict[str, str]:
    """Where a task's data came from when it was read from the user's own files."""
    files = [str(f) for f in paths if f is not None]
    return {"kind": "files", "path": ", ".join(files), "name": "files " + ", ".join(files)}


def _file_options(need_train: bool) -> str:
    """The file options of the command asking: train reads both files, eval only a validation file."""
    return "--train-file/--validation-file" if need_train else "--validation-file"


def load_task(task: str | None = None, *, data_dir: str | Path | None = None,
              train_file: str | Path | None = None, validation_file: str | Path | None = None,
              text_fields: Sequence[str] | None = None, label_field: str | None = None,
              max_train_samples: int | None = None, max_eval_samples: int | None = None,
              need_train: bool = True, labels: Sequence[str] | None = None) -> TaskData:
    """Load a task's examples from explicit files, else a GLUE folder (data_dir or $GLUE_DIR), else the hub (only its
    local cache when the hub is off or unreachable: `hub.unavailable`), else (RTE only) the example set bundled with
    diffprune; `TaskData.source` says which.

    With explicit files and no GLUE task, the task is "custom": labels are the sorted distinct train labels
    (or `labels`, e.g. a model's id2label, when given), and a numeric label column with non-integer values
    makes it a regression. max_*_samples keep the first N rows of each split. With only a train file the
    returned `eval` is empty.
    """
    _check_limit("max_train_samples", max_train_samples)
    _check_limit("max_eval_samples", max_eval_samples)
    spec = None if task is None or _norm_name(task) == "custom" else task_spec(task)
    files = _file_options(need_train)
    if train_file is not None or validation_file is not None:
        if data_dir is not None:  # one source: a GLUE folder that would go unread is refused, not ignored
            raise InvalidValueError(f"--data-dir reads a GLUE folder and {files} read"
                                    f"{'' if need_train else 's'} your files: give one or the other")
        return _load_from_files(spec, train_file, validation_file, text_fields, label_field, labels,
                                need_train, max_train_samples, max_eval_samples)
    if spec is None:
        raise InvalidValueError(f"no data: name a GLUE task or pass {files}",
                                hint=f"GLUE tasks: {', '.join(GLUE_TASKS)}")
    if text_fields is not None or label_field is not None:
        raise InvalidValueError(f"--text-fields/--label-field apply only to {files}")
    root = data_dir if data_dir is not None else os.environ.get("GLUE_DIR") or None
    if root is not None:  # an explicit folder never falls back: missing is exit 3
        data = _load_from_glue_dir(spec, Path(root).expanduser(), need_train, max_train_samples,
                                   max_eval_samples, from_env=data_dir is None)
        data.source = {"kind": "glue-dir", "path": str(root), "name": f"GLUE folder {root}"
                       + (" (from GLUE_DIR)" if data_dir is None else "")}
        return data
    offline = hub.unavailable(datasets=True)  # off or unreachable: the local cache at once, not the hub's retries
    logging.getLogger(__name__).info("no --data-dir or GLUE_DIR: loading %s from %s (%s)", spec.name,
                                     "the local hub cache" if offline else "the hub", offline or HUB_DATASET)
    try:
        data = _load_from_hub(spec, need_train, max_train_samples, max_eval_samples, offline)
    except HubUnavailableError as exc:
        if not example_data.covers(spec.name):
            raise
        data = _load_from_glue_dir(spec, example_data.ROOT, need_train, max_train_samples, max_eval_samples,
                                   from_env=False)
        data.source = example_data.source(f"no --data-dir or GLUE_DIR, and {exc}")
        return data
    where = f"{HUB_DATASET}/{spec.name}"
    data.source = {"kind": "hub", "path": where,
                   "name": f"the local hub cache ({where}; {offline})" if offline else f"the hub ({where})"}
    return data


__all__ = ["load_task", "read_table", "files_source", "Table", "HUB_DATASET", "FILE_FORMATS"]
