"""Expert parallelism (EP) for the MoE model: each rank of an "ep" mesh holds num_experts / ep
whole experts, and tokens travel to their experts' ranks and back with all-to-all.

Without EP the experts are FSDP-sharded like everything else, so every rank all-gathers every
expert of every layer. With EP a rank only gathers its own experts (over the "efsdp" ranks that
hold the same ones) and pays two all-to-alls per layer for the routed tokens instead.

What is transformers' own (5.24, `transformers.distributed.expert_parallel`), and why it is used:
`MoEParamShard` turns `gate_up_proj` / `down_proj` into DTensors `Shard(0)` over the ep mesh
(on the meta device too: `materialize` then draws each rank's shard of the seeded tensors,
so the init equals the single-process one), and `AllToAllEP` does the dispatch: counts
exchanged first, then `all_to_all_single_autograd` with uneven split sizes, the local experts
run by the model's own experts kernel (one grouped GEMM for `grouped_mm`, the per-expert loop
for `eager`), results sent back and weighted by the routing weights on the sender. It was
checked on gloo with meta-device init, our `materialize`, FSDP2 and AdamW against one process
(tests/test_expert_parallel.py); the router, `aux_loss` and `router_logits` are untouched, so
`RouterStats` and the balancing loss mean what they meant.

What is ours, because transformers' code assumes its own FSDP wrapper: `fully_shard_experts`.
FSDP over "efsdp" alone would average the expert gradients over efsdp ranks only, while the
all-to-all's backward has already summed the contributions of the ep ranks' tokens: the
gradient would be ep times too large. The divide factor is therefore every data-parallel rank.

Also ours: `grad_norm` and `clip_grads_with_norm`, because the gradients now live on two
meshes and torch's clipping helpers stack or foreach across all of them at once.

Costs and limits: the split sizes are read back to the host once per layer (an uneven
all-to-all needs them as integers), so an EP step does wait for the device, and a layer with
EP does not compile with `fullgraph=True` (dynamo: "Unsupported method call" in the dispatch;
`fullgraph=False` compiles, with graph breaks around it). TP x EP is refused: under TP the ranks of a tp group
would each run a slice of the same tokens and their expert gradients would need a sum over tp.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from transformers.distributed.expert_parallel import EpDispatchExpertsParallel, MoEParamShard
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def moe_experts(model: nn.Module) -> list[nn.Module]:
    """The experts modules of every MoE layer, in layer order."""
    return [m for m in model.modules() if isinstance(m, MixtralExperts)]


def _batch_sharing_mesh(ep_mesh: DeviceMesh, tp_mesh: DeviceMesh | None) -> DeviceMesh:
    """The mesh of ranks holding the same tokens, which `AllToAllEP` needs: the "tp" dimension
    of the world mesh that `ep_mesh` was cut from (size 1 without TP)."""
    if tp_mesh is None:
        root = ep_mesh._get_root_mesh()
        if "tp" not in (root.mesh_dim_names or ()):
            raise ValueError(
                "apply_expert_parallel needs the ranks that share a batch: cut ep_mesh from a "
                "world mesh with a 'tp' dimension (size 1 without TP) or pass tp_mesh"
            )
        tp_mesh = root["tp"]
    if tp_mesh.size() > 1:
        raise NotImplementedError(
            f"expert parallel with tp={tp_mesh.size()}: each tp rank would run a slice of the same "
            "tokens and the expert gradients would need a sum over tp, which is not wired yet"
        )
    return tp_mesh


def apply_expert_parallel(
    model: nn.Module, ep_mesh: DeviceMesh, *, tp_mesh: DeviceMesh | None = None
) -> nn.Module:
    """Shard every MoE layer's experts over `ep_mesh` (1-D, named "ep") and route tokens to them
    with all-to-all. Apply before activation checkpointing, compile and FSDP; works on a
    meta-device model (materialize afterwards) and on a materialized one.

    The routing weights stay on the sending rank, so the router and everything outside the
    experts run exactly as without EP; every rank must run the same number of forwards.
    """
    if ep_mesh.ndim != 1 or ep_mesh.mesh_dim_names != ("ep",):
        raise ValueError(f"ep_mesh must be a 1-D mesh named 'ep', got {ep_mesh}")
    experts_modules = moe_experts(model)
    if not experts_modules:
        raise ValueError("apply_expert_parallel needs an MoE model (model.family=moe)")
    num_experts, ep = experts_modules[0].num_experts, ep_mesh.size()
    if num_experts % ep:
        raise ValueError(f"parallel.ep={ep} must divide model.num_experts={num_experts}")
    tp_mesh = _batch_sharing_mesh(ep_mesh, tp_mesh)
    shard_experts = MoEParamShard(Shard(0), shards_expert_dim=True)
    dispatch = EpDispatchExpertsParallel()
    for experts in experts_modules:
        for name in EXPERT_WEIGHTS:
            shard_experts.shard_param(experts, name, ep_mesh)
        # "all_to_all", not "auto": auto would switch to an all-reduce at inference when the ep
        # group holds one shared batch, which never happens on our meshes (ep and tp differ).
        dispatch.install_forward(experts, ep_mesh, tp_mesh=tp_mesh, ep_implementation="all_to_all")
    return model


def _is_expert_parallel(module: nn.Module) -> bool:
    return isinstance(module, MixtralExperts) and isinstance(module.gate_up_proj, DTensor)


def fully_shard_experts(
    layer: nn.Module,
    efsdp_mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP for the EP-sharded experts inside `layer` (a decoder layer, possibly wrapped), over
    `efsdp_mesh`: the data-parallel ranks that hold the same experts (1-D "efsdp", or 2-D
    ("replicate", "efsdp") for HSDP; size 1 is fine). Call it per decoder layer before that
    layer's own `fully_shard`, which then leaves the experts to this group.

    The gradient of an expert is averaged over every data-parallel rank (efsdp x ep, times
    replicate for HSDP), not over efsdp alone: the all-to-all's backward has already summed
    the ep ranks' contributions. The local experts shard on the expert dimension while there
    are at least as many as efsdp ranks, else on each expert's rows (no empty shard).
    """
    for experts in [m for m in layer.modules() if _is_expert_parallel(m)]:
        ep = experts.gate_up_proj.device_mesh.size()
        local_experts = experts.gate_up_proj.to_local().shape[0]
        dim = 0 if local_experts >= efsdp_mesh.size(-1) else 1
        fully_shard(
            experts,
            mesh=efsdp_mesh,
            mp_policy=mp_policy or MixedPrecisionPolicy(),
            reshard_after_forward=reshard_after_forward,
            shard_placement_fn=lambda param, dim=dim: Shard(dim),
        )
        experts.set_gradient_divide_factor(float(efsdp_mesh.size() * ep))
        if efsdp_mesh.device_type != "cuda" and efsdp_mesh.size(-1) > 1:
            # A divide factor other than the group size uses a pre-multiplied sum, which gloo
            # lacks: reduce with a plain sum and divide separately. Not on a 1-rank shard
            # dimension: there FSDP skips the reduce-scatter and divides in its copy, and with
            # a forced sum (torch 2.13) it would divide a second time.
            experts.set_force_sum_reduction_for_comms(True)



def _grads_by_mesh(parameters) -> list[tuple[list[nn.Parameter], list[torch.Tensor]]]:
    groups: dict[object, tuple[list, list]] = {}
    for p in parameters:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            params, grads = groups.setdefault(key, ([], []))
            params.append(p)
            grads.append(p.grad)
    return list(groups.values())


def grad_norm(parameters) -> torch.Tensor:
    """The L2 norm of all gradients: a plain tensor, equal on every rank, no host sync.

    Under EP the gradients live on two meshes (experts on efsdp x ep, the rest on the FSDP
    mesh) and `torch.nn.utils.get_total_norm` refuses to stack norms from different meshes:
    each mesh's norm is reduced over its own ranks first, then the parts combine.
    """
    parts = []
    for _, grads in _grads_by_mesh(parameters):
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        parts.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not parts:
        return torch.tensor(0.0)
    if len(parts) == 1:
        return parts[0]  # one mesh (no EP): exactly torch's norm, so the golden losses hold bitwise
    return torch.linalg.vector_norm(torch.stack(parts))


def clip_grads_with_norm(parameters, max_norm: float, total_norm: torch.Tensor) -> None:
    """`torch.nn.utils.clip_grads_with_norm_` one mesh at a time (a foreach op cannot mix
    meshes); `total_norm` from `grad_norm`."""
    for params, _ in _grads_by_mesh(parameters):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)
