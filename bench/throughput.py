"""What SNOO costs per step: tokens/s, memory and validation loss of adamw vs snoo_adamw.

Both optimizers train the same model (same seed, same data) through the real training code
(`snoo_train.trainer.Trainer`), in ONE process, in alternating blocks of steps (ABBA order), so
machine noise hits both sides alike and the ratio is measured in one run.

    python bench/throughput.py                                  # llama_small, CPU, world size 1
    torchrun --nproc_per_node=2 bench/throughput.py             # FSDP2 over 2 ranks (gloo/NCCL)
    python bench/throughput.py --model llama_125m --steps 100 trainer.batch_size=8 data.seq_len=1024

Extra arguments are Hydra overrides applied to both runs. Prints a table and writes JSON
(bench/results/throughput_ws{N}_{device}.json by default).

Memory: SNOO's extra bytes are counted exactly from the optimizer state (this rank's local
shards) against the floor of 2 x parameter bytes / ranks. Peak memory cannot be attributed to
one of two models living in one process, so each side's peak comes from a separate short
training process (`python -m snoo_train.train`, world size 1): the CUDA allocator's peak on
GPU, the process's peak RSS on CPU (where loading the corpus, not training, sets the peak).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch
from common import (
    REPO,
    compose_config,
    peak_memory_of_training_run,
    state_bytes,
    time_interleaved,
    write_report,
)

from snoo_train.config import Config, validate_config
from snoo_train.dist import destroy_distributed, exit_process, init_distributed
from snoo_train.optim import SNOO
from snoo_train.trainer import Trainer

OPTIMIZERS = ("adamw", "snoo_adamw")


def run_overrides(optim: str, args: argparse.Namespace) -> list[str]:
    overrides = [f"model={args.model}", f"optim={optim}", *args.overrides]
    if optim.startswith("snoo"):
        overrides.append(f"optim.k={args.k}")
    return overrides


def make_config(optim: str, args: argparse.Namespace, run_dir: str) -> Config:
    return compose_config(
        [*run_overrides(optim, args), f"trainer.max_steps={args.steps}", "trainer.progress=false",
         "trainer.eval_interval=0", "logging.wandb.mode=disabled"],
        run_dir,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_small")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per optimizer")
    parser.add_argument("--k", type=int, default=20, help="SNOO's k")
    parser.add_argument("--block", type=int, default=20, help="steps per timed block (a multiple of k)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per optimizer first")
    parser.add_argument("--mem-steps", type=int, default=2 * 20, help="steps of each peak-memory process")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (CPU)")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    args = parser.parse_intermixed_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tmp = tempfile.mkdtemp(prefix="snoo_bench_")
    cfgs = {name: make_config(name, args, os.path.join(tmp, name)) for name in OPTIMIZERS}
    for cfg in cfgs.values():
        validate_config(cfg, world_size=world_size)
        cfg.trainer.max_steps = args.warmup + args.steps
    info = init_distributed(cfgs["adamw"].trainer.device)
    device = info.device
    trainers = {name: Trainer(cfg, info) for name, cfg in cfgs.items()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step, elapsed, timed_steps = time_interleaved(
        trainers, warmup=args.warmup, steps=args.steps, block=args.block, sync=sync
    )
    tokens_per_step = trainers["adamw"].loader.tokens_per_step
    results: dict[str, dict] = {}
    for name, trainer in trainers.items():
        results[name] = {
            "tokens_per_s": timed_steps * tokens_per_step / elapsed[name],
            "step_time_s": elapsed[name] / timed_steps,
            "val_loss": trainer.evaluate(),
            "steps_trained": step[name],
            **state_bytes(trainer),
        }
        if isinstance(trainer.optimizer, SNOO):
            results[name]["outer_steps"] = sum(
                g["snoo_step"] // g["snoo_k"] for g in trainer.optimizer.param_groups[:1]
            )
    for trainer in trainers.values():
        trainer.metrics.close()
    destroy_distributed()
    if info.rank != 0:
        return

    if world_size == 1:
        for name in OPTIMIZERS:
            results[name]["peak_mem_bytes"] = peak_memory_of_training_run(
                [*run_overrides(name, args), f"trainer.max_steps={args.mem_steps}"]
            )

    snoo, base = results["snoo_adamw"], results["adamw"]
    full_param_bytes = trainers["adamw"].num_params * 4
    report = {
        "benchmark": "throughput",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "world_size": world_size,
        },
        "model": args.model,
        "params": trainers["adamw"].num_params,
        "k": args.k,
        "tokens_per_step": tokens_per_step,
        "timed_steps": timed_steps,
        "results": results,
        "tokens_per_s_ratio_snoo_over_adamw": snoo["tokens_per_s"] / base["tokens_per_s"],
        "snoo_overhead_pct": 100.0 * (1.0 - snoo["tokens_per_s"] / base["tokens_per_s"]),
        "snoo_extra_bytes_per_rank": snoo["snoo_state_bytes"],
        "snoo_extra_bytes_floor_2x_params_over_ranks": 2 * full_param_bytes / world_size,
    }
    if all(results[n].get("peak_mem_bytes") for n in OPTIMIZERS):
        report["peak_mem_ratio_snoo_over_adamw"] = snoo["peak_mem_bytes"] / base["peak_mem_bytes"]

    print(f"\n{args.model} ({report['params'] / 1e6:.2f}M params), world size {world_size}, "
          f"{device.type}, {timed_steps} timed steps per side, k={args.k}")
    print(f"{'optimizer':<12}{'tokens/s':>12}{'step ms':>10}{'val_loss':>10}{'peak MiB':>10}{'outer MiB':>11}")
    for name in OPTIMIZERS:
        r = results[name]
        peak = r.get("peak_mem_bytes")
        print(f"{name:<12}{r['tokens_per_s']:>12.0f}{1e3 * r['step_time_s']:>10.1f}{r['val_loss']:>10.4f}"
              f"{(peak or 0) / 2**20:>10.1f}{r['snoo_state_bytes'] / 2**20:>11.2f}")
    print(f"tokens/s ratio snoo/adamw: {report['tokens_per_s_ratio_snoo_over_adamw']:.4f} "
          f"(overhead {report['snoo_overhead_pct']:.2f}%)")
    print(f"SNOO extra bytes per rank: {report['snoo_extra_bytes_per_rank']:,} "
          f"(floor 2 x params / ranks = {report['snoo_extra_bytes_floor_2x_params_over_ranks']:,.0f})")

    write_report(report, args.out or REPO / "bench" / "results" / f"throughput_ws{world_size}_{device.type}.json")


if __name__ == "__main__":
    main()
    exit_process(0)  # a torchrun rank: leave without gloo's teardown (snoo_train/dist.py)
