"""Downstream evaluation in the loop: lm-evaluation-harness tasks (trainer.downstream_eval) at
the evaluation weights, with the code of `python -m snoo_train.evaluate` (snoo_train/evaluate.py).

Every rank runs the same lm-eval requests, in the same order and batches, through the sharded
model: FSDP's all-gathers (and TP's, EP's collectives) line up because every rank takes the same
forwards, and no rank ever holds the full model. The cost: the evaluation does not get faster
with more data-parallel ranks (each rank scores every request; docs/checkpoints.md). Rank 0 writes
the results. Everything that can fail alike (lm-eval missing, an unknown task, a dataset that
cannot be read) fails before training starts; any error during an evaluation is raised on every
rank (dist.together). lm-eval is imported only when trainer.downstream_eval.tasks is set.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from snoo_train.config import ConfigError
from snoo_train.dist import DistInfo, together


class DownstreamEval:
    """Built before the model (bad tasks fail in seconds); `run(step, ...)` on should_run steps."""

    def __init__(self, cfg, dist: DistInfo):
        self.e, self.max_steps, self.dist = cfg.trainer.downstream_eval, cfg.trainer.max_steps, dist
        self.run_dir = Path(cfg.run_dir or ".")
        self.enabled = bool(self.e.tasks)
        self.done: dict[str, dict[str, Any]] = {}  # the summary's "downstream": step -> scores
        if self.enabled:
            self.opts = {
                "tasks": list(self.e.tasks), "include": self.e.include, "limit": self.e.limit,
                "num_fewshot": self.e.num_fewshot, "batch_size": self.e.batch_size, "device": str(dist.device),
            }  # fmt: skip
            self.manager, self.offline, self.tokenizer = together(lambda: self._prepare(cfg), keep=(ConfigError,))

    def _prepare(self, cfg):
        from snoo_train import evaluate

        try:
            evaluate.check_installed()
            manager, offline = evaluate.prepare(self.opts["tasks"], self.opts["include"])
            evaluate.load_tasks(manager, self.opts, offline)
        except evaluate.EvalError as e:
            raise ConfigError(f"trainer.downstream_eval: {e}") from None
        return manager, offline, evaluate.hf_tokenizer(cfg)

    def should_run(self, step: int) -> bool:
        """Every downstream_eval.interval steps (0: none) and after the last step."""
        if not self.enabled:
            return False
        return step == self.max_steps or (self.e.interval > 0 and step % self.e.interval == 0)

    def run(
        self, step: int, model: nn.Module, weights: Callable[[], AbstractContextManager], autocast: AbstractContextManager
    ) -> dict[str, float]:
        """The tasks at the weights `weights()` swaps in; {"downstream/<task>/<metric>": value}
        on rank 0 (written to <run>/downstream/step_XXXXXXXX.json), {} on the others. Training's
        random state is left as it was (lm-eval seeds Python's, NumPy's and torch's)."""

        def evaluate_here() -> dict[str, float]:
            from snoo_train import evaluate

            with preserved_rng(self.dist.device), weights(), autocast, full_logits(model):
                results = evaluate.run_tasks(model, self.tokenizer, self.manager, self.opts, self.offline)
            if not self.dist.is_main:
                return {}
            out = evaluate.results_path(self.run_dir, step)
            header = {"step": step, "checkpoint": None, "weights": "eval"}
            numbers = evaluate.write_results(out, header, results)
            self.done[str(step)] = {**numbers, "results_file": str(out)}
            return numbers

        return together(evaluate_here)


class preserved_rng:
    """Python's, NumPy's and torch's (CPU and this CUDA device's) random states, restored on exit."""

    def __init__(self, device: torch.device):
        self.devices = [device] if device.type == "cuda" else []

    def __enter__(self):
        self.states = (random.getstate(), np.random.get_state())
        self.fork = torch.random.fork_rng(devices=self.devices)
        self.fork.__enter__()

    def __exit__(self, *exc):
        self.fork.__exit__(*exc)
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])


class full_logits:
    """Tensor parallelism with loss_parallel leaves the logits sharded over the vocabulary (a
    DTensor); lm-eval reads them as one tensor: gathered here, for the evaluation only."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        def gather(_module, _args, out):
            if isinstance(getattr(out, "logits", None), DTensor):
                out.logits = out.logits.full_tensor()
            return out

        self.handle = self.model.register_forward_hook(gather)

    def __exit__(self, *exc):
        self.handle.remove()
