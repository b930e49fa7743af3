"""DiLoCo across slow links (issue 23): what crosses replicas, what a slow link costs, and what
quantizing the outer sync does to the loss. Three parts, one torchrun job each:

    torchrun --nproc_per_node=4 bench/slow_links.py bytes --model llama_small --k 8
    torchrun --nproc_per_node=4 bench/slow_links.py latency --model llama_small --k 8 --fragments 2 --delay 3
    torchrun --nproc_per_node=2 bench/slow_links.py loss --model llama_small --k 10 --steps 200

bytes: cross-replica bytes per rank, per outer cycle (K inner steps: one sync of every
fragment) and per inner step (the cycle's average), for F in --fragments and each wire format:
fp32 all-reduce, optim.outer_reduce_dtype=bf16, optim.outer_quant=bf16|fp8|int8|int4;
against HSDP AdamW (optim=adamw with parallel.replicas=R: gradients all-reduced across
replicas every step, docs/parallelism.md). Counted by bench/comm.py's recorder through the real
trainer; next to each, the formula computed from this rank's local parameter shards
(fp32/bf16 ring all-reduce: 2 (R-1)/R x bytes x (elements + 1 flag) per fragment; quantized
all_gather: (R-1) x message bytes per fragment, docs/parallelism.md).

latency: every collective issued on the replicate group is wrapped so that it does not complete
before issue time + L (synchronous: sleep after the call returns; async_op: a Work whose wait()
sleeps until issue + L). It models a link whose LATENCY (or transfer time) overlaps compute and
is the same for every message size; it does not model bandwidth (L does not grow with the
bytes), contention between messages, or a slower link for the FSDP traffic inside a replica.
L = --latency-steps x the measured compute time of one step. Step time of sync_delay=0 against
sync_delay=--delay at the same F, and of the run without latency, timed in ABBA blocks in one job.

loss: final validation loss at a fixed budget (--steps) for DiLoCo R=2 (ws 2: 2 replicas x 1
shard; sharding inside a replica changes no arithmetic that matters here and halves the cost)
for full precision and each outer_quant with and without error feedback, for each --seeds;
same data, seeds and steps for every setting. Writes bench/results/slow_links_<part>_<model>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from comm import make_config, measure
from common import REPO, compose_config, repo_path, time_interleaved, write_report
from torch.distributed.tensor import DTensor

import snoo_train.optim.outer_quant as outer_quant
from snoo_train.config import validate_config
from snoo_train.dist import destroy_distributed, exit_process, init_distributed
from snoo_train.optim.build import layer_fragments
from snoo_train.trainer import Trainer

# wire format: (outer_reduce_dtype, extra overrides)
FORMATS = {
    "fp32": ("fp32", []),
    "bf16_allreduce": ("bf16", []),
    "q_bf16": ("fp32", ["optim.outer_quant=bf16"]),
    "q_fp8": ("fp32", ["optim.outer_quant=fp8"]),
    "q_int8": ("fp32", ["optim.outer_quant=int8"]),
    "q_int4": ("fp32", ["optim.outer_quant=int4"]),
}
# bits per code, whether it carries one fp32 scale per 128-element block (outer_quant.py's format)
WIRE = {"q_bf16": (16, False), "q_fp8": (8, True), "q_int8": (8, True), "q_int4": (4, True)}


def _machine(world_size: int) -> dict:
    return {"world_size": world_size, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine()}  # fmt: skip


def _local_numel(p: torch.Tensor) -> int:
    return (p.to_local() if isinstance(p, DTensor) else p).numel()


def formula_bytes(trainer: Trainer, fmt: str, fragments: int, replicas: int) -> float:
    """Bytes this rank sends across replicas per outer cycle (every fragment synced once), from
    its local shards: the check on what the recorder counted."""
    frags = layer_fragments(trainer.model, fragments) if fragments > 1 else [list(trainer.model.parameters())]
    total = 0.0
    for frag in frags:
        numels = [_local_numel(p) for p in frag]
        if fmt in WIRE:
            bits, scaled = WIRE[fmt]
            n = sum(-(-x // 128) * 128 for x in numels)  # every tensor padded to whole blocks
            raw = (4 * n // 128 if scaled else 0) + n * bits // 8 + 1  # scales, codes, flag byte
            total += (replicas - 1) * (-(-raw // 4) * 4)  # the ring all_gather of R messages
        else:
            width = 2 if fmt == "bf16_allreduce" else 4
            total += 2 * (replicas - 1) / replicas * width * (sum(numels) + 1)
    return total


def part_bytes(args, world_size: int, tmp: str) -> dict:
    """Part 1: recorded cross-replica bytes per side, with the formula next to them."""
    r = args.replicas
    sides = {"hsdp_adamw": ("adamw", "fp32", [], 1)}
    for f in args.fragments:
        for fmt, (dtype, extra) in FORMATS.items():
            sides[f"diloco_f{f}_{fmt}"] = ("snoo_adamw", dtype, [*extra, f"optim.fragments={f}"], f)
    info = None
    per_block = world_size // r
    block = None
    results = {}
    for name, (optim, dtype, extra, f) in sides.items():
        cfg = make_config(args, optim, r, dtype, os.path.join(tmp, name), world_size, extra)
        info = info or init_distributed(cfg.trainer.device, replicas=r)
        rank = info.rank
        block = block or tuple(range(rank // per_block * per_block, (rank // per_block + 1) * per_block))
        trainer = Trainer(cfg, info)
        dist.barrier()
        m = measure(trainer, args.k, block)
        b = m["bytes_per_step"]
        results[name] = {
            "cross_per_inner_step": b.get("sent_cross", 0.0),
            "cross_per_cycle": b.get("sent_cross", 0.0) * args.k,
            "outer_cross_per_cycle": b.get("sent_outer_cross", 0.0) * args.k,
            "intra_per_inner_step": b.get("sent_intra", 0.0),
            "syncs_in_window": m["outer_steps"] if optim != "adamw" else None,
        }
        if optim == "adamw":  # HSDP: every step all-reduces the local gradient shards in fp32
            numel = sum(_local_numel(p) for p in trainer.model.parameters())
            results[name]["formula_per_cycle"] = 2 * (r - 1) / r * 4 * numel * args.k
        else:
            results[name]["formula_per_cycle"] = formula_bytes(trainer, name.split("_", 2)[2], f, r)
        num_params = trainer.num_params
        trainer.metrics.close()
        del trainer
    gathered = [None] * world_size
    dist.all_gather_object(gathered, results)
    return {"params": num_params, "per_rank": gathered, "mean": _mean_over_ranks(gathered)}


def _mean_over_ranks(gathered: list[dict]) -> dict:
    out = {}
    for name in gathered[0]:
        row = {key: statistics.fmean(g[name][key] for g in gathered)
               for key in gathered[0][name] if key != "syncs_in_window"}  # fmt: skip
        row["syncs_in_window"] = gathered[0][name]["syncs_in_window"]
        row["measured_over_formula"] = row["outer_cross_per_cycle" if name != "hsdp_adamw" else "cross_per_cycle"] / row[
            "formula_per_cycle"
        ]
        out[name] = row
    base = out["hsdp_adamw"]["cross_per_inner_step"]
    for row in out.values():
        row["cross_vs_hsdp_adamw"] = row["cross_per_inner_step"] / base
    return out


class SlowLink:
    """Collectives on `group` complete no earlier than issue time + `latency` seconds (set
    `latency` to 0 to switch off). Patches dist.all_reduce and the quantized sync's all_gather
    for this process; the wrapped Work keeps the real one's wait() after the sleep."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group, self.latency, self.calls = group, 0.0, 0
        for owner, name in ((dist, "all_reduce"), (outer_quant, "_all_gather")):
            setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, fn):
        def slow(*args, **kwargs):
            if kwargs.get("group") is not self.group or self.latency == 0:
                return fn(*args, **kwargs)
            self.calls += 1
            until = time.perf_counter() + self.latency
            work = fn(*args, **kwargs)
            if kwargs.get("async_op"):
                return _LateWork(work, until)
            _sleep_until(until)
            return work

        return slow


class _LateWork:
    def __init__(self, work, until: float) -> None:
        self.work, self.until = work, until

    def wait(self, *args) -> bool:
        _sleep_until(self.until)
        return self.work.wait(*args)


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.perf_counter()))


def part_latency(args, world_size: int, tmp: str) -> dict:
    """Part 2: step time with sync_delay=0 and sync_delay=--delay under an injected latency,
    and without latency, ABBA in one job; the slowest rank's time per side."""
    f, extra = args.fragments[0], [f"optim.fragments={args.fragments[0]}"]
    sides = {"no_latency": 0, "sync_delay_0": 0, f"sync_delay_{args.delay}": args.delay}
    trainers, info = {}, None
    longer = argparse.Namespace(**{**vars(args), "timed_steps": args.timed_steps + args.k + 2})  # the no-latency warm-up
    for name, tau in sides.items():
        cfg = make_config(longer, "snoo_adamw", args.replicas, "fp32", os.path.join(tmp, name), world_size,
                          [*extra, f"optim.sync_delay={tau}", "trainer.log_interval=100000"])  # fmt: skip
        info = info or init_distributed(cfg.trainer.device, replicas=args.replicas)
        trainers[name] = Trainer(cfg, info)
    link = SlowLink(trainers["sync_delay_0"].optimizer.replicate_group)
    # One step's compute, measured without latency (a cycle's steps: syncs included), slowest rank.
    _, elapsed, n = time_interleaved({"no_latency": trainers["no_latency"]}, warmup=1, steps=args.k, block=args.k,
                                     sync=dist.barrier)  # fmt: skip
    step_s = torch.tensor(elapsed["no_latency"] / n)
    dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
    latency = args.latency_steps * float(step_s)
    for name, trainer in trainers.items():
        trainer.train_step = _with_latency(trainer, link, 0.0 if name == "no_latency" else latency,
                                           done=1 + args.k if name == "no_latency" else 0)  # fmt: skip
    _, elapsed, timed = time_interleaved(trainers, warmup=1, steps=args.timed_steps, block=args.k, sync=dist.barrier)
    step = {name: torch.tensor(elapsed[name] / timed) for name in trainers}
    for t in step.values():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets a synchronous step's pace
    results = {name: {"sync_delay": tau, "step_s": float(step[name]),
                      "vs_sync_delay_0": float(step[name] / step["sync_delay_0"])} for name, tau in sides.items()}  # fmt: skip
    return {"fragments": f, "latency_s": latency, "compute_step_s": float(step_s),
            "slow_collectives_rank": link.calls, "timed_steps_per_side": timed, "results": results}  # fmt: skip


def _with_latency(trainer: Trainer, link: SlowLink, latency: float, done: int):
    step = trainer.train_step

    def run(n: int):
        link.latency = latency
        try:
            return step(done + n)
        finally:
            link.latency = 0.0

    return run


def part_loss(args, world_size: int, tmp: str) -> dict:
    """Part 3: final validation loss per outer_quant x error feedback x seed, DiLoCo R=2."""
    settings = {"fp32": []}
    for codec in ("bf16", "fp8", "int8", "int4"):
        settings[f"{codec}"] = [f"optim.outer_quant={codec}"]
        settings[f"{codec}_ef"] = [f"optim.outer_quant={codec}", "optim.error_feedback=true"]
    runs: dict[str, list[float]] = {}
    info = None
    for name, extra in settings.items():
        for seed in args.seeds:
            overrides = [f"model={args.model}", "optim=snoo_adamw", f"optim.k={args.k}", "parallel.replicas=2",
                         f"trainer.max_steps={args.steps}", f"trainer.batch_size={args.batch_size}",
                         f"data.seq_len={args.seq_len}", f"trainer.seed={seed}", "trainer.progress=false",
                         "trainer.eval_interval=0", "logging.wandb.mode=disabled", *extra, *args.overrides]  # fmt: skip
            cfg = compose_config(overrides, os.path.join(tmp, f"{name}_s{seed}"))
            validate_config(cfg, world_size=world_size)
            info = info or init_distributed(cfg.trainer.device, replicas=2)
            summary = Trainer(cfg, info).fit()
            runs.setdefault(name, []).append(summary["final_val_loss"])
            if info.rank == 0:
                print(f"{name} seed {seed}: final val loss {summary['final_val_loss']:.4f}", flush=True)
    ref = statistics.fmean(runs["fp32"])
    # Same seed, same data: the paired difference to fp32 is free of the seed-to-seed spread.
    results = {name: {"final_val_loss": v, "mean": statistics.fmean(v), "spread": max(v) - min(v),
                      "mean_minus_fp32": statistics.fmean(v) - ref,
                      "minus_fp32_per_seed": [a - b for a, b in zip(v, runs["fp32"])]}
               for name, v in runs.items()}  # fmt: skip
    return {"results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("bytes", "latency", "loss"))
    parser.add_argument("--model", default="llama_small")
    parser.add_argument("--k", type=int, default=8, help="SNOO's inner steps per outer step")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--fragments", default="1,4", help="bytes: F values; latency: its F (first value)")
    parser.add_argument("--delay", type=int, default=3, help="latency: optim.sync_delay of the overlapped side")
    parser.add_argument("--latency-steps", type=float, default=2.0, help="latency: L in steps of compute")
    parser.add_argument("--timed-steps", type=int, default=0, help="latency: timed steps per side (default 4K)")
    parser.add_argument("--steps", type=int, default=200, help="loss: the training budget")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_intermixed_args()
    args.fragments = [int(x) for x in args.fragments.split(",")]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.timed_steps = args.timed_steps or 4 * args.k
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2 or world_size % args.replicas:
        parser.error(f"run under torchrun with a multiple of --replicas={args.replicas} ranks (>= 2)")
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="snoo_slow_links_")
    body = {"bytes": part_bytes, "latency": part_latency, "loss": part_loss}[args.part](args, world_size, tmp)
    rank = dist.get_rank()
    destroy_distributed()
    shutil.rmtree(tmp, ignore_errors=True)  # the runs' directories (checkpoints, metrics)
    if rank != 0:
        return
    report = _report(args, world_size, body, time.perf_counter() - t0)
    {"bytes": print_bytes, "latency": print_latency, "loss": print_loss}[args.part](report)
    out = args.out or REPO / "bench" / "results" / f"slow_links_{args.part}_{args.model}.json"
    write_report(report, out)


def _report(args, world_size: int, body: dict, wall: float) -> dict:
    settings = {key: getattr(args, key) for key in ("k", "replicas", "batch_size", "seq_len", "overrides")}
    settings.update({"bytes": {"fragments": args.fragments},
                     "latency": {"fragments": args.fragments[0], "delay": args.delay,
                                 "latency_steps": args.latency_steps, "timed_steps": args.timed_steps},
                     "loss": {"steps": args.steps, "seeds": args.seeds}}[args.part])  # fmt: skip
    return {
        "benchmark": f"slow_links_{args.part}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["torchrun", f"--nproc_per_node={world_size}", repo_path(sys.argv[0]), *sys.argv[1:]]),
        "machine": _machine(world_size),
        "model": args.model,
        "settings": settings,
        "definitions": DEFINITIONS[args.part],
        **body,
        "wall_time_s": wall,
    }


DEFINITIONS = {
    "bytes": "bytes a ring algorithm makes each rank send (bench/comm.py), on collectives whose group spans "
    "replicas; per cycle = per inner step x K (one sync of every fragment); mean over ranks. formula: fp32/bf16 "
    "all-reduce 2(R-1)/R x width x (local elements + 1 flag) per fragment; quantized all_gather (R-1) x message "
    "(scales 4 B per 128-element block except bf16, codes, 1 flag byte, rounded up to 4) per fragment; HSDP "
    "AdamW 2(R-1)/R x 4 x local elements per step.",
    "latency": "every collective on the replicate group completes no earlier than issue + L (sleep after a "
    "synchronous call; async: the Work's wait() sleeps until issue + L). Models a per-message latency that "
    "overlaps compute; NOT bandwidth (L does not grow with the bytes), not contention, not slow intra-replica "
    "links. step_s: slowest rank's mean step time, ABBA blocks of K steps in one job.",
    "loss": "final validation loss (trainer's final evaluation on the slow weights) after --steps steps, "
    "DiLoCo 2 replicas x 1 shard, same data and seeds for every setting; spread = max - min over seeds.",
}


def print_bytes(report: dict) -> None:
    kib, s = 2**10, report["settings"]
    print(f"\n{report['model']} ({report['params'] / 1e6:.2f}M params), {report['machine']['world_size']} ranks = "
          f"{s['replicas']} replicas, K={s['k']}: KiB sent across replicas per rank (mean over ranks)")  # fmt: skip
    head = f"{'side':<24}{'per cycle':>12}{'per step':>12}{'formula/cycle':>15}{'meas/formula':>14}{'vs HSDP':>10}"
    print(head + "\n" + "-" * len(head))
    for name, r in report["mean"].items():
        print(f"{name:<24}{r['cross_per_cycle'] / kib:>12.2f}{r['cross_per_inner_step'] / kib:>12.3f}"
              f"{r['formula_per_cycle'] / kib:>15.2f}{r['measured_over_formula']:>14.4f}"
              f"{r['cross_vs_hsdp_adamw']:>10.4f}")  # fmt: skip


def print_latency(report: dict) -> None:
    print(f"\n{report['model']}, F={report['fragments']}, L={report['latency_s']:.3f} s "
          f"(compute step {report['compute_step_s']:.3f} s), {report['timed_steps_per_side']} timed steps per side")
    for name, r in report["results"].items():
        print(f"{name:<16} step {r['step_s']:.4f} s   vs sync_delay=0: {r['vs_sync_delay_0']:.3f}")


def print_loss(report: dict) -> None:
    s = report["settings"]
    print(f"\n{report['model']}, DiLoCo 2 x 1, K={s['k']}, {s['steps']} steps, seeds {s['seeds']}")
    for name, r in report["results"].items():
        vals = ", ".join(f"{v:.4f}" for v in r["final_val_loss"])
        paired = ", ".join(f"{d:+.4f}" for d in r["minus_fp32_per_seed"])
        print(f"{name:<10} mean {r['mean']:.4f}  spread {r['spread']:.4f}  vs fp32 {r['mean_minus_fp32']:+.4f}  ({vals}; "
              f"per seed vs fp32 {paired})")  # fmt: skip


if __name__ == "__main__":
    main()
    exit_process(0)  # a torchrun rank: leave without gloo's teardown (snoo_train/dist.py)
