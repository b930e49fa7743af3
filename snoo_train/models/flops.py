"""Parameter and FLOP counts, for logging model size and MFU."""

from __future__ import annotations

import math

from torch import nn

from snoo_train.config import ModelConfig
from snoo_train.models.decoder import padded_vocab_size


def count_parameters(model: nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Number of distinct parameters, global under FSDP (a DTensor's numel is its full size).

    `exclude_embeddings` drops the input embedding table (which, when tied, is also the head).
    """
    skip = {id(model.get_input_embeddings().weight)} if exclude_embeddings else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def non_embedding_parameters(cfg: ModelConfig) -> int:
    """Parameters of a model shape without the token embedding and the output head: the decoder
    layers and the final norm. The count scaling laws use (Kaplan et al.), and the one
    bench/convergence.py's --tokens-per-param budget multiplies; it does not depend on the
    vocabulary. MoE counts every expert (total, not active, parameters)."""
    hidden = cfg.hidden_size
    head_dim = hidden // cfg.num_heads
    attention = hidden * head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # q, o, k, v
    if cfg.family == "moe":
        mlp = cfg.num_experts * 3 * hidden * (cfg.moe_intermediate_size or cfg.intermediate_size) + hidden * cfg.num_experts
    else:
        mlp = 3 * hidden * cfg.intermediate_size
    return cfg.num_layers * (attention + mlp + 2 * hidden) + hidden


def steps_for_tokens_per_param(cfg: ModelConfig, tokens_per_param: float, batch_size: int, seq_len: int) -> int:
    """Optimizer steps that give `tokens_per_param` training tokens per non-embedding parameter
    (20: the compute-optimal ratio of Hoffmann et al.) at `batch_size` sequences of `seq_len`."""
    return max(1, math.ceil(tokens_per_param * non_embedding_parameters(cfg) / (batch_size * seq_len)))


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
