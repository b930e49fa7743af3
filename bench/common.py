"""Pieces the in-process benchmarks share: config composition, exact state bytes, a separate
training process for peak memory, and interleaved (ABBA) timing of several Trainers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from snoo_train.config import Config
from snoo_train.configs import CONFIG_DIR
from snoo_train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


def compose_config(overrides: Sequence[str], run_dir: str) -> Config:
    """The Config `python -m snoo_train.train <overrides>` would run, with its run directory."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg: Config = OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))
    cfg.run_dir = run_dir
    return cfg


def repo_path(path: str | Path) -> str:
    """`path` relative to the repository when it lies inside (results carry no machine's paths);
    absolute otherwise (a scratch directory elsewhere)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved)


def write_report(report: dict, path: str | Path) -> Path:
    """Write a benchmark's JSON (creating bench/results/ if needed) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def state_bytes(trainer: Trainer) -> dict[str, int]:
    """This rank's bytes of parameters, inner optimizer state and SNOO's outer state."""
    out = {"param_bytes": sum(local_bytes(p) for p in trainer.model.parameters())}
    out["inner_state_bytes"] = out["snoo_state_bytes"] = 0
    for state in trainer.optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out["snoo_state_bytes" if key.startswith("snoo_") else "inner_state_bytes"] += local_bytes(value)
    return out


def peak_memory_of_training_run(overrides: Sequence[str], env: dict | None = None) -> int | None:
    """Peak memory (CUDA allocator, or RSS on CPU) of a separate `python -m snoo_train.train`:
    one process cannot attribute its peak to one of two models living in it."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "snoo_train.train", "trainer.progress=false",
               "trainer.eval_interval=0", f"hydra.run.dir={run_dir}", *overrides]  # fmt: skip
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads((Path(run_dir) / "summary.json").read_text())["peak_mem_bytes"]


def time_interleaved(
    trainers: dict[str, Trainer],
    *,
    warmup: int,
    steps: int,
    block: int,
    sync: Callable[[], None] | None = None,
) -> tuple[dict[str, int], dict[str, float], int]:
    """Train every Trainer `warmup` untimed steps, then in timed blocks of `block` steps, the
    order reversed every round (ABBA), so machine noise hits all sides alike.

    `sync` runs before and after each block; by default it waits for the GPU where there is
    one. It must: a training step does not wait for the device (the host queues ahead), so an
    unsynchronised block would time the queueing, not the work.

    Returns (steps trained per name, timed seconds per name, timed steps per name)."""
    if sync is None:
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    names = list(trainers)
    step = dict.fromkeys(names, 0)
    elapsed = dict.fromkeys(names, 0.0)

    def run_block(name: str, n: int, timed: bool) -> None:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            step[name] += 1
            trainers[name].train_step(step[name])
        sync()
        if timed:
            elapsed[name] += time.perf_counter() - t0

    for name in names:
        run_block(name, warmup, timed=False)
    rounds = max(1, steps // block)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            run_block(name, block, timed=True)
    return step, elapsed, rounds * block


def free_port() -> int:
    """A TCP port free on this machine now, for a job's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_ranks(script: str | Path, world_size: int, args: Sequence[str], out: Path, report: str, what: str) -> list[dict]:
    """Run `script args` as a torchrun job of `world_size` ranks (one thread each) and read the
    JSON each rank wrote to `out / report.format(rank=r)`; exit with the job's output if it failed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
           f"--master_port={free_port()}", str(Path(script).resolve()), *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{what} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads((out / report.format(rank=r)).read_text()) for r in range(world_size)]
