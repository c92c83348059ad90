"""Tiny random GPT-2 and Llama folders (2 layers, hidden 32) with a word-level fast tokenizer, for task-type tests."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the a is not good bad movie cat dog yes no sat on mat john paris lives in works at acme berlin mary "
         "and of to say hello world blue red big small runs").split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
VOCAB = 64
PAD, UNK, BOS, EOS = 0, 1, 2, 3


def write_tokenizer(folder: Path, *, bos: bool) -> None:
    """A whitespace word-level tokenizer (a fast one: word ids work); `bos` prepends <s> like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(folder)


def make_gpt2(folder: Path, seed: int = 0) -> Path:
    """GPT2LMHeadModel saved as the hub saves it: the LM head tied to the token embeddings (not stored)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=BOS,
                     eos_token_id=EOS)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    write_tokenizer(folder, bos=False)
    return folder


def make_llama(folder: Path, seed: int = 0) -> Path:
    """LlamaForCausalLM with an untied LM head (stored in the base)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    write_tokenizer(folder, bos=True)
    return folder


def nudge(model, seed: int = 1, scale: float = 0.05):
    """Every parameter moved by N(0, scale²): a stand-in for a finetune (in place; returns the model)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model
