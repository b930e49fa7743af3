"""trainer.profile: a torch profiler trace of chosen steps on rank 0, viewable in Perfetto.

    python -m snoo_train.train trainer.profile.enabled=true trainer.profile.start_step=5 \
        trainer.profile.num_steps=2 [trainer.profile.memory_snapshot=true]   # CUDA only

writes <run_dir>/profile/trace_steps_5-6_rank0.json (Chrome trace JSON: open it in
ui.perfetto.dev or chrome://tracing) and, with memory_snapshot, memory_steps_5-6_rank0.pickle
(drop it on pytorch.org/memory_viz). Each profiled step is one `step N` range in the trace. The
whole step is profiled: forward, backward, optimizer, and the logging, evaluation and checkpoint
work the step does. Profiling slows the profiled steps; their tokens/s reads low.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from snoo_train.config import ConfigError

log = logging.getLogger("snoo_train")


class StepProfiler:
    """Decides itself which steps it records (the loop wraps every step in `step(n)`)."""

    def __init__(self, cfg, run_dir: str, dist):
        self.cfg = cfg
        self.enabled = bool(cfg.enabled) and dist.is_main
        self.device = dist.device
        self.first, self.last = cfg.start_step, cfg.start_step + cfg.num_steps - 1
        self.dir = os.path.join(run_dir, "profile")
        self._profile: profile | None = None
        if cfg.enabled and cfg.memory_snapshot and dist.device.type != "cuda":
            raise ConfigError(
                f"trainer.profile.memory_snapshot=true records the CUDA allocator's history; this run is on "
                f"{dist.device.type}: set it to false (the trace itself works on any device)"
            )

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        if not self.enabled or not self.first <= step <= self.last:
            yield
            return
        if self._profile is None:  # the first profiled step (or the first after a resume inside the range)
            self._start(step)
        with record_function(f"step {step}"):
            yield
        if step == self.last:
            self._finish()

    def _start(self, step: int) -> None:
        self.first = step
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
            if self.cfg.memory_snapshot:
                torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        self._profile = profile(
            activities=activities, record_shapes=self.cfg.record_shapes, with_stack=self.cfg.with_stack
        )
        self._profile.__enter__()

    def _finish(self) -> None:
        if self._profile is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the last step's kernels belong in the trace
        self._profile.__exit__(None, None, None)
        os.makedirs(self.dir, exist_ok=True)
        name = f"steps_{self.first}-{self.last}_rank0"
        trace = os.path.join(self.dir, f"trace_{name}.json")
        self._profile.export_chrome_trace(trace)
        self._profile = None
        log.info("trainer.profile: trace of steps %d-%d in %s (open it in ui.perfetto.dev)", self.first, self.last, trace)
        if self.device.type == "cuda" and self.cfg.memory_snapshot:
            snapshot = os.path.join(self.dir, f"memory_{name}.pickle")
            torch.cuda.memory._dump_snapshot(snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
            log.info("trainer.profile: memory snapshot in %s (open it in pytorch.org/memory_viz)", snapshot)

    def close(self) -> None:
        """A run that ends (or fails) inside the profiled steps: stop recording, write nothing."""
        if self._profile is not None:
            self._profile.__exit__(None, None, None)
            self._profile = None
            if self.device.type == "cuda" and self.cfg.memory_snapshot:
                torch.cuda.memory._record_memory_history(enabled=None)
