"""Tensor names → (layer row, tensor-kind column) for the plot: BERT, GPT-2, Llama and friends."""

from __future__ import annotations

import pytest

from diffcli.tensor_roles import COLUMNS, Role, role_of, row_order

BERT = {
    "embeddings.word_embeddings.weight": ("embeddings", "embedding"),
    "bert.embeddings.position_embeddings.weight": ("embeddings", "embedding"),
    "embeddings.token_type_embeddings.weight": ("embeddings", "embedding"),
    "embeddings.LayerNorm.weight": ("embeddings", "LayerNorm"),
    "embeddings.LayerNorm.bias": ("embeddings", "LayerNorm"),
    "encoder.layer.0.attention.self.query.weight": ("layer 0", "query"),
    "bert.encoder.layer.11.attention.self.key.weight": ("layer 11", "key"),
    "encoder.layer.1.attention.self.value.weight": ("layer 1", "value"),
    "encoder.layer.1.attention.self.value.bias": ("layer 1", "bias"),
    "encoder.layer.1.attention.output.dense.weight": ("layer 1", "attn out"),
    "encoder.layer.1.attention.output.dense.bias": ("layer 1", "bias"),
    "encoder.layer.1.attention.output.LayerNorm.weight": ("layer 1", "LayerNorm"),
    "encoder.layer.1.intermediate.dense.weight": ("layer 1", "FFN in"),
    "encoder.layer.1.output.dense.weight": ("layer 1", "FFN out"),
    "encoder.layer.1.output.LayerNorm.bias": ("layer 1", "LayerNorm"),
    "pooler.dense.weight": ("pooler", "other"),
    "bert.pooler.dense.bias": ("pooler", "bias"),
    "classifier.weight": ("head", "other"),
    "classifier.bias": ("head", "bias"),
    "classifier.out_proj.weight": ("head", "other"),  # RoBERTa's head has an out_proj too
}
GPT2 = {
    "transformer.wte.weight": ("embeddings", "embedding"),
    "transformer.wpe.weight": ("embeddings", "embedding"),
    "transformer.h.0.ln_1.weight": ("layer 0", "LayerNorm"),
    "transformer.h.0.ln_2.bias": ("layer 0", "LayerNorm"),
    "transformer.h.3.attn.c_attn.weight": ("layer 3", "qkv"),
    "transformer.h.3.attn.c_attn.bias": ("layer 3", "bias"),
    "transformer.h.3.attn.c_proj.weight": ("layer 3", "attn out"),
    "transformer.h.3.mlp.c_fc.weight": ("layer 3", "FFN in"),
    "transformer.h.3.mlp.c_proj.weight": ("layer 3", "FFN out"),
    "transformer.ln_f.weight": ("final norm", "LayerNorm"),
    "score.weight": ("head", "other"),
    "lm_head.weight": ("head", "other"),
}
LLAMA = {
    "model.embed_tokens.weight": ("embeddings", "embedding"),
    "model.layers.0.self_attn.q_proj.weight": ("layer 0", "query"),
    "model.layers.0.self_attn.k_proj.weight": ("layer 0", "key"),
    "model.layers.0.self_attn.v_proj.weight": ("layer 0", "value"),
    "model.layers.0.self_attn.o_proj.weight": ("layer 0", "attn out"),
    "model.layers.0.mlp.gate_proj.weight": ("layer 0", "FFN in"),
    "model.layers.0.mlp.up_proj.weight": ("layer 0", "FFN in"),
    "model.layers.0.mlp.down_proj.weight": ("layer 0", "FFN out"),
    "model.layers.0.input_layernorm.weight": ("layer 0", "LayerNorm"),
    "model.layers.0.post_attention_layernorm.weight": ("layer 0", "LayerNorm"),
    "model.norm.weight": ("final norm", "LayerNorm"),
    "lm_head.weight": ("head", "other"),
}
OTHERS = {  # DistilBERT, T5 and BART: encoder and decoder stacks get their own rows
    "distilbert.transformer.layer.2.attention.q_lin.weight": ("layer 2", "query"),
    "distilbert.transformer.layer.2.attention.out_lin.weight": ("layer 2", "attn out"),
    "distilbert.transformer.layer.2.ffn.lin1.weight": ("layer 2", "FFN in"),
    "distilbert.transformer.layer.2.sa_layer_norm.weight": ("layer 2", "LayerNorm"),
    "encoder.block.1.layer.0.SelfAttention.q.weight": ("layer 1", "query"),
    "encoder.block.1.layer.0.SelfAttention.o.weight": ("layer 1", "attn out"),
    "decoder.block.1.layer.2.DenseReluDense.wo.weight": ("decoder layer 1", "FFN out"),
    "encoder.final_layer_norm.weight": ("final norm", "LayerNorm"),
    "model.decoder.layers.4.encoder_attn.k_proj.weight": ("decoder layer 4", "key"),
    "model.decoder.layers.4.fc1.weight": ("decoder layer 4", "FFN in"),
    "model.encoder.layernorm_embedding.weight": ("embeddings", "LayerNorm"),
    "classification_head.out_proj.weight": ("head", "other"),  # BART's sequence-classification head
    "gpt_neox.layers.0.attention.dense.weight": ("layer 0", "attn out"),
    "gpt_neox.layers.0.attention.query_key_value.weight": ("layer 0", "qkv"),
    "something.completely.new": ("other", "other"),
}


@pytest.mark.parametrize("table", [BERT, GPT2, LLAMA, OTHERS], ids=["bert", "gpt2", "llama", "others"])
def test_role_of_known_names(table):
    got = {name: tuple(role_of(name)) for name in table}
    assert got == table


def _names(model) -> list[str]:
    return list(model.state_dict())


def _tiny_models():
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                              LlamaConfig, LlamaForCausalLM)

    yield "bert", BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=2, intermediate_size=64))
    yield "gpt2", GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2,
                                                           n_positions=32))
    yield "llama", LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, num_key_value_heads=2, intermediate_size=64))


def test_every_parameter_of_tiny_models_gets_a_known_place():
    """Real state-dict names: every layer parameter has a specific column; 'other' only for heads and poolers."""
    for arch, model in _tiny_models():
        roles = {name: role_of(name) for name in _names(model) if not name.endswith(("attn.bias", "masked_bias"))}
        rows = {r.row for r in roles.values()}
        assert {"embeddings", "layer 0", "layer 1", "head"} <= rows, arch
        assert "other" not in rows, (arch, [n for n, r in roles.items() if r.row == "other"])
        for name, role in roles.items():
            assert role.column in COLUMNS
            if role.row.startswith("layer"):
                assert role.column != "other", (arch, name)
        cols = {r.column for r in roles.values() if r.row == "layer 1"}
        expected = {"bert": {"query", "key", "value", "attn out", "FFN in", "FFN out", "LayerNorm", "bias"},
                    "gpt2": {"qkv", "attn out", "FFN in", "FFN out", "LayerNorm", "bias"},
                    "llama": {"query", "key", "value", "attn out", "FFN in", "FFN out", "LayerNorm"}}[arch]
        assert cols == expected, arch


def test_row_order():
    rows = ["head", "layer 10", "other", "decoder layer 0", "pooler", "layer 2", "embeddings", "final norm"]
    assert sorted(rows, key=row_order) == ["embeddings", "layer 2", "layer 10", "decoder layer 0", "final norm",
                                           "pooler", "head", "other"]
    assert role_of("encoder.layer.3.output.dense.weight") == Role("layer 3", "FFN out")
