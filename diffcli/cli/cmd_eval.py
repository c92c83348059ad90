"""`diffprune eval`: metrics of base + diff on dev data (any task type); exit 8 when a --min threshold is missed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcli.cli.output import JsonOpt, Output, QuietOpt


def eval_(
    base: Annotated[str, typer.Argument(help="Base model the diff was made on: folder, alias or hub id.")],
    file: Annotated[Path, typer.Argument(help="A packed .diff file or a diff checkpoint folder.")],
    task: Annotated[Optional[str], typer.Option(
        "--task", "-t", help="GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli) or custom; "
                             "default: the task the diff records.")] = None,
    task_type: Annotated[Optional[str], typer.Option(
        "--task-type", help="sequence-classification, token-classification or causal-lm; "
                            "default: the type the diff records.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", help="GLUE folder (default: $GLUE_DIR, else the hub, else for rte the bundled example set).")] = None,
    validation_file: Annotated[Optional[Path], typer.Option(
        "--validation-file", help="Evaluation data: csv, tsv, json or jsonl; CoNLL for token-classification, "
                                   ".txt (a text per line) for causal-lm.")] = None,
    text_fields: Annotated[Optional[str], typer.Option(
        "--text-fields", help="Text column(s) of --validation-file, comma-separated: sentence1,sentence2.")] = None,
    label_field: Annotated[Optional[str], typer.Option(
        "--label-field", help="Label column of --validation-file.")] = None,
    max_eval_samples: Annotated[Optional[int], typer.Option(
        "--max-eval-samples", help="Score only the first N examples of each split.")] = None,
    max_seq_length: Annotated[Optional[int], typer.Option(
        "--max-seq-length", help="Truncate inputs to this many tokens (default: 128, or the model's positions if fewer).",
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per forward pass.")] = 64,
    minimum: Annotated[Optional[list[str]], typer.Option(
        "--min", help="Fail (exit 8) below METRIC=VALUE (or METRIC>=VALUE), e.g. accuracy=0.9, or above "
                      "loss<=VALUE / perplexity<=VALUE; repeatable.")] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate base + diff in memory (resized embeddings: rebuilt in a temporary folder); gate on --min thresholds."""
    from diffcli.quality_gate import enforce, evaluate_diff, parse_thresholds, render_eval

    out = Output(json_, quiet)
    thresholds = parse_thresholds(minimum)  # bad names fail here, before any loading
    fields = [f.strip() for f in text_fields.split(",") if f.strip()] if text_fields is not None else None
    report = evaluate_diff(base, file, task=task, task_type=task_type, data_dir=data_dir, validation_file=validation_file,
                           text_fields=fields, label_field=label_field, max_eval_samples=max_eval_samples,
                           max_seq_length=max_seq_length, batch_size=batch_size, thresholds=thresholds)
    if report["data"].get("kind") == "example":
        out.warn(f"evaluated on {report['data']['name']}: {report['data']['why']}")
    out.result(report, lambda console: render_eval(console, report))
    enforce(report)
