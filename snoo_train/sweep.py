"""Hydra multiruns (`-m`): how the points of one sweep are named, grouped in wandb, and what a
failing point does (it is reported and the sweep goes on; the end lists the failures)."""

from __future__ import annotations

import sys

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from snoo_train.config import Config
from snoo_train.dist import env_rank, print_error


def group_sweep_runs(cfg: Config) -> None:
    """Under `-m` (multirun) the runs of one sweep share a wandb group, the sweep directory, and
    each run is named by its job number and overrides, so wandb shows the sweep as one unit.
    A group or name set in the config wins."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    wb = cfg.logging.wandb
    if wb.group is None:
        wb.group = str(hydra_cfg.sweep.dir)
    if wb.name is None:
        overrides = hydra_cfg.job.override_dirname
        wb.name = f"{hydra_cfg.job.num}" + (f" {overrides}" if overrides else "")


class Sweep:
    """Under `-m`, the points run in this process and those that failed. A failing point is
    reported and the sweep goes on (Hydra's own launcher would end it at the first error, or at
    the end of the batch with one traceback); `main` lists the failures and exits non-zero."""

    points: list[str] = []
    failed: list[str] = []

    @classmethod
    def point(cls) -> str | None:
        """'#N (its overrides)' for a multirun job, None for a single run. The overrides named
        are those the sweep varies (the rest, given once on the command line, are left out)."""
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return None
        given = set(sys.argv[1:])
        overrides = list(hydra_cfg.overrides.task)
        varied = [o for o in overrides if o not in given] or overrides
        return f"#{hydra_cfg.job.num} ({' '.join(varied)})"

    @classmethod
    def report(cls) -> int:
        """After the sweep: one line naming the failed points; the exit status."""
        if not cls.failed:
            return 0
        if env_rank() == 0:
            print(f"error: {len(cls.failed)} of {len(cls.points)} sweep points failed: {', '.join(cls.failed)}", file=sys.stderr)
        return 1


# Hydra's default launcher runs the points one after another in this process; another launcher
# (submitit, joblib) runs each in its own and reports its exit status itself.
IN_PROCESS_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def fail(message: str, *, shared: bool) -> None:
    """Bad input: one line, no traceback, printed once in the job (dist.print_error: `shared`, an
    error every rank raised alike). A single run exits 1; a sweep point is recorded and the sweep
    goes on."""
    point = Sweep.point()
    print_error(f"sweep point {point}: {message}" if point else message, shared=shared)
    if point is None or HydraConfig.get().launcher.get("_target_") != IN_PROCESS_LAUNCHER:
        sys.exit(1)
    Sweep.failed.append(point)
