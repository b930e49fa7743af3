"""The Hydra entry point: compose the config, validate it, join the process group, train.

    python -m snoo_train.train [overrides]                          # one process
    torchrun --nproc_per_node=N -m snoo_train.train [overrides]      # N ranks, FSDP2
    snoo-train [overrides]                                           # the console script

Everything else lives in the library: snoo_train/trainer/ (the loop and its components),
snoo_train/configs/ (the YAML groups and the schema they merge into).
"""

from __future__ import annotations

# Catch SIGTERM/SIGUSR1 from the first moment, before the slow imports below (torch,
# transformers: seconds), so a preemption during start-up ends in the requeue status 75 instead
# of killing the process (snoo_train/preemption.py). The console script does the same (cli.py).
if __name__ == "__main__":
    from snoo_train.preemption import install_process_handler

    install_process_handler()

import json
import logging
import os
import sys
import traceback
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from snoo_train.checkpoint import CheckpointError
from snoo_train.config import Config, ConfigError
from snoo_train.configs import CONFIG_DIR, accept_async_alias, reject_unknown_keys
from snoo_train.data import DataError
from snoo_train.dist import (
    agree,
    broadcast_object,
    compare_errors,
    destroy_distributed,
    env_rank,
    env_world_size,
    exit_process,
    init_distributed,
    raised_alike,
    raised_on_every_rank,
)
from snoo_train.metrics import check_wandb_online
from snoo_train.models.pretrained import apply_pretrained
from snoo_train.preemption import REQUEUE_EXIT_CODE, Preempted, report_requeue_status
from snoo_train.rundir import lock_run_dir
from snoo_train.sweep import Sweep, fail, group_sweep_runs
from snoo_train.trainer import Trainer, TrainingDiverged

log = logging.getLogger("snoo_train")


def run(cfg: Config, run_dir: str) -> dict[str, Any]:
    """Validate, join the process group, train, and leave the group. Rank 0 writes the files."""
    with raised_alike(ConfigError):  # a check of the config every rank holds
        apply_pretrained(cfg, env_world_size())  # validate_config, with the checkpoint's shape
    p = cfg.parallel
    info = init_distributed(cfg.trainer.device, replicas=p.replicas, tp=p.tp, ep=p.ep, pp=p.pp)
    clean = False
    try:
        if not info.is_main:
            log.setLevel(logging.WARNING)
        # Hydra resolves ${now:} per process: rank 0's run directory is the one all ranks use.
        cfg.run_dir = broadcast_object(os.path.abspath(run_dir))
        # Before anything is built or written: wandb.init would find out minutes later.
        agree(info, lambda: check_wandb_online(cfg.logging.wandb), (ConfigError,))
        lock = lock_run_dir(cfg.run_dir, info)  # one run per run directory
        try:
            if lock is not None and lock.stale_holder:
                log.warning("took over the run directory lock of a run that ended without releasing it (%s)", lock.stale_holder)
            trainer = Trainer(cfg, info)
            if info.is_main:
                # After the resume checks: a refused resume leaves the recorded config as it was.
                # From here on it is the truth, changed hyper-parameters included.
                OmegaConf.save(OmegaConf.structured(cfg), os.path.join(cfg.run_dir, "config.yaml"))
            summary = trainer.fit()
        except (Preempted, TrainingDiverged):
            clean = True  # every rank stopped at the same step
            raise
        except Exception as e:
            compare_errors(e)  # the same on every rank (an agreed refusal): printed once, by rank 0
            clean = raised_on_every_rank(e)  # then every rank is here to leave together
            raise
        finally:
            if lock is not None:
                lock.release()
        if info.is_main:
            with open(os.path.join(cfg.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            log.info(
                "done: %d steps, final val_loss %.4f, %.0f tokens/s, %.1f s training; %s",
                summary["steps"], summary["final_val_loss"], summary["tokens_per_s"], summary["train_time_s"], cfg.run_dir,
            )  # fmt: skip
        clean = True
        return summary
    finally:
        destroy_distributed(clean=clean)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    point = Sweep.point()
    if point is not None:
        Sweep.points.append(point)
    try:
        with raised_alike(ConfigError):  # the same config on every rank
            reject_unknown_keys(dcfg)
            cfg: Config = OmegaConf.to_object(dcfg)
        group_sweep_runs(cfg)
        run(cfg, HydraConfig.get().runtime.output_dir)
    except Preempted as e:
        # The checkpoint is on disk: exit with the status the launchers turn into a requeue (a
        # sweep stops here too: the requeued job starts it again).
        if env_rank() == 0:
            print(f"preempted: {e}; resume with trainer.resume=auto", file=sys.stderr)
        report_requeue_status()  # every node's launcher reads its own file
        sys.exit(REQUEUE_EXIT_CODE)
    except (ConfigError, DataError, TrainingDiverged, CheckpointError, FileNotFoundError) as e:
        # Bad input gets one clear line, not a traceback.
        fail(str(e), shared=raised_on_every_rank(e))
    except Exception as e:
        if point is None:
            raise  # a single run: the traceback, as from any program
        # A fault of the code, not of the input: the traceback helps; the other points still run.
        traceback.print_exc()
        fail(f"{type(e).__name__}: {e}", shared=raised_on_every_rank(e))


def main() -> None:
    sys.argv = accept_async_alias(sys.argv)
    if env_world_size() > 1 and env_rank() > 0:
        # Only rank 0 keeps Hydra's run directory (.hydra/, train.log). The others would create
        # their own, named by their own clock; they learn rank 0's directory after start-up.
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    try:
        _hydra_main()
        status: int | str | None = Sweep.report()
    except SystemExit as e:
        status = e.code
    exit_process(status)


if __name__ == "__main__":
    main()
