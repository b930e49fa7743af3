"""Activation memory of a Llama / Mixtral decoder, counted from what autograd saves.

Notation: b micro-batch sequences per rank, s sequence length, h hidden size, a heads, g key/value
heads, I the MLP width (a Mixtral expert's width with k experts per token), V the padded
vocabulary, L layers, T tensor-parallel ranks, dt the compute dtype's bytes (2 for bf16 under
FSDP2's MixedPrecisionPolicy, 4 for fp32). Counted per saved tensor of transformers' modules
(transformers 5.2x, SDPA attention with `enable_gqa`, no attention mask, no dropout):

    RMSNorm               x in fp32 (4: the `.to(float32)` copy, or x itself in fp32), x / rms
                          in dt, weight * (x / rms) in dt             (4 + 2 dt) s b h
    q, k, v after RoPE    (the linears share the norm's output)       dt s b (h + 2 h g / a)
    SDPA                  output in dt, logsumexp in fp32             dt s b h + 4 a s b
    output projection     its contiguous input                       dt s b h
    MLP (SwiGLU)          gate, silu(gate), up, silu(gate) * up       4 dt s b I
    MoE (instead of MLP)  per routed copy of a token: its input, the
                          expert's gate/up, silu, product, output    dt k s b (2 h + 4 I)
                          router probabilities (fp32)                 8 s b E

    one layer = s b h (8 + 7 dt + 2 dt g / a) + 4 a s b + the MLP term

SDPA's flash and memory-efficient kernels keep the logsumexp, not the s x s scores: no s^2 term
(the math fallback, e.g. with an explicit mask, would add dt a s^2 b). Under tensor parallelism
with sequence parallelism everything above divides by T, and the all-gathered input of the
attention and of the MLP (dt s b h each) is kept whole. The final norm adds one RMSNorm.
Activation checkpointing (one checkpoint per decoder layer) keeps only each layer's input,
dt s b h per layer (/ T: sequence parallel), and recomputes one layer at a time in backward:
L dt s b h + one layer at the worst moment.

In backward, one layer's gradients pass through besides: about 2 dt s b (I + h) / T.

The loss: the head's logits are upcast to fp32 and `log_softmax` keeps its fp32 output; its
backward holds that output, the incoming gradient and its own result at once: 12 s b V bytes
(V / T with parallel.loss_parallel), usually the largest single term of a small model.

Under autocast (bf16 at world size 1: no FSDP) the residual stream stays fp32 and every matmul
weight is cached in bf16 for backward: counted as dt = 4 plus 2 bytes per matmul parameter.
torch.compile fuses element-wise ops and saves less: the figures are eager upper bounds.
"""

from __future__ import annotations

from typing import Any


def _norm_bytes(sbh: int, dt: int, tp: int) -> int:
    """One RMSNorm's saved tensors (sequence parallel under tp), plus the all-gathered copy of
    its output that the following column-parallel linears keep under tp."""
    return (4 + 2 * dt) * sbh // tp + (dt * sbh if tp > 1 else 0)


def mlp_bytes(m: Any, sb: int, dt: int, tp: int) -> int:
    """The feed-forward block's saved tensors: SwiGLU, or the routed Mixtral experts."""
    if m.family == "moe":
        width = m.moe_intermediate_size or m.intermediate_size
        k = m.num_experts_per_tok
        return dt * k * sb * (2 * m.hidden_size + 4 * width) + 8 * sb * m.num_experts
    return 4 * dt * sb * m.intermediate_size // tp


def layer_bytes(m: Any, b: int, s: int, dt: int, tp: int = 1) -> int:
    """Everything one decoder layer saves for backward (see the module docstring)."""
    sb = s * b
    sbh = sb * m.hidden_size
    head_dim = m.hidden_size // m.num_heads
    kv = 2 * sb * m.num_kv_heads * head_dim
    attention = (3 * dt * sbh + dt * kv + 4 * m.num_heads * sb) // tp
    return 2 * _norm_bytes(sbh, dt, tp) + attention + mlp_bytes(m, sb, dt, tp)


def stored_activation_bytes(m: Any, b: int, s: int, dt: int, *, tp: int = 1, checkpointing: bool) -> int:
    """What the decoder has saved for backward when the forward ends: every layer's tensors, or
    under checkpointing only every layer's input; the final norm's either way."""
    sbh = s * b * m.hidden_size
    final_norm = _norm_bytes(sbh, dt, tp)
    if checkpointing:
        return m.num_layers * dt * sbh // tp + final_norm
    return m.num_layers * layer_bytes(m, b, s, dt, tp) + final_norm


def backward_transient_bytes(m: Any, b: int, s: int, dt: int, tp: int = 1) -> int:
    """Gradients alive inside one layer's backward besides its saved tensors: about two of the
    MLP's width (the gradients of silu(gate) * up and of its factors) and two hidden states."""
    width = m.intermediate_size if m.family != "moe" else (m.moe_intermediate_size or m.intermediate_size) * m.num_experts_per_tok
    return dt * s * b * (2 * width + 2 * m.hidden_size) // tp


def loss_bytes(b: int, s: int, vocab: int) -> int:
    """Cross-entropy over fp32 logits: log_softmax's output, its gradient and its input's
    gradient alive together at the start of backward."""
    return 12 * b * s * vocab


def pipeline_chunk_bytes(
    m: Any, layers: int, b: int, s: int, dt: int, tp: int = 1, *, checkpointing: bool, first: bool, last: bool
) -> int:
    """What one micro-batch keeps on a pipeline stage of `layers` decoder layers from its forward
    to its backward, the logits aside (plan/pipeline.py): the layers' saved tensors (their inputs
    under checkpointing) and what torch's stage holds for the backward: its output (dt s b h / T),
    or on the last stage the final norm's tensors. A later stage's input is torch's receive
    buffer, counted apart (pipeline_buffer_bytes): what autograd saves of it is not counted again
    (a checkpointed first layer's input; in fp32 the first norm's x, which is the input itself)."""
    sbh = s * b * m.hidden_size
    received = 0 if first or not layers else (dt * sbh if checkpointing else (4 * sbh if dt == 4 else 0))
    each = dt * sbh // tp if checkpointing else layer_bytes(m, b, s, dt, tp)
    kept = layers * each - received // tp
    return kept + (_norm_bytes(sbh, dt, tp) if last else dt * sbh // tp)


def pipeline_buffer_bytes(m: Any, b: int, s: int, dt: int, tp: int, *, microbatches: int, receives: int) -> int:
    """torch's PipelineStage allocates a receive buffer per micro-batch, once, for every stage
    input it receives (activations on a later stage, gradients on an earlier one), each one
    sequence shard of hidden states in the compute dtype: kept for the whole run."""
    return receives * microbatches * dt * s * b * m.hidden_size // tp
