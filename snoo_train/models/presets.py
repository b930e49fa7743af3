"""Named model shapes. `snoo_train/configs/groups/model/<name>.yaml` mirrors each entry key for key (a test checks it).

`vocab_size=None` everywhere: the model takes the tokenizer's vocabulary, padded up to a multiple
of 64, so one shape serves the byte tokenizer (257 -> 320) and a 32k-50k BPE tokenizer alike.
Parameter counts below include the (tied) embedding at those vocabularies.
"""

from __future__ import annotations

from snoo_train.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # ~0.11M params at the byte vocab: the CPU test model, a forward/backward in milliseconds.
    "llama_tiny": ModelConfig(
        name="llama_tiny",
        hidden_size=64,
        intermediate_size=172,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=2048,
    ),
    # The scaling study's rungs between llama_tiny (0.091M non-embedding parameters) and
    # llama_small (1.09M): 0.20M and 0.36M non-embedding (bench/scaling.py, +experiment=scaling).
    "llama_mini": ModelConfig(
        name="llama_mini",
        hidden_size=96,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=2048,
    ),
    "llama_midi": ModelConfig(
        name="llama_midi",
        hidden_size=128,
        intermediate_size=344,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=2048,
    ),
    # ~1.1M params at the byte vocab: the CPU benchmark model, ~0.35 s (~6k tokens/s) per
    # 8 x 256-token AdamW training step on one core (torch.set_num_threads(1)).
    "llama_small": ModelConfig(
        name="llama_small",
        hidden_size=128,
        intermediate_size=344,
        num_layers=6,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=2048,
    ),
    # GPT-2 small / Pythia-160m shape: ~124M params at a 50k vocab (~110M at 32k).
    "llama_125m": ModelConfig(
        name="llama_125m",
        hidden_size=768,
        intermediate_size=2048,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        max_seq_len=2048,
    ),
    # Llama-3.2-1B shape (GQA 32/8, theta 5e5): ~1.08B params at a 50k vocab (~1.04B at 32k).
    "llama_1b": ModelConfig(
        name="llama_1b",
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        max_seq_len=4096,
        rope_theta=500000.0,
    ),
    # MoE presets (family=moe: Mixtral classes, snoo_train/models/moe.py). Attention and depth
    # match the dense preset of the same size; the feed-forward block is num_experts SwiGLU
    # experts of moe_intermediate_size, num_experts_per_tok of them per token.
    # ~0.14M total / ~0.10M active params at the byte vocab: the CPU test model.
    "moe_tiny": ModelConfig(
        name="moe_tiny",
        family="moe",
        hidden_size=64,
        intermediate_size=172,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=2048,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
    ),
    # ~3.5M total / ~1.1M active at the byte vocab: active size and shape of llama_small (two
    # experts of 172 = one dense MLP of 344), so the two compare at equal active compute.
    "moe_small": ModelConfig(
        name="moe_small",
        family="moe",
        hidden_size=128,
        intermediate_size=344,
        num_layers=6,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=2048,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=172,
    ),
    # ~1.0B total / ~0.22B active at a 50k vocab (~0.99B / 0.20B at 32k): OLMoE-1B-7B's routing
    # (64 experts, top-8, active/total ~ 0.2) at a 1B total budget.
    "moe_1b": ModelConfig(
        name="moe_1b",
        family="moe",
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=16,
        num_heads=16,
        num_kv_heads=8,
        max_seq_len=4096,
        rope_theta=500000.0,
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=288,
    ),
}
