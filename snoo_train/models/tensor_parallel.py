"""Tensor parallelism (Megatron-style, with sequence parallelism) for the HF decoder classes.

Applied with torch's `parallelize_module` before activation checkpointing, compile and FSDP
(the order torchtitan uses: FSDP then shards the TP-local parameters over the data-parallel
ranks, and its hooks stay outermost). Per decoder layer:

    input_layernorm            sequence parallel: each tp rank normalises S / T positions
    self_attn                  gathers the sequence (all-gather), then
      q/k/v_proj               column-parallel: each rank computes num_heads / T heads
      o_proj                   row-parallel: partial sums reduce-scattered back to S / T positions
    post_attention_layernorm   sequence parallel
    mlp (dense)                gathers the sequence, gate/up column-parallel, down row-parallel
    mlp (MoE)                  gathers the sequence and runs the whole block on it (experts are
                               sharded by FSDP or expert parallelism, not by tp), then keeps this
                               rank's S / T positions

The embedding is vocabulary-parallel (each rank holds V / T rows; partial lookups are summed and
scattered over the sequence), the final norm sequence-parallel, and the head column-parallel.
With `loss_parallel=True` (the trainer's default, `parallel.loss_parallel`) the logits stay
sharded over the vocabulary, a DTensor, and the cross-entropy runs on the shards under torch's
`loss_parallel()` (trainer/step.py: causal_lm_loss): no rank ever holds [batch, seq, vocab] and
nothing gathers it. Otherwise the logits are gathered (plain, replicated), which is what HF code
that computes its own loss from `outputs.logits` needs.
A tied head is the embedding's own parameter: both are sharded on the vocabulary dimension, so
the tie is restored on the one DTensor.

Why not transformers' own `tp_plan`: it is applied while loading weights (`from_pretrained(...,
tp_plan="auto")`) on a 1-D mesh of all ranks, while we build on the meta device, initialise from
our own seeded init and compose with FSDP2 on the other mesh dimensions; its plan also keeps the
norms replicated (no sequence parallelism).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def _attention_plan() -> dict:
    return {
        "input_layernorm": SequenceParallel(),
        # HF's decoder layer calls self_attn(hidden_states=..., position_embeddings=..., ...):
        # only the hidden states are sharded; cos/sin and the mask are plain full-length tensors.
        "self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
        ),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        # Outputs stay DTensors: the residual stream they are added to is one (see the embedding).
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "post_attention_layernorm": SequenceParallel(),
    }


def _dense_mlp_plan() -> dict:
    return {
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }


def _moe_block_plan() -> dict:
    # The MoE block sees the whole sequence as a plain tensor (same on every tp rank, so the
    # router, its balancing loss and expert parallelism work unchanged) and hands back this
    # rank's sequence shard. Its gradient arrives as that shard and is gathered, so every tp rank
    # computes the same expert gradients and the tp ranks never reduce them.
    return {
        "mlp": PrepareModuleInputOutput(
            input_layouts=(Shard(1),),
            desired_input_layouts=(Replicate(),),
            use_local_input=True,
            output_layouts=(Replicate(),),
            desired_output_layouts=(Shard(1),),
            use_local_output=False,
        )
    }


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, *, moe: bool = False, loss_parallel: bool = False
) -> None:
    """Shard `model` (a LlamaForCausalLM or MixtralForCausalLM, possibly on the meta device)
    over the 1-D `tp_mesh` in place; see the module docstring for the layout."""
    head = (
        ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
        if loss_parallel
        else ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    )
    # A pipeline stage (models/pipeline.py) holds the embedding, the norm and the head only
    # where it is the first or the last stage.
    tied = hasattr(model, "lm_head") and hasattr(model.model, "embed_tokens") and (
        model.lm_head.weight is model.model.embed_tokens.weight
    )
    root_plan = {
        # input_ids are the same on every tp rank; the output is sequence-sharded for the
        # first layer's sequence-parallel norm, and stays a DTensor so that the HF model
        # reads the full sequence length from it (positions, rotary, causal mask).
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False),
        "model.norm": SequenceParallel(),
        "lm_head": head,
    }
    root_plan = {name: style for name, style in root_plan.items() if _has_module(model, name)}
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan)
    layer_plan = {**_attention_plan(), **(_moe_block_plan() if moe else _dense_mlp_plan())}
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, layer_plan)
    if tied:
        # parallelize_module registered a new Parameter on each module; make them one again.
        model.lm_head.weight = model.model.embed_tokens.weight
