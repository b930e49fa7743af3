"""The four inner/outer optimizer pairs side by side: adamw, snoo_adamw, muon, snoo_muon.

For each model, all four train the same model (same seed, same data) through the real training
code (`snoo_train.trainer.Trainer`) in ONE process, in rotating blocks of steps (ABCD, DCBA, ...),
so machine noise hits every side alike; tokens/s are reported as ratios to adamw from that one
run. After the same number of steps each side's validation loss is measured (at SNOO's slow
weights). Memory: parameter + optimizer-state bytes counted exactly, plus the peak RSS of a
separate short training process per optimizer (one process cannot attribute RSS to one of four
models). On CPU with the small presets that RSS peak is set by start-up and the data pipeline
(~1.3 GB), not by training, so the exact state bytes are the figure that tells them apart.

    python bench/optimizers.py                                   # moe_small and llama_small, CPU
    python bench/optimizers.py --models moe_small --steps 100 trainer.batch_size=16

Extra arguments are Hydra overrides for every run. Writes bench/results/optimizers_<device>.json.
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
from snoo_train.dist import destroy_distributed, init_distributed
from snoo_train.trainer import Trainer

OPTIMIZERS = ("adamw", "snoo_adamw", "muon", "snoo_muon")


def run_overrides(model: str, optim: str, args: argparse.Namespace) -> list[str]:
    overrides = [f"model={model}", f"optim={optim}", *args.overrides]
    if optim.startswith("snoo"):
        overrides.append(f"optim.k={args.k}")
    return overrides


def make_config(model: str, optim: str, args: argparse.Namespace, run_dir: str) -> Config:
    cfg = compose_config(
        [*run_overrides(model, optim, args), f"trainer.max_steps={args.warmup + args.steps}",
         "trainer.progress=false", "trainer.eval_interval=0", "logging.wandb.mode=disabled"],
        run_dir,
    )  # fmt: skip
    validate_config(cfg)
    return cfg


def peak_rss(model: str, optim: str, args: argparse.Namespace) -> int | None:
    """Peak RSS (summary.json's peak_mem_bytes) of a separate short `python -m snoo_train.train`."""
    return peak_memory_of_training_run(
        [*run_overrides(model, optim, args), f"trainer.max_steps={args.rss_steps}"],
        env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)),
    )


def bench_model(model: str, args: argparse.Namespace, info) -> dict:
    tmp = tempfile.mkdtemp(prefix="snoo_optbench_")
    trainers = {
        name: Trainer(make_config(model, name, args, os.path.join(tmp, name)), info) for name in OPTIMIZERS
    }
    step, elapsed, timed_steps = time_interleaved(
        trainers, warmup=args.warmup, steps=args.steps, block=args.block
    )
    tokens_per_step = trainers["adamw"].loader.tokens_per_step
    results = {}
    for name, trainer in trainers.items():
        results[name] = {
            "tokens_per_s": timed_steps * tokens_per_step / elapsed[name],
            "step_time_s": elapsed[name] / timed_steps,
            "val_loss": trainer.evaluate(),
            "steps_trained": step[name],
            **state_bytes(trainer),
            "peak_mem_bytes": peak_rss(model, name, args) if args.rss_steps else None,
        }
        trainer.metrics.close()
    base = results["adamw"]
    for r in results.values():
        # Parameters + optimizer state: exact, and what differs between the four on any device.
        r["param_and_state_bytes"] = r["param_bytes"] + r["inner_state_bytes"] + r["snoo_state_bytes"]
    for r in results.values():
        r["tokens_per_s_ratio_to_adamw"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["param_and_state_ratio_to_adamw"] = r["param_and_state_bytes"] / base["param_and_state_bytes"]
        if r["peak_mem_bytes"] and base["peak_mem_bytes"]:
            r["peak_mem_ratio_to_adamw"] = r["peak_mem_bytes"] / base["peak_mem_bytes"]
    return {
        "params": trainers["adamw"].num_params,
        "tokens_per_step": tokens_per_step,
        "timed_steps": timed_steps,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["moe_small", "llama_small"])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per optimizer")
    parser.add_argument("--block", type=int, default=10, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first")
    parser.add_argument("--k", type=int, default=10, help="SNOO's k (a divisor of --block)")
    parser.add_argument("--rss-steps", type=int, default=5, help="steps of each peak-RSS process; 0 skips")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_intermixed_args()
    torch.set_num_threads(args.threads)

    info = init_distributed("auto")
    report = {
        "benchmark": "optimizers",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "machine": {
            "device": platform.processor() or info.device.type,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_avg_at_start": os.getloadavg(),
        },
        "k": args.k,
        "models": {model: bench_model(model, args, info) for model in args.models},
    }
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    destroy_distributed()

    for model, m in report["models"].items():
        print(f"\n{model} ({m['params'] / 1e6:.2f}M params), {m['timed_steps']} timed steps per optimizer")
        print(f"{'optimizer':<12}{'tokens/s':>10}{'ratio':>8}{'val_loss':>10}{'peak MiB':>10}{'mem ratio':>10}"
              f"{'p+state MiB':>12}{'ratio':>7}")  # fmt: skip
        for name, r in m["results"].items():
            state = r["param_and_state_bytes"] / 2**20
            print(
                f"{name:<12}{r['tokens_per_s']:>10.0f}{r['tokens_per_s_ratio_to_adamw']:>8.3f}{r['val_loss']:>10.4f}"
                f"{(r['peak_mem_bytes'] or 0) / 2**20:>10.1f}{r.get('peak_mem_ratio_to_adamw', float('nan')):>10.3f}"
                f"{state:>12.2f}{r['param_and_state_ratio_to_adamw']:>7.3f}"
            )
    write_report(report, args.out or REPO / "bench" / "results" / f"optimizers_{info.device.type}.json")


if __name__ == "__main__":
    main()
