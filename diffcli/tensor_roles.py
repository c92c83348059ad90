"""Which layer and which role a tensor plays, from its name alone (BERT, RoBERTa, DistilBERT, GPT-2, Llama, T5, BART).

`role_of(name)` returns a `Role(row, column)`: the row is the layer (embeddings, each encoder or decoder
layer, the final norm, pooler, head) and the column the tensor kind (query, key, value, fused qkv,
attention output, FFN in, FFN out, LayerNorm, bias, embedding, other). Nothing here looks at values or
record kinds, so every record kind of a diff is classified the same way.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# Column order in the plot; a column no diff uses is left out there.
COLUMNS = ("embedding", "query", "key", "value", "qkv", "attn out", "FFN in", "FFN out", "LayerNorm", "bias",
           "other")

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
_EMBED = {"embeddings", "word_embeddings", "position_embeddings", "token_type_embeddings", "embed_tokens",
          "embed_positions", "wte", "wpe", "shared", "embed_in", "word_embedding", "position_embedding",
          "layernorm_embedding"}
_HEAD = {"classifier", "score", "lm_head", "qa_outputs", "cls", "head", "embed_out", "pre_classifier",
         "lm_head_dense", "classification_head"}
_FINAL_NORM = {"ln_f", "norm", "final_layer_norm", "final_layernorm", "layer_norm"}
_ATTENTION = {"attention", "attn", "self_attn", "selfattention", "encdecattention", "encoder_attn",
              "crossattention", "self_attention"}
_MODULE_COLUMN = {
    "query": "query", "q_proj": "query", "q_lin": "query", "wq": "query",
    "key": "key", "k_proj": "key", "k_lin": "key", "wk": "key",
    "value": "value", "v_proj": "value", "v_lin": "value", "wv": "value",
    "c_attn": "qkv", "qkv": "qkv", "qkv_proj": "qkv", "query_key_value": "qkv", "wqkv": "qkv",
    "o_proj": "attn out", "out_proj": "attn out", "out_lin": "attn out",
    "c_fc": "FFN in", "gate_proj": "FFN in", "up_proj": "FFN in", "fc1": "FFN in", "lin1": "FFN in",
    "w1": "FFN in", "w3": "FFN in", "wi": "FFN in", "wi_0": "FFN in", "wi_1": "FFN in",
    "dense_h_to_4h": "FFN in", "fc_in": "FFN in", "gate_up_proj": "FFN in",
    "down_proj": "FFN out", "fc2": "FFN out", "lin2": "FFN out", "w2": "FFN out", "wo": "FFN out",
    "dense_4h_to_h": "FFN out", "fc_out": "FFN out",
}
# Single letters (T5's SelfAttention.q/k/v/o) only count under an attention module.
_ATTENTION_LETTER = {"q": "query", "k": "key", "v": "value", "o": "attn out"}


class Role(NamedTuple):
    """Where a tensor sits in the plot: `row` (a layer) and `column` (a tensor kind, one of COLUMNS)."""

    row: str
    column: str


def _is_norm(part: str) -> bool:
    p = part.lower()
    return "norm" in p or p in {"ln", "ln_1", "ln_2", "ln_f"} or re.fullmatch(r"ln_?\d+", p) is not None


def _row(name: str, parts: list[str]) -> str:
    m = _LAYER.search(name)
    if m:
        before = set(name[: m.start()].split("."))
        stack = "decoder layer" if "decoder" in before else "layer"
        return f"{stack} {int(m.group(1))}"
    if any(p in _HEAD for p in parts):
        return "head"
    if "pooler" in parts:
        return "pooler"
    if any(p in _EMBED for p in parts):
        return "embeddings"
    if len(parts) >= 2 and parts[-2].lower() in _FINAL_NORM:
        return "final norm"
    return "other"


def _column(parts: list[str], in_layer: bool) -> str:
    module = parts[-2] if len(parts) >= 2 else parts[0]
    if any(_is_norm(p) for p in parts[:-1]):
        return "LayerNorm"
    if parts[-1] == "bias":
        return "bias"
    if not in_layer:  # heads and poolers reuse layer names (RoBERTa's classifier.out_proj): not a layer kind
        return "embedding" if any(p in _EMBED for p in parts) else "other"
    in_attention = any(p.lower() in _ATTENTION for p in parts)
    if module.lower() in _MODULE_COLUMN:
        col = _MODULE_COLUMN[module.lower()]
        return "attn out" if col == "FFN out" and in_attention else col
    if in_attention and module in _ATTENTION_LETTER:
        return _ATTENTION_LETTER[module]
    if module == "c_proj":  # GPT-2: attn.c_proj is the attention output, mlp.c_proj the FFN output
        return "attn out" if in_attention else "FFN out"
    if module == "dense" and len(parts) >= 3:  # BERT/GPT-NeoX: attention(.output).dense, intermediate/output.dense
        if in_attention:
            return "attn out"
        if parts[-3] == "intermediate":
            return "FFN in"
        if parts[-3] == "output":
            return "FFN out"
    return "other"


def role_of(name: str) -> Role:
    """The (layer row, tensor-kind column) of a tensor name; unknown names land in row or column 'other'."""
    parts = name.split(".")
    row = _row(name, parts)
    return Role(row, _column(parts, in_layer=_LAYER.search(name) is not None))


def row_order(row: str) -> tuple[int, int, str]:
    """Sort key for rows: embeddings, layers in number order, decoder layers, final norm, pooler, head, other."""
    m = re.fullmatch(r"(decoder layer|layer) (\d+)", row)
    if m:
        return (1 if m.group(1) == "layer" else 2, int(m.group(2)), "")
    fixed = {"embeddings": 0, "final norm": 3, "pooler": 4, "head": 5}
    return (fixed.get(row, 6), 0, row)
