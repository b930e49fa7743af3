"""What one process-group start costs the tests: tests/dist_utils.py's ranks running a body
that does nothing, spawned (how run_distributed started them before) vs forked from the
forkserver that has imported tests.conftest once (how it starts them now).

    python bench/dist_startup.py                  # world sizes 2 and 4, 3 rounds
    python bench/dist_startup.py --rounds 2

Both ways run in ONE process, alternating every round (spawn first, then forkserver first), so
load from other processes hits both alike. The figure that matters is CPU seconds (user + sys)
of all ranks of one start, which that load inflates far less than wall time (printed too). The
forkserver's own start (its imports, once per pytest worker) is reported on its own line.

Writes bench/results/dist_startup.json and prints a table.
"""

from __future__ import annotations

import argparse
import multiprocessing.forkserver as forkserver
import os
import resource
import statistics
import sys
import time

import torch.multiprocessing as mp
from common import REPO, write_report

sys.path.insert(0, str(REPO))  # tests/ is a package of the repository, not an installed one
from tests.dist_utils import _PRELOAD, _worker, free_port  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _nothing(rank: int, world_size: int) -> None:
    """The test body: nothing, so a start's cost is the start (and the gloo group's set-up)."""


def _forkserver_cpu() -> tuple[float, float]:
    """(its own CPU, the CPU of the ranks it forked and reaped), seconds; zeros before it runs."""
    pid = forkserver._forkserver._forkserver_pid
    if not pid:
        return 0.0, 0.0
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) / TICK for x in fields[11:15])
    return utime + stime, cutime + cstime


def _ranks_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + _forkserver_cpu()[1]


def start(method: str, world_size: int) -> tuple[float, float]:
    """One start of `world_size` ranks by `method`: (CPU seconds of all ranks, wall seconds)."""
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
    errors = ctx.SimpleQueue()
    cpu0, wall0 = _ranks_cpu(), time.perf_counter()
    mp.start_processes(
        _worker, args=(world_size, free_port(), _nothing, (), errors, dict(os.environ), os.getcwd()),
        nprocs=world_size, join=True, start_method=method,
    )  # fmt: skip
    return _ranks_cpu() - cpu0, time.perf_counter() - wall0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "dist_startup.json"))
    args = parser.parse_args()

    # The forkserver's one-time start, outside the timed rounds (a pytest worker pays it once).
    wall0 = time.perf_counter()
    start("forkserver", 2)
    forkserver_start = {"cpu_s": _forkserver_cpu()[0], "wall_s": time.perf_counter() - wall0}
    methods = ["spawn", "forkserver"]
    samples = {(m, ws): [] for m in methods for ws in args.world_sizes}
    for r in range(args.rounds):
        for ws in args.world_sizes:
            for method in methods if r % 2 == 0 else reversed(methods):
                samples[method, ws].append(start(method, ws))

    rows = []
    print(f"{'world size':>10} {'start':>10} {'CPU s (median)':>15} {'wall s (median)':>16}")
    for (method, ws), runs in samples.items():
        cpu, wall = statistics.median(c for c, _ in runs), statistics.median(w for _, w in runs)
        rows.append({"method": method, "world_size": ws, "cpu_s": cpu, "wall_s": wall,
                     "samples": [{"cpu_s": c, "wall_s": w} for c, w in runs]})  # fmt: skip
        print(f"{ws:>10} {method:>10} {cpu:>15.2f} {wall:>16.2f}")
    print(f"forkserver's own start (once per pytest worker): {forkserver_start['cpu_s']:.2f} CPU s")
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} cores")
    write_report(
        {"rounds": args.rounds, "preload": _PRELOAD, "forkserver_start": forkserver_start, "rows": rows,
         "load_average_1min": load, "cpus": os.cpu_count()},
        args.out,
    )  # fmt: skip


if __name__ == "__main__":
    main()
