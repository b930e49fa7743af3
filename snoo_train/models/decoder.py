"""What every decoder here shares: the padded vocabulary and the transformers config fields of
a Llama-style decoder (dense Llama and the Mixtral MoE: same attention, norms and rotary
embedding). Both families' config builders import this module, never each other."""

from __future__ import annotations

from snoo_train.config import VOCAB_MULTIPLE, ConfigError, ModelConfig


def padded_vocab_size(cfg: ModelConfig, vocab_size: int) -> int:
    """`cfg.vocab_size` if set, else the tokenizer's, rounded up to a multiple of 64 (with
    `model.from_pretrained`: the checkpoint's vocabulary, unpadded).

    Padding keeps the embedding and output matmuls on tensor-core-friendly shapes; the extra
    rows are never looked up and their logits are trained down like any unused token.
    """
    size = cfg.vocab_size if cfg.vocab_size is not None else vocab_size
    if cfg.from_pretrained and size < vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} ids but model.from_pretrained={cfg.from_pretrained!r} has a "
            f"vocabulary of {size}: use the checkpoint's own tokenizer (data.tokenizer=null takes it when its directory has one) or one that fits"
        )
    if cfg.from_pretrained:
        return size  # a checkpoint's vocabulary is taken as is: its embedding has that many rows
    if size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({vocab_size} ids); leave model.vocab_size=null to take the tokenizer's size"
        )
    return -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def decoder_config_kwargs(cfg: ModelConfig) -> dict:
    """The transformers config fields every decoder here shares (dense Llama and the Mixtral
    MoE: same attention, norms and rotary embedding)."""
    return dict(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        # Training never reuses keys/values; a cache would be allocated on every forward.
        use_cache=False,
        attn_implementation="sdpa",
    )
