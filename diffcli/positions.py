"""How many tokens a model's position embeddings take: a longer `--max-seq-length` is refused before any work.

A learned (absolute) position table has `max_position_embeddings` rows (GPT-2: `n_positions`); an input longer
than that indexes past it and the model crashes mid-run. RoBERTa-style models number positions after the padding
index, so `pad_token_id + 1` of their rows are never a position. Rotary, ALiBi and relative-position models
(Llama, GPT-NeoX, BLOOM, DeBERTa-v3) have no table: their
`max_position_embeddings` is a trained context length, not a hard limit, so they are not limited here.
"""

from __future__ import annotations

from typing import Any, Mapping

from diffcli.errors import InvalidValueError

DEFAULT_MAX_SEQ_LENGTH = 128
# position ids start at pad_token_id + 1 (transformers' create_position_ids_from_input_ids)
_AFTER_PADDING = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer", "ibert",
                  "mpnet", "roberta-prelayernorm", "xmod", "markuplm", "luke", "mluke"}
_NO_TABLE_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_dim", "rotary_pct", "rotary_emb_base",
                  "alibi")


def max_positions(config: Mapping[str, Any]) -> int | None:
    """The longest input the config's position table takes, or None where it has none (or says nothing)."""
    if (any(k in config for k in _NO_TABLE_KEYS) or config.get("position_embedding_type") not in (None, "absolute")
            or config.get("position_biased_input") is False):  # DeBERTa-v2/v3: relative positions only
        return None
    n = config.get("max_position_embeddings", config.get("n_positions"))
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    if config.get("model_type") in _AFTER_PADDING:
        pad = config.get("pad_token_id")
        n -= (pad if isinstance(pad, int) and pad >= 0 else 1) + 1
    return n if n > 0 else None


def seq_length_for(config: Mapping[str, Any], requested: int | None, what: str) -> int:
    """`requested` if the model takes it (InvalidValueError, exit 2, if not); the default (128, or the model's
    positions where fewer) when None. The lower bound (8) is the caller's options' check."""
    limit = max_positions(config)
    if requested is None:
        return DEFAULT_MAX_SEQ_LENGTH if limit is None else min(DEFAULT_MAX_SEQ_LENGTH, limit)
    if limit is not None and requested > limit:
        raise InvalidValueError(f"--max-seq-length {requested} is above the {limit} positions {what} takes",
                                hint=f"pass --max-seq-length {limit} or less")
    return requested
