"""The memory planner: how many bytes one rank needs to train a config, before any GPU is asked.

    python -m snoo_train.plan model=llama_1b optim=snoo_adamw trainer.batch_size=8 \\
        data.seq_len=4096 world_size=8 [--device-memory 80GiB]

It composes and validates the same config the trainer does (the same overrides, the same
ConfigError for a bad one), builds the model on the meta device, and counts per rank:
parameters, gradients, inner and outer optimizer state, SkipMask's snapshot, activations with
and without checkpointing, FSDP2's in-flight buffers, the loss's logits, and the peak
(snoo_train/plan/memory.py, plan/layout.py, plan/activations.py say how).

From Python: `estimate(cfg, world_size)` returns a `MemoryPlan` of integer byte counts, for the
rank with the largest peak; under parallel.pp `estimate_stages` gives every pipeline rank's
(plan/pipeline.py: a stage's share of the states, its whole stage gathered, the micro-batches
its schedule keeps in flight).
"""

from __future__ import annotations

from snoo_train.plan.memory import MemoryPlan, estimate, estimate_stages

__all__ = ["MemoryPlan", "estimate", "estimate_stages"]
