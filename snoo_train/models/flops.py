"""Parameter and FLOP counts, for logging model size and MFU."""

from __future__ import annotations

from torch import nn

from snoo_train.config import ModelConfig
from snoo_train.models.decoder import padded_vocab_size


def count_parameters(model: nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Number of distinct parameters, global under FSDP (a DTensor's numel is its full size).

    `exclude_embeddings` drops the input embedding table (which, when tied, is also the head).
    """
    skip = {id(model.get_input_embeddings().weight)} if exclude_embeddings else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token, PaLM-appendix style.

    6 per weight that takes part in a matmul: every decoder-layer weight, the final norm and the
    output head. The input embedding is a lookup and is left out, but a tied head still counts,
    since its matmul is paid. Plus attention scores and values: 2 matmuls x 2 FLOPs x hidden x
    seq_len per layer forward, x3 for backward = 12 * layers * hidden * seq_len (causal masking
    is not discounted, the usual convention). `vocab_size` is the tokenizer's (padded here).
    MoE (family=moe): active parameters only, i.e. the router plus num_experts_per_tok experts
    per token; the experts a token skips cost it nothing.
    """
    hidden, layers = cfg.hidden_size, cfg.num_layers
    head_dim = hidden // cfg.num_heads
    attention = hidden * head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # q, o, k, v
    if cfg.family == "moe":
        expert = 3 * hidden * (cfg.moe_intermediate_size or cfg.intermediate_size)
        mlp = cfg.num_experts_per_tok * expert + hidden * cfg.num_experts  # + router
    else:
        mlp = 3 * hidden * cfg.intermediate_size  # gate, up, down
    norms = 2 * hidden
    head = hidden * padded_vocab_size(cfg, vocab_size)
    matmul_params = layers * (attention + mlp + norms) + hidden + head
    return 6.0 * matmul_params + 12.0 * layers * hidden * seq_len
