"""Token classification (NER-style tagging): jsonl or CoNLL data, first-sub-token labels, seqeval scores."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

from diffcli.errors import DataError, InvalidValueError
from diffcli.sequences import IGNORE, SequenceDataset, SequenceSpec, pad_id

if TYPE_CHECKING:
    from diffcli.tasks import TaskData

TASK_TYPE = "token-classification"
METRICS = ("precision", "recall", "f1", "accuracy")
_JSON_SUFFIXES = (".json", ".jsonl")


class TaggedSentence(NamedTuple):
    """One sentence: its words, one tag per word, and where it was read (for error messages)."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    where: str


def _sentence(tokens, tags, where: str) -> TaggedSentence:
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise DataError(f"{where}: 'tokens' must be a list of strings")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        number = isinstance(tags, list) and any(isinstance(t, (int, float)) for t in tags)
        raise DataError(f"{where}: 'tags' must be a list of tag names"
                        + (" (strings such as B-PER, I-PER, O), not tag ids: an id does not say whether a tag "
                           "begins or continues an entity, so entity F1 would be 0" if number else ""))
    if not tokens:
        raise DataError(f"{where}: a sentence with no tokens")
    if len(tokens) != len(tags):
        raise DataError(f"{where}: {len(tokens)} tokens but {len(tags)} tags (one tag per token)")
    return TaggedSentence(tuple(tokens), tuple(tags), where)


def _read_json_rows(path: Path) -> list[TaggedSentence]:
    from diffcli.data_sources import read_table

    table = read_table(path)
    missing = [c for c in ("tokens", "tags") if c not in table.columns]
    if missing:
        raise DataError(f"{path}: no '{missing[0]}' field; token classification reads 'tokens' and 'tags' "
                        f"(found: {', '.join(table.columns) or 'none'})",
                        hint="write one JSON object per sentence: {\"tokens\": [...], \"tags\": [...]}")
    ti, gi = table.columns.index("tokens"), table.columns.index("tags")
    return [_sentence(values[ti], values[gi], where) for where, values in table.rows]


def _read_conll(path: Path) -> list[TaggedSentence]:
    """Token ... tag per line (whitespace-separated, first and last column), a blank line between sentences."""
    from diffcli.data_sources import _read_text

    out: list[TaggedSentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 1
    for lineno, line in enumerate(_read_text(path).split("\n") + [""], 1):
        parts = line.split()
        if parts and parts[0] == "-DOCSTART-":
            continue
        if not parts:
            if tokens:
                out.append(TaggedSentence(tuple(tokens), tuple(tags), f"{path}:{start}"))
            tokens, tags = [], []
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{lineno}: expected 'token tag' (whitespace-separated), found {line.strip()!r}",
                            hint="CoNLL files put a token and its tag on each line, a blank line between sentences")
        if not tokens:
            start = lineno
        tokens.append(parts[0])
        tags.append(parts[-1])
    if not out:
        raise DataError(f"{path}: no tagged sentences")
    return out


def read_tagged(path: str | Path) -> list[TaggedSentence]:
    """Sentences from a .json/.jsonl file (fields 'tokens' and 'tags'), or from any other file in CoNLL style."""
    path = Path(path).expanduser()
    return _read_json_rows(path) if path.suffix.lower() in _JSON_SUFFIXES else _read_conll(path)


def label_set(sentences: Sequence[TaggedSentence]) -> tuple[str, ...]:
    """The tags of the training data: 'O' first when present, the rest sorted (stable ids for a given data set)."""
    tags = {t for s in sentences for t in s.tags}
    return (("O",) if "O" in tags else ()) + tuple(sorted(tags - {"O"}))


def check_tags(sentences: Sequence[TaggedSentence], labels: Sequence[str], what: str) -> None:
    """Every tag must be in the label set (DataError at the first one that is not)."""
    known = set(labels)
    for s in sentences:
        for tag in s.tags:
            if tag not in known:
                raise DataError(f"{s.where}: tag {tag!r} is not in the label set of {what} "
                                f"({', '.join(labels)})",
                                hint="every tag must occur in the training data; fix the tag or add training "
                                     "sentences that use it")


def load(task: str | None, train_file, validation_file, *, labels: Sequence[str] | None = None,
         max_train_samples: int | None = None, max_eval_samples: int | None = None,
         need_train: bool = True) -> "TaskData":
    """Read train/validation sentences; the label set comes from train (or `labels`, e.g. a model's id2label)."""
    from diffcli.data_sources import files_source
    from diffcli.tasks import TaskData

    if need_train and train_file is None:
        raise InvalidValueError("token classification needs --train-file (jsonl with tokens/tags, or CoNLL)")
    if not need_train and validation_file is None:
        raise InvalidValueError("nothing to evaluate: pass --validation-file")
    train = read_tagged(train_file)[:max_train_samples] if need_train else None
    evals = {"validation": read_tagged(validation_file)[:max_eval_samples]} if validation_file is not None else {}
    if labels is not None:
        names, what = tuple(str(x) for x in labels), "the model's head"
    else:
        names, what = label_set(train or []), "the training data"
    if not names:
        raise DataError("no tags: the label set is empty", hint="pass --train-file with tagged sentences")
    for part in ([train] if train else []) + list(evals.values()):
        check_tags(part, names, what)
    spec = SequenceSpec(task or "custom", TASK_TYPE, names, METRICS, "f1")
    return TaskData(spec, train, evals, files_source(train_file, validation_file))


class TaggedDataset(SequenceDataset):
    """Encoded sentences; `words[i]` lists (token position, word number) of each word's first sub-token."""

    def __init__(self, input_ids, labels, words, pad_token_id: int):
        super().__init__(input_ids, labels, pad_token_id)
        self.words = words


def encode(sentences: Sequence[TaggedSentence], tokenizer, spec: SequenceSpec, max_seq_length: int) -> TaggedDataset:
    """Tokenize pre-split words; a word's tag labels its first sub-token, the others and specials get IGNORE."""
    if max_seq_length < 8:
        raise InvalidValueError(f"max_seq_length must be at least 8, got {max_seq_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidValueError("token classification needs a fast tokenizer (for word ids); this model's is slow",
                                hint="use a model folder with a tokenizer.json")
    ids = {t: i for i, t in enumerate(spec.labels or ())}
    all_ids, all_labels, all_words = [], [], []
    if sentences:
        enc = tokenizer([list(s.tokens) for s in sentences], is_split_into_words=True, truncation=True,
                        max_length=max_seq_length, return_attention_mask=False)
        for i, s in enumerate(sentences):
            labels, words, prev = [], [], None
            for pos, w in enumerate(enc.word_ids(i)):
                if w is None or w == prev:
                    labels.append(IGNORE)
                else:
                    labels.append(ids[s.tags[w]])
                    words.append((pos, w))
                prev = w if w is not None else prev
            all_ids.append(enc["input_ids"][i])
            all_labels.append(labels)
            all_words.append(words)
    return TaggedDataset(all_ids, all_labels, all_words, pad_id(tokenizer))


def evaluate(model, tokenizer, sentences: Sequence[TaggedSentence], spec: SequenceSpec, *, max_seq_length: int,
             batch_size: int) -> dict[str, float]:
    """Entity-level precision/recall/F1 (seqeval) and token accuracy; words cut by truncation count as 'O'."""
    from diffcli.metrics import token_scores
    from diffcli.prediction import forward_batches

    data = encode(sentences, tokenizer, spec, max_seq_length)
    names = spec.labels or ()
    predicted = [["O"] * len(s.tokens) for s in sentences]
    for rows, _batch, logits in forward_batches(model, data, batch_size):
        if logits.shape[-1] != len(names):
            raise InvalidValueError(f"the model predicts {logits.shape[-1]} tags; the task has {len(names)}")
        best = logits.argmax(-1).cpu().tolist()
        for r, i in enumerate(rows):
            for pos, w in data.words[i]:
                predicted[i][w] = names[best[r][pos]]
    return token_scores([list(s.tags) for s in sentences], predicted)
