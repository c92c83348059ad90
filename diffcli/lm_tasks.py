"""Causal language modelling: `text` rows (loss on every token) or `prompt` + `completion` (loss on the completion)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

from diffcli.errors import DataError, InvalidValueError
from diffcli.sequences import IGNORE, SequenceDataset, SequenceSpec, pad_id

if TYPE_CHECKING:
    from diffcli.tasks import TaskData

TASK_TYPE = "causal-lm"
METRICS = ("loss", "perplexity")


class LMExample(NamedTuple):
    """A prompt (no loss; '' for a plain text row) and the target text the loss is taken on."""

    prompt: str
    target: str
    where: str


def _text_rows(path: Path) -> list[LMExample]:
    """A .txt file: every non-empty line is one text example."""
    from diffcli.data_sources import _read_text

    rows = [LMExample("", line.rstrip("\r"), f"{path}:{n}")
            for n, line in enumerate(_read_text(path).split("\n"), 1) if line.strip()]
    if not rows:
        raise DataError(f"{path}: file is empty")
    return rows


def _as_text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: '{field}' must be a string, found {type(value).__name__}")
    return value


def read_lm(path: str | Path) -> list[LMExample]:
    """Examples from a .txt file (one per line) or a table (jsonl, json, csv, tsv) with `text` or prompt+completion."""
    from diffcli.data_sources import _MISSING, read_table

    path = Path(path).expanduser()
    if path.suffix.lower() == ".txt":
        return _text_rows(path)
    table = read_table(path)
    cols = table.columns
    has_text, has_pair = "text" in cols, "prompt" in cols and "completion" in cols
    if not has_text and not has_pair:
        raise DataError(f"{path}: causal-lm data needs a 'text' field or 'prompt' and 'completion' "
                        f"(found: {', '.join(cols) or 'none'})")
    out = []
    for where, values in table.rows:
        row = dict(zip(cols, values))
        prompt, completion = row.get("prompt", _MISSING), row.get("completion", _MISSING)
        if prompt == completion == "" and row.get("text") not in (_MISSING, None, ""):
            prompt = completion = _MISSING  # a csv/tsv row's empty cells: a text row of a mixed table
        if prompt not in (_MISSING, None) or completion not in (_MISSING, None):
            if prompt in (_MISSING, None) or completion in (_MISSING, None):
                raise DataError(f"{where}: a row with a prompt needs a completion, and the other way round")
            prompt, completion = _as_text(prompt, where, "prompt"), _as_text(completion, where, "completion")
            if not completion.strip():
                raise DataError(f"{where}: empty completion (the loss is taken on the completion only)",
                                hint="drop the row or give it a completion")
            out.append(LMExample(prompt, completion, where))
            continue
        text = row.get("text", _MISSING)
        if text in (_MISSING, None):
            raise DataError(f"{where}: no 'text' and no 'prompt'/'completion'")
        text = _as_text(text, where, "text")
        if not text.strip():
            raise DataError(f"{where}: empty text")
        out.append(LMExample("", text, where))
    return out


def load(task: str | None, train_file, validation_file, *, max_train_samples: int | None = None,
         max_eval_samples: int | None = None, need_train: bool = True) -> "TaskData":
    """Read train/validation examples for causal-lm training or evaluation."""
    from diffcli.data_sources import files_source
    from diffcli.tasks import TaskData

    if need_train and train_file is None:
        raise InvalidValueError("causal-lm training needs --train-file (jsonl with text or prompt/completion, "
                                "or a .txt file)")
    if not need_train and validation_file is None:
        raise InvalidValueError("nothing to evaluate: pass --validation-file")
    train = read_lm(train_file)[:max_train_samples] if need_train else None
    evals = {"validation": read_lm(validation_file)[:max_eval_samples]} if validation_file is not None else {}
    return TaskData(SequenceSpec(task or "custom", TASK_TYPE, None, METRICS, "loss"), train, evals,
                    files_source(train_file, validation_file))


def encode(examples: Sequence[LMExample], tokenizer, spec: SequenceSpec | None, max_seq_length: int
           ) -> SequenceDataset:
    """prompt tokens (with the tokenizer's specials) + target tokens + EOS; labels are IGNORE on the prompt.

    The two parts are tokenized separately, so the loss covers exactly the target's tokens. Sequences are cut
    at max_seq_length; an example left with no target token to predict is a DataError.
    """
    if max_seq_length < 8:
        raise InvalidValueError(f"max_seq_length must be at least 8, got {max_seq_length}")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids_out, labels_out = [], []
    if examples:
        prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True,
                            return_attention_mask=False)["input_ids"]
        targets = tokenizer([e.target for e in examples], add_special_tokens=False,
                            return_attention_mask=False)["input_ids"]
        for e, p, t in zip(examples, prompts, targets):
            t = list(t) + ([int(eos)] if eos is not None else [])
            ids = (list(p) + t)[:max_seq_length]
            labels = ([IGNORE] * len(p) + t)[:max_seq_length]
            if all(y == IGNORE for y in labels[1:]):  # position 0 is never predicted
                what = "the prompt fills" if e.prompt else "the text has"
                raise DataError(f"{e.where}: nothing to predict: {what} {len(p)} token(s) of {max_seq_length}",
                                hint="raise --max-seq-length or shorten the prompt")
            ids_out.append(ids)
            labels_out.append(labels)
    return SequenceDataset(ids_out, labels_out, pad_id(tokenizer))


def evaluate(model, tokenizer, examples: Sequence[LMExample], spec: SequenceSpec | None, *, max_seq_length: int,
             batch_size: int) -> dict[str, float]:
    """Mean next-token loss over every target token of the split (token-weighted) and its perplexity, exp(loss)."""
    import torch

    from diffcli.metrics import lm_scores
    from diffcli.prediction import forward_batches

    data = encode(examples, tokenizer, spec, max_seq_length)
    total, count = 0.0, 0
    for _rows, batch, logits in forward_batches(model, data, batch_size):
        labels = batch["labels"]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                                ignore_index=IGNORE, reduction="sum")
        total += float(nll)
        count += int((labels[:, 1:] != IGNORE).sum())
    return lm_scores(total, count)
