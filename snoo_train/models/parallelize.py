"""Apply tensor parallelism, activation checkpointing, torch.compile and FSDP2 to a decoder
model, in that order (torchtitan's).

The order matters: tensor parallelism (models/tensor_parallel.py) turns the layer's weights into
DTensors on the tp mesh and its inputs/outputs into sequence shards, so everything after it sees
the final modules; checkpointing wraps a decoder layer, compile then traces the wrapped layer
(recompute included), and `fully_shard` goes outermost so its all-gather / reduce-scatter hooks
run once per layer and stay outside both the checkpointed region and the compiled graph. FSDP
shards the tp-local weights over the data-parallel mesh (a weight sharded on both is a DTensor
on the 2-D (shard, tp) mesh).

Meshes: a 1-D mesh is plain FSDP over all its ranks. A 2-D (replicate, shard) mesh is either
HSDP (`fully_shard` on the 2-D mesh: parameters sharded within a replica, gradients
reduce-scattered within it every micro-batch and all-reduced across replicas once per step, on
the last micro-batch: trainer/step.py's `accumulate_across_replicas`) or, with `diloco=True`,
independent replicas (`fully_shard` on `mesh["shard"]` only: forward and backward never talk
across replicas; SNOO's `replicate_group` averages the replicas every K steps).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from snoo_train.models.expert_parallel import apply_expert_parallel, fully_shard_experts
from snoo_train.models.tensor_parallel import apply_tensor_parallel


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks: the unit of checkpointing, compilation and sharding."""
    return model.model.layers


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them.

    Activation memory drops from every intermediate of every layer to one hidden state per
    layer, for about one extra forward pass of compute. Per layer (not per op, not the whole
    model) because the layer is also the FSDP unit, so a recompute finds its parameters already
    gathered for that layer's backward. The RNG state is not replayed: Llama has no dropout.
    Note: parameter names gain a `_checkpoint_wrapped_module.` segment (`state_dict()` and DCP
    strip it).
    """
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)


def apply_compile(model: nn.Module, *, backend: str = "inductor", fullgraph: bool = True) -> None:
    """Compile each decoder layer separately, as one graph (`fullgraph=True`).

    All layers share one shape, so dynamo traces one graph and reuses it; compiling the whole
    model would instead trace through FSDP's hooks and the HF output plumbing. `fullgraph`
    turns a silent graph break (a slow layer) into an error. `Module.compile` compiles in
    place, so parameter names do not change. `backend` exists for tests ("aot_eager" needs no
    C++ compiler).
    """
    for layer in decoder_layers(model):
        layer.compile(fullgraph=fullgraph, backend=backend)


def expert_shard_placement(mesh: DeviceMesh):
    """FSDP2 `shard_placement_fn`: 3-D expert weights [E, out, in] shard on the expert dimension
    while there are at least as many experts as ranks (each rank holds whole experts, which
    MuonBP's local blocks rely on), else on dim 1 (each expert's output rows) so that no rank
    holds an empty shard. Everything else keeps FSDP's default Shard(0)."""
    shard_ranks = mesh.size(-1)  # the shard dimension of a 1-D or (replicate, shard) mesh

    def placement(param: nn.Parameter) -> Shard | None:
        if param.ndim == 3 and param.shape[0] < shard_ranks:
            return Shard(1)
        return None  # FSDP's default, Shard(0)

    return placement


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None = None,
    efsdp_mesh: DeviceMesh | None = None,
    reshard_after_forward: bool = True,
) -> None:
    """Shard parameters, gradients and optimizer state over `mesh` with FSDP2 (`fully_shard`).

    One group per decoder layer so that only one layer's full parameters exist at a time and the
    next layer's all-gather overlaps this layer's compute; then the root, which takes what is
    left: the embedding, the final norm and the head. Tied embedding and head are one parameter,
    so they must be in one group, and the root is the only group containing both. The last layer
    keeps its parameters gathered after forward because backward needs them immediately.
    With `param_dtype=torch.bfloat16` the gathered parameters are bf16 for compute while the
    sharded master weights, the optimizer and the gradient reduction stay fp32.
    MoE expert weights follow `expert_shard_placement`; under expert parallelism they are their
    own group per layer over `efsdp_mesh` (the ranks holding the same experts) instead.
    `reshard_after_forward=False` (pipeline stages) keeps every layer gathered from its first
    micro-batch's forward to the step's last backward: see docs/parallelism.md#pipeline-parallelism.
    """
    mp_policy = MixedPrecisionPolicy()
    if param_dtype is not None and param_dtype != torch.float32:
        mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        reshard = reshard_after_forward and i < len(layers) - 1
        if efsdp_mesh is not None:
            fully_shard_experts(layer, efsdp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
        fully_shard(
            layer,
            mesh=mesh,
            mp_policy=mp_policy,
            reshard_after_forward=reshard,
            shard_placement_fn=expert_shard_placement(mesh),
        )
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)


def parallelize(
    model: nn.Module,
    *,
    mesh: DeviceMesh | None,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
    compile: bool = False,
    diloco: bool = False,
    tp_mesh: DeviceMesh | None = None,
    loss_parallel: bool = False,
    ep_mesh: DeviceMesh | None = None,
    efsdp_mesh: DeviceMesh | None = None,
    compile_backend: str = "inductor",
    pipeline_stage: bool = False,
) -> nn.Module:
    """TP or EP -> checkpointing -> compile -> FSDP, each optional; `mesh=None` means one
    process, no FSDP. `mesh` is the data-parallel mesh only (`DistInfo.dp_mesh`); `tp_mesh` (a
    1-D mesh of the same root) turns on tensor parallelism (with `loss_parallel`, logits sharded
    over the vocabulary: see models/tensor_parallel.py), `ep_mesh` expert parallelism, with the
    experts fully sharded over `efsdp_mesh`.

    With a 2-D (replicate, shard) mesh: HSDP, or with `diloco=True` FSDP within each replica
    (on `mesh["shard"]`); `diloco` changes nothing on a 1-D mesh.

    Mixed precision is applied by FSDP, so a bf16 `param_dtype` needs a mesh (a one-rank mesh
    is fine); without one, use `torch.autocast` in the training loop instead. A
    `pipeline_stage` keeps its layers gathered across micro-batches (see `apply_fsdp`).
    """
    if mesh is None and param_dtype not in (None, torch.float32):
        raise ValueError(
            f"param_dtype={param_dtype} needs FSDP: pass a device mesh (a 1-rank mesh works) "
            "or keep fp32 parameters and use torch.autocast"
        )
    tp = tp_mesh is not None and tp_mesh.size() > 1
    ep = ep_mesh is not None and ep_mesh.size() > 1
    if tp:
        apply_tensor_parallel(model, tp_mesh, moe=model.config.model_type == "mixtral", loss_parallel=loss_parallel)
    if ep:
        apply_expert_parallel(model, ep_mesh, tp_mesh=tp_mesh)
    # The expert dispatch reads its uneven split sizes on the host: a graph break by design.
    fullgraph = not ep
    if tp and activation_checkpointing and compile:
        # torch 2.13 cannot trace a checkpointed layer that holds DTensors: AOTAutograd saves the
        # DeviceMesh of a sequence-parallel redistribute as if it were a tensor and fails
        # ("expected all tensors_saved_with_vc_check to be Tensors"). Checkpointing the compiled
        # layer instead recomputes the same compiled forward in backward, at the same cost.
        apply_compile(model, backend=compile_backend, fullgraph=fullgraph)
        apply_activation_checkpointing(model)
    else:
        if activation_checkpointing:
            apply_activation_checkpointing(model)
        if compile:
            apply_compile(model, backend=compile_backend, fullgraph=fullgraph)
    if mesh is not None:
        if diloco and mesh.ndim == 2:
            mesh = mesh["shard"]
        efsdp = efsdp_mesh if ep else None
        apply_fsdp(model, mesh, param_dtype=param_dtype, efsdp_mesh=efsdp, reshard_after_forward=not pipeline_stage)
    return model
