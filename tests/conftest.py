"""What the tests share: the entry-point runner, the small configs every test trains with, and
one finished run that the checkpoint and fault tests copy instead of training their own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from snoo_train.config import Config, validate_config
from snoo_train.configs import CONFIG_DIR
from snoo_train.dist import init_distributed
from snoo_train.trainer import Trainer
from tests.dist_utils import free_port

REPO = Path(__file__).resolve().parents[1]
VOCAB = 257  # the byte tokenizer's
PEAK = 1e12  # a made-up device peak, so that the CPU runs report MFU
K = 5  # SNOO period in the TINY runs: steps 5 and 10 are outer steps
STEPS = 12

# A few seconds per run on one CPU core: tiny model, short windows, a slice of the corpus.
QUICK = [
    "model=llama_tiny",
    "trainer=quick",
    "trainer.max_steps=30",
    "trainer.batch_size=8",
    "data.seq_len=64",
    "data.max_documents=200",
    f"trainer.peak_flops={PEAK}",
]
# Tiny model, short windows, a slice of the corpus: a run is a second or two in-process.
TINY = [
    "model=llama_tiny",
    "trainer=quick",
    f"trainer.max_steps={STEPS}",
    "trainer.batch_size=8",
    "trainer.log_interval=1",
    "trainer.eval_interval=6",
    "trainer.warmup_steps=2",
    "data.seq_len=64",
    "data.max_documents=200",
    "optim=snoo_adamw",
    f"optim.k={K}",
]


def make_config(run_dir: Path, overrides: list[str] = (), *, world_size: int = 1) -> Config:
    """The Config the entry point would run for TINY + overrides, validated for `world_size`."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg: Config = OmegaConf.to_object(compose(config_name="config", overrides=TINY + list(overrides)))
    cfg.run_dir = str(run_dir)
    validate_config(cfg, world_size=world_size)
    return cfg


def run_trainer(run_dir: Path, overrides: list[str] = ()) -> Trainer:
    trainer = Trainer(make_config(run_dir, overrides), init_distributed("cpu"))
    trainer.fit()
    return trainer



# -- the entry point -------------------------------------------------------------------------------


def entry_env() -> dict[str, str]:
    # One thread per process: the 2-rank run shares 2 cores. The interpreter's own bin/ first on
    # PATH: launch/*.sh call `torchrun`, which must be this environment's, activated or not.
    return dict(
        os.environ,
        PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
    )


def run_entry(
    args: list[str], cwd: Path, *, nproc: int = 1, timeout: float = 240, env: dict | None = None, **popen
) -> subprocess.CompletedProcess:
    """`python -m snoo_train.train ARGS` (torchrun with nproc > 1), output captured; `env`
    replaces entry_env(), `popen` goes to subprocess.run (e.g. preexec_fn)."""
    launcher = [sys.executable, "-m", "snoo_train.train"]
    if nproc > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            "-m",
            "snoo_train.train",
        ]
    return subprocess.run(
        launcher + args, cwd=cwd, env=env or entry_env(), capture_output=True, text=True, timeout=timeout, **popen
    )


def train(
    args: list[str], cwd: Path, *, nproc: int = 1, timeout: float = 240
) -> subprocess.CompletedProcess:
    proc = run_entry(args, cwd, nproc=nproc, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def compose_config(overrides: list[str] = (), *, hydra: bool = False):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def typed(overrides: list[str] = ()) -> Config:
    return OmegaConf.to_object(compose_config(overrides))



# -- one finished run ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """TINY trained in-process once: 12 steps of SNOO(AdamW), k=5, checkpoints at 6 and 12."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_trainer(run_dir, ["checkpoint.interval=6"])
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    return run_dir


def poison_losses(monkeypatch, steps: set[int]) -> None:
    """Make the training loss of the given optimizer steps NaN (as a bad batch or an overflow
    would), counting one training forward per step (one micro-batch per step in these runs) or,
    under a pipeline, one `Pipeline.train` per step, whose micro-batch losses the last stage
    computes (trainer/pipeline.py; torch's shape inference calls that loss once more, at step 1)."""
    import torch

    import snoo_train.trainer.pipeline as pipeline_module
    import snoo_train.trainer.step as step_module

    original, calls = step_module.causal_lm_loss, {"n": 0}
    original_train, original_microbatch = pipeline_module.Pipeline.train, pipeline_module._next_token_loss

    def loss(model, batch, reduction="mean", router=None):
        out = original(model, batch, reduction=reduction, router=router)
        if model.training:
            calls["n"] += 1
            if calls["n"] in steps:
                return out * float("nan")
        return out

    def train(self, batch):
        calls["n"] += 1
        return original_train(self, batch)

    def microbatch_loss(logits, labels, reduction="mean"):
        out = original_microbatch(logits, labels, reduction)
        # Not the forward-only evaluation (no grad there).
        return out * float("nan") if torch.is_grad_enabled() and calls["n"] in steps else out

    monkeypatch.setattr(step_module, "causal_lm_loss", loss)
    monkeypatch.setattr(pipeline_module.Pipeline, "train", train)
    # Read when the Pipeline is built: patched before the Trainer is.
    monkeypatch.setattr(pipeline_module, "_next_token_loss", microbatch_loss)


def poison_gradients(monkeypatch, steps: set[int]) -> None:
    """Make one gradient element of the given optimizer steps NaN on this rank (as an overflow in
    one shard's backward would) while the loss stays finite, counting one clip per step."""
    from torch.distributed.tensor import DTensor

    import snoo_train.trainer.step as step_module

    original, calls = step_module.clip_grad_norm, {"n": 0}

    def clip(params, max_norm, combine=None):
        params = list(params)
        calls["n"] += 1
        if calls["n"] in steps:
            for p in params:
                grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                if grad is not None and grad.numel():
                    grad.view(-1)[0] = float("nan")
                    break
        return original(params, max_norm, combine)

    monkeypatch.setattr(step_module, "clip_grad_norm", clip)
