"""Dense Llama and MoE (Mixtral) models built from config, and their parallelization (EP, FSDP2, AC, compile)."""

from snoo_train.models.build import FAMILIES, build_model, init_weights, materialize
from snoo_train.models.decoder import padded_vocab_size
from snoo_train.models.expert_parallel import (
    apply_expert_parallel,
    clip_grads_with_norm,
    fully_shard_experts,
    grad_norm,
    moe_experts,
)
from snoo_train.models.flops import count_parameters, flops_per_token, non_embedding_parameters
from snoo_train.models.llama import llama_config
from snoo_train.models.moe import (
    BiasedTopKRouter,
    RouterStats,
    biased_routers,
    mixtral_config,
    update_router_bias,
)
from snoo_train.models.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    expert_shard_placement,
    parallelize,
)
from snoo_train.models.presets import PRESETS

__all__ = [
    "FAMILIES",
    "PRESETS",
    "BiasedTopKRouter",
    "RouterStats",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_expert_parallel",
    "biased_routers",
    "clip_grads_with_norm",
    "apply_fsdp",
    "build_model",
    "count_parameters",
    "expert_shard_placement",
    "flops_per_token",
    "fully_shard_experts",
    "grad_norm",
    "non_embedding_parameters",
    "init_weights",
    "llama_config",
    "materialize",
    "mixtral_config",
    "moe_experts",
    "padded_vocab_size",
    "parallelize",
    "update_router_bias",
]
