"""The memory planner (snoo_train/plan) against the measured peak of real CPU training runs.

    python bench/plan_check.py                       # 12 runs: adamw, snoo_adamw x AC off/on x ws 1, 2, 4
    python bench/plan_check.py --world-sizes 1 --optims adamw --checkpointing off model=llama_tiny
    python bench/plan_check.py --world-sizes 2 4 --schedules 1F1B GPipe Interleaved1F1B --out bench/results/plan_check_cpu_pp.json parallel.pp=2 parallel.pp_microbatches=4 model.tie_embeddings=false

Trailing key=value overrides replace the defaults below (the test suite runs it on llama_tiny).

Each configuration trains in fresh processes (torchrun with gloo for world size > 1, one thread
per rank) through the real Trainer for --steps steps (SNOO with optim.k=2, so an outer step and its
temporaries are inside the window). What is measured is the training-attributable peak of each
rank: its peak RSS (VmHWM) during the steps minus its RSS just before the model is built.

Why that is defensible on CPU: a process's RSS is mostly the Python/torch baseline and the corpus,
which the planner does not model; both exist before the model is built and do not grow after.
VmHWM is reset to the current RSS at that moment (`echo 5 > /proc/self/clear_refs`), so the
difference is the high-water mark of everything training allocates: parameters, gradients,
optimizer state, activations, FSDP's buffers, gloo's. glibc would keep freed memory mapped and
move its mmap threshold up as the step frees large blocks, so the ranks run with
MALLOC_MMAP_THRESHOLD_=65536: every tensor of 64 KiB or more is its own mapping, returned on
free, so RSS follows the live tensors (small ones stay in the heap; they are a rounding error at
this model size). Pages count when touched; torch writes every tensor it allocates here.

The model is llama_small widened (hidden 512, 4 layers, ~14M parameters at the byte vocabulary)
with 8 x 128-token batches, so that optimizer state and activations are of one size and both
show in the peak. Writes bench/results/plan_check_cpu.json and prints planned vs measured.

bf16 on CPU (trainer.mixed_precision=bf16, FSDP2's MixedPrecisionPolicy; plan_check_cpu_bf16.json)
measures a constant 18-26 MiB per rank above the plan: the same with 4 or 8 layers and with 4 or
8 sequences per rank, so no tensor whose size follows the model or the batch. CPU bf16 kernels bring their
own pages (a first bf16 matmul + SDPA alone raises RSS by 7.5 MiB on this machine); a CUDA
allocator's peak counts tensors only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, compose_config, write_report

from snoo_train.config import validate_config
from snoo_train.plan import estimate

MODEL = ["model=llama_small", "model.hidden_size=512", "model.intermediate_size=1376", "model.num_layers=4",
         "model.num_heads=8", "model.num_kv_heads=4"]  # fmt: skip
BASE = [*MODEL, "trainer.device=cpu", "trainer.batch_size=8", "data.seq_len=128", "data.max_documents=200",
        "trainer.progress=false", "trainer.eval_interval=0", "optim.k=2", "checkpoint.interval=0"]  # fmt: skip


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(out_dir: str, overrides: list[str], steps: int) -> None:
    """One rank: build data, reset the high-water mark, build and train, report the rise."""
    from snoo_train.dist import env_world_size, init_distributed
    from snoo_train.trainer import Trainer

    class MeasuredTrainer(Trainer):
        def _build_model(self) -> None:
            # After the data and the process group, before anything of the model exists.
            Path("/proc/self/clear_refs").write_text("5")
            self.rss_before_kib = _status_kib("VmRSS")
            super()._build_model()

    cfg = compose_config(overrides, tempfile.mkdtemp(prefix="plan_check_"))
    validate_config(cfg, world_size=env_world_size())
    p = cfg.parallel
    info = init_distributed("cpu", replicas=p.replicas, tp=p.tp, ep=p.ep, pp=p.pp)
    trainer = MeasuredTrainer(cfg, info)
    for step in range(1, steps + 1):
        trainer.train_step(step)
    float(trainer.train_step(steps + 1)[0])  # the last step's work done before reading
    rise = 1024 * (_status_kib("VmHWM") - trainer.rss_before_kib)
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps({"rank": info.rank, "peak_rise_bytes": rise}))
    trainer.metrics.close()


def measure(overrides: list[str], world_size: int, steps: int) -> list[dict]:
    """Run one configuration in fresh processes; every rank's measured rise."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", WANDB_MODE="disabled",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        script = [str(Path(__file__).resolve()), "--worker", out, "--steps", str(steps), *overrides]
        launcher = [sys.executable]
        if world_size > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
        done = subprocess.run(launcher + script, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"run failed ({overrides}, ws {world_size}):\n{done.stderr[-3000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def check(optim: str, ac: bool, world_size: int, steps: int, extra: list[str]) -> dict:
    overrides = [*BASE, f"optim={optim}", f"trainer.activation_checkpointing={str(ac).lower()}", *extra]
    cfg = compose_config(overrides, ".")
    plan = estimate(cfg, world_size)
    ranks = measure(overrides, world_size, steps)
    measured = max(r["peak_rise_bytes"] for r in ranks)
    return {
        "optim": optim, "activation_checkpointing": ac, "world_size": world_size,
        "planned_peak_bytes": plan.peak_bytes, "measured_peak_bytes": measured,
        "ratio_measured_over_planned": measured / plan.peak_bytes,
        "measured_per_rank_bytes": [r["peak_rise_bytes"] for r in ranks], "plan": plan.as_dict(),
        # Each rank's own plan: under parallel.pp the stages differ (plan/pipeline.py).
        "planned_per_rank_bytes": [estimate(cfg, world_size, rank=r).peak_bytes for r in range(world_size)],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--optims", nargs="+", default=["adamw", "snoo_adamw"])
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--schedules", nargs="+", default=[None],
                        help="parallel.pp_schedule of each run (with parallel.pp > 1 among the overrides)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "plan_check_cpu.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after the base ones)")
    args = parser.parse_intermixed_args()
    overrides = args.overrides
    if args.worker:
        return worker(args.worker, overrides, args.steps)
    rows = []
    print(f"{'schedule':<16}{'optim':<12}{'AC':>4}{'ws':>4}{'planned MiB':>13}{'measured MiB':>14}{'ratio':>8}")
    runs = [(s, o, c == "on", ws) for s in args.schedules for o in args.optims for c in args.checkpointing for ws in args.world_sizes]
    for schedule, optim, ac, ws in runs:
        extra = overrides + ([f"parallel.pp_schedule={schedule}"] if schedule else [])
        r = check(optim, ac, ws, args.steps, extra) | ({"pp_schedule": schedule} if schedule else {})
        rows.append(r)
        print(f"{schedule or '-':<16}{optim:<12}{'on' if ac else 'off':>4}{ws:>4}{r['planned_peak_bytes'] / 2**20:>13.1f}"
              f"{r['measured_peak_bytes'] / 2**20:>14.1f}{r['ratio_measured_over_planned']:>8.3f}", flush=True)  # fmt: skip
    ratios = [r["ratio_measured_over_planned"] for r in rows]
    report = {
        "benchmark": "plan_check",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python bench/plan_check.py", *sys.argv[1:]]),
        "overrides": BASE + overrides,
        "steps": args.steps,
        "measurement": "per rank: VmHWM during the steps minus VmRSS before the model is built (clear_refs 5), "
        "MALLOC_MMAP_THRESHOLD_=65536; the max over ranks; planned: estimate's peak_bytes (rank 0's, or under "
        "parallel.pp the pipeline rank's with the largest peak); planned_per_rank_bytes: each rank's own plan",
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "rows": rows,
    }  # fmt: skip
    print(f"measured / planned: {min(ratios):.3f} .. {max(ratios):.3f}")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
    if "--worker" in sys.argv:
        from snoo_train.dist import exit_process

        exit_process(0)  # a torchrun rank: leave without gloo's teardown (snoo_train/dist.py)
