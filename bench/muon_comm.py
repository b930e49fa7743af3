"""Sharded Muon under FSDP2: collectives and bytes per optimizer step, and step time, for the
step before same-shape batching (one gather + one scatter per matrix, bench/muon_per_matrix.py), the
batched step (one all-to-all each way per bucket of same-shape matrices) and MuonBP.

The trainers (optim=muon per-matrix, batched, and batched with muon_period=P) train the same model
in one torchrun job, in alternating blocks of steps (ABBA...), so the ratios are measured in one
run. Collectives are counted with CommDebugMode over `--period` untimed steps per side (the
counting mode slows dispatch, so the timed steps run without it); bytes are what `Muon` reports
sending, summed over all ranks and averaged over the timed steps. The optimizer step is timed with
torch.optim step hooks, the whole train step around it.

    torchrun --nproc_per_node=4 bench/muon_comm.py                       # moe_small, P=4, CPU gloo
    torchrun --nproc_per_node=4 bench/muon_comm.py --model llama_small --period 8

Writes bench/results/muon_comm_<model>_ws<N>_<device>.json.
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

import torch
import torch.distributed as dist
from common import REPO, compose_config
from muon_per_matrix import use_per_matrix_step
from torch.distributed.tensor.debug import CommDebugMode

from snoo_train.config import Config, validate_config
from snoo_train.dist import destroy_distributed, exit_process, init_distributed
from snoo_train.trainer import Trainer


def make_config(args: argparse.Namespace, period: int, run_dir: str, world_size: int) -> Config:
    overrides = [
        f"model={args.model}", "optim=muon", f"optim.muon_period={period}",
        f"trainer.max_steps={args.warmup + args.steps}", "trainer.progress=false",
        "trainer.eval_interval=0", "logging.wandb.mode=disabled", *args.overrides,
    ]  # fmt: skip
    cfg = compose_config(overrides, run_dir)
    validate_config(cfg, world_size=world_size)
    return cfg


def owner_layout(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(owner-layout matrices, same-shape buckets) of a Muon that has stepped (its cached plans)."""
    buckets = [b for plan in opt._plans.values() for b in plan.buckets if b is not None]
    return len(buckets), len({id(b) for b in buckets})


def commit() -> str:
    try:
        return subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="moe_small")
    parser.add_argument("--period", type=int, default=4, help="MuonBP period")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per side (a multiple of --block)")
    parser.add_argument("--block", type=int, default=8, help="steps per block (a multiple of --period)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    args = parser.parse_intermixed_args()
    torch.set_num_threads(1)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tmp = tempfile.mkdtemp(prefix="snoo_muoncomm_")
    # side -> (MuonBP period, the per-matrix step of before batching)
    sides = {"per_matrix": (1, True), "muon": (1, False), f"muonbp_p{args.period}": (args.period, False)}
    cfgs = {name: make_config(args, p, os.path.join(tmp, name), world_size) for name, (p, _) in sides.items()}
    info = init_distributed(next(iter(cfgs.values())).trainer.device)
    trainers = {name: Trainer(cfg, info) for name, cfg in cfgs.items()}

    step = dict.fromkeys(sides, 0)
    step_time = dict.fromkeys(sides, 0.0)
    opt_time = dict.fromkeys(sides, 0.0)
    sent = dict.fromkeys(sides, 0)
    collectives: dict[str, dict[str, int]] = {name: {} for name in sides}
    timing = {"on": False, "t0": 0.0, "count": None}

    for name, trainer in trainers.items():
        if sides[name][1]:
            use_per_matrix_step(trainer.optimizer)

        def pre(opt, a, kw):
            if timing["count"] is not None:
                timing["count"].__enter__()
            timing["t0"] = time.perf_counter()

        def post(opt, a, kw, name=name):
            if timing["on"]:
                opt_time[name] += time.perf_counter() - timing["t0"]
                sent[name] += opt.last_comm_bytes
            if timing["count"] is not None:
                timing["count"].__exit__(None, None, None)
                for op, n in timing["count"].get_comm_counts().items():
                    collectives[name][str(op)] = collectives[name].get(str(op), 0) + n

        trainer.optimizer.register_step_pre_hook(pre)
        trainer.optimizer.register_step_post_hook(post)

    def run_block(name: str, n: int, timed: bool, count: bool = False) -> None:
        timing["on"] = timed
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            step[name] += 1
            timing["count"] = CommDebugMode() if count else None
            trainers[name].train_step(step[name])
        timing["count"] = None
        dist.barrier()
        if timed:
            step_time[name] += time.perf_counter() - t0

    for name in sides:
        run_block(name, args.warmup, timed=False)
        run_block(name, args.period, timed=False, count=True)  # a whole MuonBP period
    rounds = max(1, args.steps // args.block)
    for r in range(rounds):
        for name in list(sides) if r % 2 == 0 else list(reversed(sides)):
            run_block(name, args.block, timed=True)
    timed_steps = rounds * args.block

    totals = torch.tensor([float(sent[n]) for n in sides], dtype=torch.float64)
    dist.all_reduce(totals)  # bytes sent by all ranks together
    results = {}
    for (name, (period, _)), total in zip(sides.items(), totals.tolist()):
        results[name] = {
            "period": period,
            "collectives_per_step": sum(collectives[name].values()) / args.period,
            "collectives_by_op": {op: n / args.period for op, n in collectives[name].items() if n},
            "bytes_per_step_all_ranks": total / timed_steps,
            "step_time_s": step_time[name] / timed_steps,
            "optimizer_step_time_s": opt_time[name] / timed_steps,
        }
    owner_matrices, buckets = owner_layout(trainers["muon"].optimizer)
    for trainer in trainers.values():
        trainer.metrics.close()
    destroy_distributed()
    if info.rank != 0:
        return

    before, full, bp = results["per_matrix"], results["muon"], results[f"muonbp_p{args.period}"]
    param_bytes = trainers["muon"].num_params * 4
    report = {
        "benchmark": "muon_comm",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "commit": commit(),
        "machine": {
            "device": info.device.type,
            "cpu_count": os.cpu_count(),
            "world_size": world_size,
            "torch_threads_per_rank": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_avg_at_end": os.getloadavg(),
        },
        "model": args.model,
        "params": trainers["muon"].num_params,
        "param_bytes_fp32": param_bytes,
        "owner_layout_matrices": owner_matrices,
        "same_shape_buckets": buckets,
        "timed_steps": timed_steps,
        "results": results,
        "collectives_ratio_batched_over_per_matrix": full["collectives_per_step"] / before["collectives_per_step"],
        "step_time_ratio_batched_over_per_matrix": full["step_time_s"] / before["step_time_s"],
        "optimizer_step_time_ratio_batched_over_per_matrix": full["optimizer_step_time_s"] / before["optimizer_step_time_s"],
        "bytes_ratio_muonbp_over_muon": bp["bytes_per_step_all_ranks"] / full["bytes_per_step_all_ranks"],
        "step_time_ratio_muonbp_over_muon": bp["step_time_s"] / full["step_time_s"],
        "optimizer_step_time_ratio_muonbp_over_muon": bp["optimizer_step_time_s"] / full["optimizer_step_time_s"],
    }
    print(f"\n{args.model} ({report['params'] / 1e6:.2f}M params, {owner_matrices} sharded matrices in "
          f"{buckets} same-shape buckets), world size {world_size}, {timed_steps} timed steps per side")
    print(f"{'side':<14}{'coll/step':>10}{'MiB/step':>10}{'step ms':>10}{'opt ms':>10}")
    for name, r in results.items():
        print(f"{name:<14}{r['collectives_per_step']:>10.1f}{r['bytes_per_step_all_ranks'] / 2**20:>10.2f}"
              f"{1e3 * r['step_time_s']:>10.1f}{1e3 * r['optimizer_step_time_s']:>10.1f}")  # fmt: skip
    print(f"batched / per-matrix: collectives {report['collectives_ratio_batched_over_per_matrix']:.3f}, "
          f"step time {report['step_time_ratio_batched_over_per_matrix']:.3f}, optimizer step "
          f"{report['optimizer_step_time_ratio_batched_over_per_matrix']:.3f}")  # fmt: skip
    print(f"MuonBP / Muon: bytes {report['bytes_ratio_muonbp_over_muon']:.3f}, step time "
          f"{report['step_time_ratio_muonbp_over_muon']:.3f}, optimizer step "
          f"{report['optimizer_step_time_ratio_muonbp_over_muon']:.3f}")  # fmt: skip
    out = Path(args.out or REPO / "bench" / "results" / f"muon_comm_{args.model}_ws{world_size}_{info.device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
    exit_process(0)  # a torchrun rank: leave without gloo's teardown (snoo_train/dist.py)
