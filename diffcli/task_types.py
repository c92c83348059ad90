"""The task types a diff can be trained and evaluated for: each gives its data loader, encoder, model class
(heads, label maps in the config), metric and main score, so training, `eval` and the bank share one registry.

    kind = task_types.get("token-classification")
    data = kind.load("ner", train_file="train.conll", validation_file="dev.conll")
    tm = kind.build(base_dir, data, seed=42)           # TaskModel: model, tokenizer, gated/head split
    train_set = kind.encode(data.train, tm.tokenizer, data.spec, 128)   # torch Dataset with .collate
    loss = tm.model(**train_set.collate([train_set[0]])).loss          # transformers' loss (IGNORE = -100)
    scores = kind.evaluate(tm.model, tm.tokenizer, data.eval["validation"], data.spec, max_seq_length=128,
                           batch_size=64)
    rank = kind.score(data.spec, scores)                # higher is better (a loss is negated)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from diffcli.errors import InvalidValueError
from diffcli.taskmodel import TaskModel

if TYPE_CHECKING:
    from diffcli.tasks import TaskData

DEFAULT = "sequence-classification"


class TaskType:
    """One task type; subclasses fill in the data, the head and the metric."""

    name: str = ""
    auto_class: str = ""       # transformers AutoModelFor... class
    mapping: str = ""          # its model-type table in transformers.models.auto.modeling_auto
    metrics: tuple[str, ...] = ()

    # ------------------------------------------------------------------ data
    def load(self, task: str | None = None, **kw) -> "TaskData":
        raise NotImplementedError

    def encode(self, examples: Sequence, tokenizer, spec, max_seq_length: int, pad_token_id: int | None = None):
        """A torch-style Dataset of dicts of 1-D tensors (with `labels`), with `.collate` and `.lengths`; rows are
        padded with `pad_token_id` (the model config's, `tasks.padding_id`) where a head reads it."""
        raise NotImplementedError

    def evaluate(self, model, tokenizer, examples: Sequence, spec, *, max_seq_length: int = 128,
                 batch_size: int = 64) -> dict[str, float]:
        raise NotImplementedError

    def score(self, spec, metrics: Mapping[str, float]) -> float:
        """The number that ranks checkpoints; higher is better."""
        from diffcli.metrics import main_score

        return main_score(spec, metrics)

    # ------------------------------------------------------------------ model
    def model_kwargs(self, spec, tokenizer, config) -> dict[str, Any]:
        """Config overrides for from_pretrained: the head's size and the label maps the diff will carry."""
        return {}

    def check_model(self, config) -> None:
        """InvalidValueError when transformers has no model of this type for the config's architecture."""
        from transformers.models.auto import modeling_auto

        model_type = getattr(config, "model_type", None)
        if model_type not in getattr(modeling_auto, self.mapping):
            raise InvalidValueError(f"model type {model_type!r} has no {self.auto_class} in transformers: it cannot "
                                    f"serve --task-type {self.name}",
                                    hint=f"use a model whose architecture supports {self.name}")

    def check(self, base_dir: str | Path) -> None:
        """check_model on a base folder's config alone: the trainer's first-second refusal, before any data."""
        from transformers import AutoConfig

        self.check_model(AutoConfig.from_pretrained(str(base_dir)))

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def tokenizer(self, base_dir: Path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(base_dir))

    def build(self, base_dir: str | Path, data: "TaskData | Any", seed: int) -> TaskModel:
        """The task model on the base (new heads seeded by `seed`), its tokenizer, and its gated/head split.

        `data` is the loaded TaskData (or its spec): it gives the label set. Raises InvalidValueError when
        the base's architecture cannot serve this task type, before any weight is loaded.
        """
        import torch
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging

        base_dir = Path(base_dir)
        spec = getattr(data, "spec", data)
        config = AutoConfig.from_pretrained(str(base_dir))
        self.check_model(config)
        tokenizer = self.tokenizer(base_dir)
        hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected here
        hf_logging.disable_progress_bar()
        torch.manual_seed(seed)
        model = self.model_class().from_pretrained(str(base_dir), dtype=torch.float32,
                                                   **self.model_kwargs(spec, tokenizer, config))
        from diffcli.taskmodel import attach_base

        return attach_base(model, base_dir, tokenizer)


class SequenceClassification(TaskType):
    """One label (or a score) per text or text pair: GLUE and custom files (diffcli.data_sources)."""

    name = DEFAULT
    auto_class = "AutoModelForSequenceClassification"
    mapping = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"

    def load(self, task: str | None = None, **kw) -> "TaskData":
        from diffcli.data_sources import load_task

        return load_task(task, **kw)

    def encode(self, examples, tokenizer, spec, max_seq_length: int, pad_token_id: int | None = None):
        from diffcli.tasks import encode

        return encode(examples, tokenizer, max_seq_length, pad_token_id)

    def evaluate(self, model, tokenizer, examples, spec, *, max_seq_length: int = 128,
                 batch_size: int = 64) -> dict[str, float]:
        from diffcli import metrics
        from diffcli.prediction import predict

        logits, labels = predict(model, tokenizer, examples, max_seq_length=max_seq_length, batch_size=batch_size)
        return metrics.compute(spec, logits, labels)

    def model_kwargs(self, spec, tokenizer, config) -> dict[str, Any]:
        kw: dict[str, Any] = {"num_labels": spec.num_labels}
        if spec.is_regression:
            kw["problem_type"] = "regression"
        else:
            kw["problem_type"] = "single_label_classification"
            kw["id2label"] = {i: str(n) for i, n in enumerate(spec.labels)}
            kw["label2id"] = {str(n): i for i, n in enumerate(spec.labels)}
        from diffcli.tasks import padding_id

        if padding_id(config) is None and (getattr(tokenizer, "pad_token_id", None) is not None
                                           or getattr(tokenizer, "eos_token_id", None) is not None):
            from diffcli.sequences import pad_id

            # decoders (GPT-2) pool at each row's last token that is not this id: the one rows are padded with
            kw["pad_token_id"] = pad_id(tokenizer)
        return kw


class _FileTaskType(TaskType):
    """A task type read from --train-file/--validation-file, whose data, encoding and scoring live in `module`."""

    module = ""

    def _impl(self):
        import importlib

        return importlib.import_module(self.module)

    def load(self, task: str | None = None, **kw) -> "TaskData":
        from diffcli.data_sources import _check_limit, _file_options

        for key in ("data_dir", "text_fields", "label_field"):  # GLUE-layout options: refused, not ignored
            if kw.pop(key, None) is not None:
                raise InvalidValueError(f"--{key.replace('_', '-')} applies only to --task-type {DEFAULT}; "
                                        f"{self.name} reads {_file_options(kw.get('need_train', True))}")

        for key in ("max_train_samples", "max_eval_samples"):
            _check_limit(key, kw.get(key))
        return self._impl().load(task, kw.pop("train_file", None), kw.pop("validation_file", None), **kw)

    def encode(self, examples, tokenizer, spec, max_seq_length: int, pad_token_id: int | None = None):
        """Per-token tasks pad with the tokenizer's id: no head reads it (attention_mask and IGNORE labels mask it)."""
        return self._impl().encode(examples, tokenizer, spec, max_seq_length)

    def evaluate(self, model, tokenizer, examples, spec, *, max_seq_length: int = 128,
                 batch_size: int = 64) -> dict[str, float]:
        return self._impl().evaluate(model, tokenizer, examples, spec, max_seq_length=max_seq_length,
                                     batch_size=batch_size)


class TokenClassification(_FileTaskType):
    """One tag per word (NER, POS): see diffcli.token_tasks."""

    name = "token-classification"
    auto_class = "AutoModelForTokenClassification"
    mapping = "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"
    module = "diffcli.token_tasks"

    def model_kwargs(self, spec, tokenizer, config) -> dict[str, Any]:
        labels = list(spec.labels or ())
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {n: i for i, n in enumerate(labels)}}

    def tokenizer(self, base_dir: Path):
        """Byte-level BPE tokenizers (GPT-2, RoBERTa) take pre-split words only with add_prefix_space."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(base_dir))
        if getattr(tok, "add_prefix_space", None) is False:
            tok = AutoTokenizer.from_pretrained(str(base_dir), add_prefix_space=True)
        return tok


class CausalLM(_FileTaskType):
    """Next-token prediction on text, or on a completion given its prompt: see diffcli.lm_tasks."""

    name = "causal-lm"
    auto_class = "AutoModelForCausalLM"
    mapping = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
    module = "diffcli.lm_tasks"

    def load(self, task: str | None = None, **kw) -> "TaskData":
        kw.pop("labels", None)  # no label set: the targets are the text's own tokens
        return super().load(task, **kw)

    def check_model(self, config) -> None:
        """Bidirectional encoders (BERT, RoBERTa) have an LM head class but would see the tokens they predict."""
        from transformers.models.auto import modeling_auto

        super().check_model(config)
        if config.model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder",
                                                                                                 False):
            raise InvalidValueError(f"model type {config.model_type!r} is a bidirectional encoder: it cannot serve "
                                    f"--task-type {self.name}",
                                    hint="use a decoder model (GPT-2, Llama, ...) for causal-lm")


TASK_TYPES: dict[str, TaskType] = {t.name: t for t in (SequenceClassification(), TokenClassification(), CausalLM())}


def build_task_model(base_dir: str | Path, spec, seed: int) -> TaskModel:
    """The task model of `spec`'s task type on the base (`TaskType.build`)."""
    return for_spec(spec).build(base_dir, spec, seed)


def get(name: str | None) -> TaskType:
    """The task type by name (None: sequence-classification); '_' and case are ignored."""
    key = (name or DEFAULT).strip().lower().replace("_", "-")
    if key not in TASK_TYPES:
        raise InvalidValueError(f"unknown task type {name!r}; known: {', '.join(TASK_TYPES)}")
    return TASK_TYPES[key]


def for_spec(spec) -> TaskType:
    """The task type of a loaded task's spec (GLUE/custom TaskSpecs are sequence classification)."""
    return get(getattr(spec, "task_type", DEFAULT))


_ARCH_SUFFIXES = (("ForTokenClassification", "token-classification"), ("ForCausalLM", "causal-lm"),
                  ("LMHeadModel", "causal-lm"), ("ForSequenceClassification", DEFAULT))


def recorded_type(config: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> str | None:
    """The task type a diff says it was made for: its metadata's `task_type`, else its config's architecture."""
    recorded = (meta or {}).get("task_type")
    if recorded:
        return get(str(recorded)).name
    for arch in config.get("architectures") or ():
        for suffix, name in _ARCH_SUFFIXES:
            if str(arch).endswith(suffix):
                return name
    return None


def of_diff(config: Mapping[str, Any], meta: Mapping[str, Any] | None = None, wanted: str | None = None) -> TaskType:
    """The task type to serve a diff with: `wanted` (refused when the diff says another), else what it records."""
    recorded = recorded_type(config, meta)
    if wanted is not None:
        kind = get(wanted)
        if recorded is not None and recorded != kind.name:
            raise InvalidValueError(f"the diff was made for {recorded}, not {kind.name}",
                                    hint=f"pass --task-type {recorded}, or leave it out")
        return kind
    return get(recorded or DEFAULT)
