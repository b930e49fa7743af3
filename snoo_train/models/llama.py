"""The dense family: `transformers.LlamaForCausalLM`'s config from a ModelConfig."""

from __future__ import annotations

from transformers import LlamaConfig

from snoo_train.config import ModelConfig
from snoo_train.models.decoder import decoder_config_kwargs, padded_vocab_size


def llama_config(cfg: ModelConfig, vocab_size: int) -> LlamaConfig:
    """The transformers config for `cfg`; `vocab_size` is the tokenizer's (padded here)."""
    if cfg.family != "llama":
        raise ValueError(
            f"model.family={cfg.family!r} is not a dense Llama; only 'llama' is built here"
        )
    return LlamaConfig(
        vocab_size=padded_vocab_size(cfg, vocab_size),
        intermediate_size=cfg.intermediate_size,
        **decoder_config_kwargs(cfg),
    )
