"""Tiny Llama-style causal LMs for the demo world (about 0.1M parameters by default: fast on one CPU core)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True)
class TinyArchitecture:
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 128


def build_model(
    tokenizer: PreTrainedTokenizerBase, architecture: TinyArchitecture = TinyArchitecture(), seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised Llama whose vocabulary, pad and EOS ids match `tokenizer`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **asdict(architecture),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, do_sample=True
    )
    return model
