"""Named model shapes. `configs/model/<name>.yaml` mirrors each entry key for key (a test checks it).

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
}
