"""The step path before and after issue 21: tokens/s of one model trained "before" and "after"
(two lists of Hydra overrides), through the real trainer, in ONE process, in alternating blocks
of steps (ABBA: bench/common.py time_interleaved), so the ratio is measured in one run. Each
side is two Trainers, one built first and one last (BUILD_ORDER), each trained --steps steps.

    python bench/step_path.py                    # llama_small; before: data.prefetch=0, after: data.prefetch=2
    python bench/step_path.py --before data.prefetch=0 optim.implementation=foreach --after data.prefetch=2
    python bench/step_path.py --model llama_tiny --steps 4 --block 2 --warmup 1   # a smoke run

Extra positional arguments are Hydra overrides applied to both sides. The tokens/s ratio is that
of the median step times (robust to bursts of other work on a shared machine; the ratio of the
timed blocks' totals is kept too). Each side also reports the process's CPU seconds per step,
the time the training thread spent getting each step's batches (`Trainer.loader.next_step`:
assembling them with data.prefetch=0, taking them off the queue with prefetching) and its
validation loss after the same steps: with the same optimizer code on both sides the losses
are equal, as prefetching changes no batch. Prints a table and writes JSON
(bench/results/step_path_<model>_<device>.json by default).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from common import REPO, compose_config, time_interleaved, write_report

from snoo_train.config import Config, validate_config
from snoo_train.dist import init_distributed
from snoo_train.trainer import Trainer

SIDES = ("before", "after")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_small")
    parser.add_argument("--before", nargs="+", default=["data.prefetch=0"], help="overrides of the 'before' side")
    parser.add_argument("--after", nargs="+", default=["data.prefetch=2"], help="overrides of the 'after' side")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side")
    parser.add_argument("--block", type=int, default=5, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both sides")
    args = parser.parse_intermixed_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def make_config(side_overrides: list[str], args: argparse.Namespace, run_dir: str) -> Config:
    cfg = compose_config(
        [f"model={args.model}", *args.overrides, *side_overrides, "trainer.progress=false",
         "trainer.eval_interval=0", "logging.wandb.mode=disabled", "checkpoint.interval=0"],
        run_dir,
    )  # fmt: skip
    validate_config(cfg)
    cfg.trainer.max_steps = args.warmup + args.steps
    return cfg


def instrument(trainer: Trainer) -> dict[str, list[float]]:
    """Record, from now on, the seconds of each step (`train_step`: a machine busy with other
    work slows some steps, and the median shrugs them off), the process's CPU seconds in it
    (every thread's, the producer's included; other processes' load does not inflate them),
    and of each `loader.next_step` call on the training thread (the batch wait prefetching
    takes off the step path)."""
    seconds: dict[str, list[float]] = {"step": [], "batch": [], "cpu": []}

    def timed(fn, key):
        def call(*args):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(*args)
            seconds[key].append(time.perf_counter() - t0)
            if key == "step":
                seconds["cpu"].append(time.process_time() - c0)
            return out

        return call

    trainer.loader.next_step = timed(trainer.loader.next_step, "batch")
    trainer.train_step = timed(trainer.train_step, "step")
    return seconds


# Built in this order: a Trainer built later was measured slower here than an identical one
# built first (an A/A run: up to 0.93x tokens/s on a busy 2-core machine), so each side gets
# one early and one late copy, and the position cancels out of the comparison.
BUILD_ORDER = ("before/1", "after/1", "after/2", "before/2")


def measure(args: argparse.Namespace) -> tuple[dict, dict]:
    tmp = tempfile.mkdtemp(prefix="snoo_step_path_")
    cfgs = {name: make_config(getattr(args, name.split("/")[0]), args, os.path.join(tmp, name)) for name in BUILD_ORDER}
    info = init_distributed(cfgs["before/1"].trainer.device)
    trainers = {name: Trainer(cfg, info) for name, cfg in cfgs.items()}
    seconds = {name: instrument(t) for name, t in trainers.items()}
    step, elapsed, timed_steps = time_interleaved(trainers, warmup=args.warmup, steps=args.steps, block=args.block)
    tokens_per_step = trainers["before/1"].loader.tokens_per_step
    results = {}
    for side in SIDES:
        copies = [name for name in BUILD_ORDER if name.startswith(side)]
        pooled = {key: sum((seconds[n][key][args.warmup :] for n in copies), []) for key in ("step", "batch", "cpu")}
        side_elapsed, side_steps = sum(elapsed[n] for n in copies), timed_steps * len(copies)
        results[side] = {
            "overrides": getattr(args, side),
            "tokens_per_s": side_steps * tokens_per_step / side_elapsed,
            "step_time_s": side_elapsed / side_steps,
            "step_time_s_median": statistics.median(pooled["step"]),
            "tokens_per_s_of_median_step": tokens_per_step / statistics.median(pooled["step"]),
            "cpu_s_per_step_median": statistics.median(pooled["cpu"]),
            "batch_wait_ms_median": 1e3 * statistics.median(pooled["batch"]),
            "batch_wait_ms_mean": 1e3 * statistics.fmean(pooled["batch"]),
            "steps_trained": sum(step[n] for n in copies),
            "tokens_per_s_per_copy": {n: timed_steps * tokens_per_step / elapsed[n] for n in copies},
            "val_losses": [trainers[n].evaluate() for n in copies],
        }
        results[side]["val_loss"] = results[side]["val_losses"][0]
    for trainer in trainers.values():
        trainer.loader.close()
        trainer.metrics.close()
    meta = {
        "device": info.device,
        "params": trainers["before/1"].num_params,
        "tokens_per_step": tokens_per_step,
        "timed_steps_per_side": timed_steps * 2,
    }
    return results, meta


def main() -> None:
    args = parse_args()
    results, meta = measure(args)
    device = meta.pop("device")
    before, after = results["before"], results["after"]
    report = {
        "benchmark": "step_path",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["bench/step_path.py", *sys.argv[1:]]),
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "model": args.model,
        **meta,
        "results": results,
        # The headline: median steps (other processes' bursts of load inflate the block totals).
        "tokens_per_s_ratio_after_over_before": before["step_time_s_median"] / after["step_time_s_median"],
        "tokens_per_s_ratio_of_block_totals": after["tokens_per_s"] / before["tokens_per_s"],
        "cpu_per_step_ratio_before_over_after": before["cpu_s_per_step_median"] / after["cpu_s_per_step_median"],
        "val_loss_equal": len(set(before["val_losses"] + after["val_losses"])) == 1,
    }
    print(f"\n{args.model} ({meta['params'] / 1e6:.2f}M params), {device.type}, "
          f"{meta['timed_steps_per_side']} timed steps per side (two copies each), {meta['tokens_per_step']} tokens/step")
    print(f"{'side':<8}{'tokens/s':>11}{'step ms':>10}{'median ms':>11}{'CPU ms':>10}{'batch ms':>10}{'val_loss':>12}  overrides")
    for side in SIDES:
        r = results[side]
        print(f"{side:<8}{r['tokens_per_s']:>11.0f}{1e3 * r['step_time_s']:>10.1f}{1e3 * r['step_time_s_median']:>11.1f}"
              f"{1e3 * r['cpu_s_per_step_median']:>10.1f}{r['batch_wait_ms_median']:>10.3f}{r['val_loss']:>12.6f}"
              f"  {' '.join(r['overrides'])}")  # fmt: skip
    print(f"tokens/s ratio after/before (median steps): {report['tokens_per_s_ratio_after_over_before']:.4f}; of the "
          f"block totals: {report['tokens_per_s_ratio_of_block_totals']:.4f}; CPU per step before/after: "
          f"{report['cpu_per_step_ratio_before_over_after']:.4f}; validation losses equal: {report['val_loss_equal']}")
    write_report(report, args.out or REPO / "bench" / "results" / f"step_path_{args.model}_{device.type}.json")


if __name__ == "__main__":
    main()
