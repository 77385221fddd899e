"""Tiny random Hugging Face checkpoints (weights + tokenizer), written locally for tests and tiny presets.

    write_tiny_checkpoint("/tmp/tiny_llama", architecture="llama")
    model, params = load_pretrained("/tmp/tiny_llama")          # the same path as a real checkpoint

The directory has what a real SmolLM2 / Qwen checkpoint has: config.json, model.safetensors,
generation_config.json, tokenizer.json (byte-level BPE with no merges: one token per byte, plus the special
tokens <|endoftext|>, <|im_start|>, <|im_end|> and a few whole-word tokens), and tokenizer_config.json with
eos / pad tokens and a ChatML jinja chat template. The model's vocabulary is the tokenizer's rounded up to a
multiple of 8, so, as with Qwen's padded vocabularies, some ids have no token (decoding skips them).
"""

from __future__ import annotations

import json
import os

import jax

from maxrl_jax.models import decoder as dec
from maxrl_jax.models import hf_loading

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Whole-string tokens that shorten the synthetic arithmetic prompts and answers.
WORD_TOKENS = ("\\boxed{", "What is", "user", "assistant", "system", " Let's think step by step")
# A ChatML template written for these tests (role header, content, end-of-turn per message).
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tokenizer(path: str) -> int:
    """Writes tokenizer.json / tokenizer_config.json / generation_config.json; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=import-outside-toplevel

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.add_tokens(list(WORD_TOKENS))
    os.makedirs(path, exist_ok=True)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    eos = SPECIAL_TOKENS.index("<|im_end|>")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_JINJA,
        "model_max_length": 512,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=1)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [eos, SPECIAL_TOKENS.index("<|endoftext|>")], "pad_token_id": 0}, f)
    return tokenizer.get_vocab_size(with_added_tokens=True)


def tiny_config(architecture: str, vocab_size: int, **overrides) -> dec.DecoderConfig:
    """A tiny DecoderConfig with the features of `architecture` (qwen2 biases, qwen3 q/k norm, tying)."""
    values = dict(vocab_size=vocab_size, num_layers=2, hidden_size=64, ffn_size=128, num_heads=4,
                  num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, max_positions=512,
                  tie_embeddings=architecture != "qwen3", qk_norm=architecture == "qwen3",
                  attention_bias=architecture == "qwen2", init_std=0.05)
    values.update(overrides)
    return dec.DecoderConfig(**values)


def write_tiny_checkpoint(path: str, architecture: str = "llama", seed: int = 0, **overrides) -> dec.DecoderConfig:
    """Writes a random tiny `architecture` checkpoint with a byte-level tokenizer to `path`; returns its config.

    `overrides` replace DecoderConfig fields of `tiny_config` (e.g. num_layers=1).
    """
    tokenizer_size = write_tokenizer(path)
    config = tiny_config(architecture, -(-tokenizer_size // 8) * 8, **overrides)
    params = dec.init_params(config, jax.random.key(seed))
    eos = SPECIAL_TOKENS.index("<|im_end|>")
    hf_loading.save_pretrained(path, config, params, architecture=architecture, eos_token_id=eos,
                               bos_token_id=None, pad_token_id=0)
    return config
