"""Run a test body in real gloo process groups on CPU (world sizes 2 and 4)."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once into the forkserver that every rank is forked from: a spawned rank spent ~7 s of
# CPU importing torch, transformers and the trainer before its first collective.
_PRELOAD = ["tests.conftest"]


def _worker(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, errors: Any, env: dict, cwd: str
) -> None:
    # The forkserver's environment and directory are those of the first test that used it: take
    # the calling test's, as a spawned rank would.
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # N processes share 2 cores: oversubscription makes tests crawl
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        # gloo can abort a rank whose peer tears down the group while it is still inside a
        # collective: leave together.
        dist.barrier()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown: gloo's C++ statics can abort a finished worker at exit
    # ("terminate called without an active exception", SIGABRT) after the test body passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Start `world_size` fresh processes running fn(rank, world_size, *args); re-raise any
    failure with the failing rank's traceback. `fn` must be a module-level function (it is
    pickled). The processes are forked from a forkserver that has only imported _PRELOAD (it
    never ran a test), so each starts as clean as a spawned one, without the imports."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    errors = ctx.SimpleQueue()
    env = dict(os.environ)
    try:
        mp.start_processes(
            _worker, args=(world_size, free_port(), fn, args, errors, env, os.getcwd()), nprocs=world_size,
            join=True, start_method="forkserver",
        )
    except Exception as exc:
        details = []
        while not errors.empty():
            rank, tb = errors.get()
            details.append(f"--- rank {rank} ---\n{tb}")
        raise AssertionError("distributed test failed:\n" + "\n".join(details)) from exc


def build_layout(run_dir: str, overrides: list[str]):
    """Inside a spawned rank: the Trainer the entry point builds for TINY + overrides, validated at
    this group's world size (the mesh from parallel.replicas / tp / ep / pp), not yet trained."""
    from snoo_train.dist import init_distributed
    from snoo_train.trainer import Trainer
    from tests.conftest import make_config

    cfg = make_config(Path(run_dir), overrides, world_size=dist.get_world_size())
    p = cfg.parallel
    return Trainer(cfg, init_distributed("cpu", replicas=p.replicas, tp=p.tp, ep=p.ep, pp=p.pp))


def fit_layout(run_dir: str, overrides: list[str]):
    """`build_layout`, trained to the end. The Trainer."""
    trainer = build_layout(run_dir, overrides)
    trainer.fit()
    return trainer


def state_like_params(optimizer: torch.optim.Optimizer, params) -> bool:
    """Every non-scalar optimizer state tensor is a DTensor with its parameter's mesh and placements."""
    from torch.distributed.tensor import DTensor

    for p in params:
        for value in optimizer.state[p].values():
            if isinstance(value, torch.Tensor) and value.ndim:
                if not (isinstance(value, DTensor) and value.device_mesh == p.device_mesh
                        and value.placements == p.placements):  # fmt: skip
                    return False
    return True
