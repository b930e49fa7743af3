"""Pipeline parallelism: a decoder model cut into stages of contiguous layers, run by a schedule
of torch.distributed.pipelining (1F1B, GPipe, interleaved and zero-bubble).

Each stage is a `StageModel`: the first holds the token embedding, the last the final norm and
the head, every stage its decoder layers and a copy of the rotary embedding (a buffer, no
weights). The stage keeps transformers' own submodules under their original names
(`model.layers.5...` stays layer 5 on whichever stage holds it), so a stage's state dict is a
slice of the whole model's: distributed checkpoints reshard between pipelined and unpipelined
layouts, the seeded init draws the same values, and an export reads the same keys.

Stage s of S = P x V (P pipeline ranks, V stages per rank) lives on pp rank s % P ("loop": 1F1B,
GPipe, the interleaved schedules) or, for the V-shaped ZBV schedule, on rank s for s < P and
2P - 1 - s after, so that rank 0 holds the first and the last stage.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard


def split_layers(num_layers: int, stages: int, layers_per_stage: list[int] | None = None) -> list[list[int]]:
    """The decoder layer indices of each stage: `layers_per_stage` when given, else an even split."""
    sizes = list(layers_per_stage) if layers_per_stage else [num_layers // stages] * stages
    out, start = [], 0
    for n in sizes:
        out.append(list(range(start, start + n)))
        start += n
    return out


def stages_of_rank(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The stage indices pipeline rank `pp_rank` holds, in order."""
    if schedule == "ZBVZeroBubble":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(stages_per_rank)]


class StageLayers(nn.ModuleList):
    """A stage's decoder layers under their whole-model indices (`layers.5` stays `layers.5`),
    iterated, indexed and assigned by position like the ModuleList they were cut from, so that
    checkpointing, compile, tensor and expert parallelism and FSDP apply to a stage unchanged."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        for i, layer in layers.items():
            self.add_module(str(i), layer)

    def _key(self, position: int) -> str:
        return list(self._modules)[position]

    def __getitem__(self, position):  # type: ignore[override]
        if isinstance(position, slice):
            return list(self._modules.values())[position]
        return self._modules[self._key(position)]

    def __setitem__(self, position: int, module: nn.Module) -> None:  # type: ignore[override]
        setattr(self, self._key(position), module)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def indices(self) -> list[int]:
        return [int(k) for k in self._modules]


class _AuxiliaryLoss(torch.autograd.Function):
    """Identity on `hidden` whose backward also sends a gradient of 1 into `aux`: the auxiliary
    loss is trained as if added to the final loss (the schedule then scales both by 1 / M)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        # A copy, not a view: FSDP cannot keep its pre-backward hook on a returned view.
        return hidden.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


class StageModel(nn.Module):
    """One pipeline stage of a transformers causal LM (Llama or Mixtral), built from the whole
    model's modules (on the meta device), under their original names.

    forward(x): token ids [b, t] on the first stage, else the previous stage's hidden states
    (under tensor parallelism this rank's sequence shard [b, t / T, h]); returns hidden states
    (likewise sharded) or, on the last stage, the logits. Positions are 0..t-1 (packed windows,
    no padding) and attention is causal without a mask, as in trainer/step.py's forward."""

    def __init__(self, whole: nn.Module, layers: list[int], *, first: bool, last: bool):
        super().__init__()
        self.config = whole.config
        self.first, self.last = first, last
        body = nn.Module()
        if first:
            body.embed_tokens = whole.model.embed_tokens
        body.layers = StageLayers({i: whole.model.layers[i] for i in layers})
        if last:
            body.norm = whole.model.norm
        # One per stage: a buffer recomputed at materialize (models/build.py reset_rotary).
        body.rotary_emb = type(whole.model.rotary_emb)(whole.config)
        self.model = body
        if last:
            self.lm_head = whole.lm_head
        self.tp_mesh: DeviceMesh | None = None  # set by the trainer under tensor parallelism
        # MoE: the trainer's RouterStats; the stage adds its layers' balancing loss (see _balance).
        self.router_stats = None
        self._router_logits: list[torch.Tensor] = []
        self.aux_loss = None  # coef x weighted balancing loss summed over this step's micro-batches
        for layer in self.model.layers:
            gate = getattr(getattr(layer, "mlp", None), "gate", None)
            if gate is not None and hasattr(whole.config, "num_local_experts"):
                gate.register_forward_hook(self._keep_router_logits)
        # A stage's parameters all sit on it; the trainer's list of stages on this rank (one
        # object unless the schedule interleaves), a plain attribute: not a submodule.
        self.pipeline_stages: list[StageModel] = [self]

    def get_output_embeddings(self) -> nn.Module | None:
        """transformers' accessor, which optimizers read to tell the head from other matrices."""
        return getattr(self, "lm_head", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp = 1 if self.tp_mesh is None else self.tp_mesh.size()
        if self.first:
            hidden, seq = self.model.embed_tokens(x), x.shape[1]
        else:
            hidden, seq = x, x.shape[1] * tp
            if self.tp_mesh is not None:
                hidden = DTensor.from_local(hidden, self.tp_mesh, [Shard(1)], run_check=False)
        local = hidden.to_local() if isinstance(hidden, DTensor) else hidden
        positions = torch.arange(seq, device=local.device).unsqueeze(0)
        cos_sin = self.model.rotary_emb(local, positions)
        for layer in self.model.layers:
            hidden = layer(hidden, attention_mask=None, position_embeddings=cos_sin, position_ids=positions)
        hidden = self._balance(hidden)
        if self.last:
            return self.lm_head(self.model.norm(hidden))
        # Sent to the next stage as a plain tensor; a copy, not the DTensor's view (see _AuxiliaryLoss).
        return hidden.to_local().clone() if isinstance(hidden, DTensor) else hidden

    def _keep_router_logits(self, module: nn.Module, args, output) -> None:
        if self.router_stats is not None and torch.is_grad_enabled():
            self._router_logits.append(output[0])

    def _balance(self, hidden: torch.Tensor) -> torch.Tensor:
        """MoE training: the balancing loss of this stage's layers (transformers' Mixtral formula
        over them), weighted by their share of all layers, so that a balanced router costs the
        same as in one process. It cannot reach the loss on the last stage, so its gradient
        enters here, on the hidden states (`_AuxiliaryLoss`)."""
        logits, self._router_logits = self._router_logits, []
        if not logits:
            return hidden
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        c = self.config
        aux = load_balancing_loss_func(tuple(logits), c.num_local_experts, c.num_experts_per_tok)
        weight = len(self.model.layers) / c.num_hidden_layers
        self.router_stats.record(aux, logits, self.model.layers.indices(), weight)
        scaled = self.router_stats.coef * weight * aux
        self.aux_loss = scaled.detach() if self.aux_loss is None else self.aux_loss + scaled.detach()
        return _AuxiliaryLoss.apply(hidden, scaled)


class PipelineRank(nn.Module):
    """Every stage one pipeline rank holds, under the whole model's names: the module the
    optimizer, checkpoints and the evaluator see when a schedule puts two or more stages on a
    rank. It shares the stages' submodules and never runs forward itself (the schedule runs
    `pipeline_stages`)."""

    def __init__(self, stages: list[StageModel]):
        super().__init__()
        self.config = stages[0].config
        body = nn.Module()
        layers: dict[int, nn.Module] = {}
        for stage in stages:
            layers.update(zip(stage.model.layers.indices(), stage.model.layers))
            for name in ("embed_tokens", "norm"):
                if hasattr(stage.model, name):
                    setattr(body, name, getattr(stage.model, name))
            if stage.last:
                self.lm_head = stage.lm_head
        body.layers = StageLayers(dict(sorted(layers.items())))
        self.model = body
        # Buffers only (no state-dict keys): held here so that materialize reaches them.
        self.stage_rotary = nn.ModuleList([s.model.rotary_emb for s in stages])
        self.pipeline_stages = stages

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self, "lm_head", None)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a PipelineRank runs through its schedule (models/pipeline.py), not forward()")


def split_model(
    whole: nn.Module, *, pp_rank: int, pp: int, stages_per_rank: int, schedule: str,
    layers_per_stage: list[int] | None = None,
) -> tuple[list[StageModel], list[int]]:  # fmt: skip
    """This rank's stages of `whole` (built on the meta device) and their stage indices."""
    total = pp * stages_per_rank
    layers = split_layers(whole.config.num_hidden_layers, total, layers_per_stage)
    indices = stages_of_rank(pp_rank, pp, stages_per_rank, schedule)
    stages = [StageModel(whole, layers[s], first=s == 0, last=s == total - 1) for s in indices]
    return stages, indices


def rank_model(stages: list[StageModel]) -> nn.Module:
    """The one module standing for this rank's part of the model (see PipelineRank)."""
    return stages[0] if len(stages) == 1 else PipelineRank(stages)


def pipeline_stages(model: nn.Module) -> list[nn.Module]:
    """The stage modules of a pipelined model (empty for a whole model)."""
    return list(getattr(model, "pipeline_stages", []))


def all_modules(model: nn.Module) -> list[nn.Module]:
    """`model.modules()` and, for a rank holding several pipeline stages, the stage modules
    (the FSDP roots of the embedding, norm and head), each once."""
    seen: dict[int, nn.Module] = {}
    for root in [model, *pipeline_stages(model)]:
        for m in root.modules():
            seen.setdefault(id(m), m)
    return list(seen.values())
