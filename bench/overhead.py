"""What SNOO costs around its inner optimizer: step time, memory, collectives.

    python bench/overhead.py                          # llama_small; world size 1 and 2 (gloo); CUDA if present
    python bench/overhead.py --world-sizes 1 --model llama_125m --steps 200

Variants, each on its own copy of the same model (same seed, same gradients):
    inner          the inner optimizer alone (AdamW with the trainer's weight-decay groups)
    snoo_k{K}      SNOO around it, K in --ks (default 1, 10, 100)
All variants of one world size run in ONE process per rank, timed in alternating blocks of
--block optimizer steps (forward order, then reversed: ABBA...), so load on the machine hits
every variant alike and the ratios are measured in one run; a variant's step time is its
median block / --block (the mean is kept in the JSON too). On CPU the clock is the process's
CPU time, which load from other processes does not inflate; on CUDA, wall time. The gradients come from one real
forward/backward and stay fixed: only `optimizer.step()` is timed. A forward/backward is timed
too, to put the optimizer's cost in proportion to a whole training step.

Memory: SNOO's extra bytes on each rank are counted exactly from its optimizer state (the local
shards of the slow weights and momentum) and set against the floor 2 x parameter bytes / ranks.
Peak memory per variant is the CUDA allocator's peak on GPU; on CPU one process cannot
attribute its RSS to one of several models, so only the process's peak RSS is reported.

Collectives: one outer step of each SNOO variant runs under torch.profiler, which records every
c10d collective (functional or not, any backend); the count must be 0. A positive control (one
all_reduce under the same counter) shows the counter would have seen one.

World size 2 is spawned from this script (gloo on CPU, one thread per rank). Writes
bench/results/overhead_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import free_port
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent

from snoo_train.config import OptimConfig  # noqa: E402
from snoo_train.dist import exit_process, init_distributed  # noqa: E402
from snoo_train.metrics import peak_memory_bytes  # noqa: E402
from snoo_train.models import PRESETS, build_model, materialize, parallelize  # noqa: E402
from snoo_train.optim import SNOO  # noqa: E402
from snoo_train.optim.build import build_optimizer  # noqa: E402
from snoo_train.trainer import causal_lm_loss  # noqa: E402

VOCAB = 257  # the byte tokenizer's


def local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def count_collectives(fn) -> int:
    """Number of c10d collectives `fn` issues (every backend dispatches them as c10d:: ops)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("c10d::"))


def build_variant(args, info, k: int | None):
    model = build_model(PRESETS[args.model], VOCAB, seed=0, device="meta")
    model = parallelize(model, mesh=info.mesh)
    materialize(model, device=info.device, seed=0)
    cfg = OptimConfig(lr=args.lr, outer="none" if k is None else "snoo", k=k or 1)
    return model, build_optimizer(model, cfg)


def measure(args, info) -> dict:
    """Everything for one (device, world size), on this rank; rank 0's dict is the result."""
    device, ws = info.device, info.world_size
    names = ["inner"] + [f"snoo_k{k}" for k in args.ks]
    ks = [None] + list(args.ks)
    variants = {name: build_variant(args, info, k) for name, k in zip(names, ks)}

    # Same batch everywhere; each rank takes its slice, as the trainer's loader would.
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (args.batch_size, args.seq_len + 1), generator=gen)
    per_rank = args.batch_size // ws
    ids = ids[info.rank * per_rank : (info.rank + 1) * per_rank].to(device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # On CPU the process's own CPU time: on a shared machine other processes' load stretches
    # wall time at random, not the work done here (one thread per rank, and the optimizer step
    # issues no collective to wait on). On CUDA, wall time after a synchronize.
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    fwd_bwd_s = []
    for rep in range(3):  # the first pass warms up allocator and kernels: untimed
        for model, _ in variants.values():
            sync()
            t0 = clock()
            causal_lm_loss(model, batch).backward()
            sync()
            if rep:
                fwd_bwd_s.append(clock() - t0)

    block_s = {name: [] for name in names}
    peak = dict.fromkeys(names, 0)
    steps = dict.fromkeys(names, 0)

    def block(name: str, n: int, timed: bool) -> None:
        opt = variants[name][1]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t0 = clock()
        for _ in range(n):
            opt.step()  # gradients stay in place: the same update problem every step
        sync()
        if timed:
            block_s[name].append(clock() - t0)
            steps[name] += n
        if device.type == "cuda":
            peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))

    for name in names:
        block(name, args.block, timed=False)  # warm-up: allocate state, first outer steps
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            block(name, args.block, timed=True)

    results = {}
    param_bytes = sum(local_bytes(p) for p in variants["inner"][0].parameters())
    full_param_bytes = sum(p.numel() * p.element_size() for p in variants["inner"][0].parameters())
    for name in names:
        model, opt = variants[name]
        snoo_bytes = inner_bytes = 0
        for state in opt.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    if key.startswith("snoo_"):
                        snoo_bytes += local_bytes(value)
                    else:
                        inner_bytes += local_bytes(value)
        r = {
            # The median block: a burst of load from elsewhere on the machine skews one block,
            # not the figure.
            "opt_step_ms": 1e3 * statistics.median(block_s[name]) / args.block,
            "opt_step_ms_mean": 1e3 * sum(block_s[name]) / steps[name],
            "inner_state_bytes": inner_bytes,
            "snoo_state_bytes": snoo_bytes,
        }
        if device.type == "cuda":
            r["peak_mem_bytes"] = peak[name]
        if isinstance(opt, SNOO):
            k = opt.param_groups[0]["snoo_k"]
            # Run to just before an outer step, then count what that one step issues.
            while (opt.param_groups[0]["snoo_step"] + 1) % k:
                opt.step()
            r["collectives_per_outer_step"] = count_collectives(opt.step)
            r["outer_steps_timed"] = steps[name] // k
        results[name] = r

    # This rank's figures, gathered so that rank 0 can report the largest (uneven shards).
    per_rank = [None] * ws
    if ws > 1:
        dist.all_gather_object(per_rank, {n: results[n]["snoo_state_bytes"] for n in names})
        control = count_collectives(lambda: dist.all_reduce(torch.ones(1, device=device)))
    else:
        per_rank = [{n: results[n]["snoo_state_bytes"] for n in names}]
        control = None
    for name in names:
        results[name]["snoo_state_bytes_max_rank"] = max(r[name] for r in per_rank)

    base = results["inner"]["opt_step_ms"]
    fwd_bwd_ms = 1e3 * statistics.median(fwd_bwd_s)
    for name in names:
        r = results[name]
        r["opt_step_ratio_vs_inner"] = r["opt_step_ms"] / base
        # Extra time as a share of a whole training step (forward/backward + inner step).
        r["overhead_pct_of_train_step"] = 100 * (r["opt_step_ms"] - base) / (fwd_bwd_ms + base)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": ws,
        "param_bytes_per_rank": param_bytes,
        "param_bytes_total": full_param_bytes,
        "floor_2x_params_over_ranks": 2 * full_param_bytes / ws,
        "fwd_bwd_ms": fwd_bwd_ms,
        "timed_steps_per_variant": args.rounds * args.block,
        "collectives_positive_control": control,
        # A spawned rank's max RSS starts from its parent's (Linux carries it over fork), so on
        # CPU it means something only for world size 1, measured in this process.
        "process_peak_mem_bytes": peak_memory_bytes(device) if device.type == "cuda" or ws == 1 else None,
        "variants": results,
    }



def _rank_main(rank: int, ws: int, port: int, args, device: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(ws), LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    info = init_distributed(device)
    try:
        result = measure(args, info)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    exit_process(0)  # leave without gloo's teardown (snoo_train/dist.py); the result is on disk


def run_world(args, ws: int, device: str) -> dict:
    if ws == 1:
        os.environ.pop("WORLD_SIZE", None)
        torch.set_num_threads(args.threads)
        return measure(args, init_distributed(device))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.start_processes(_rank_main, args=(ws, free_port(), args, device, out), nprocs=ws,
                           join=True, start_method="spawn")
        return json.loads(Path(out).read_text())


def print_table(rows: list[dict]) -> None:
    print(f"\n{'device':<8}{'ws':>3} {'variant':<10}{'opt step ms':>12}{'x inner':>9}{'% of step':>10}"
          f"{'extra B/rank':>14}{'floor B':>12}{'coll/outer':>11}{'peak MiB':>10}")
    for row in rows:
        dev = "cuda" if row["device"] != "cpu" else "cpu"
        for name, r in row["variants"].items():
            peak = r.get("peak_mem_bytes")
            print(f"{dev:<8}{row['world_size']:>3} {name:<10}{r['opt_step_ms']:>12.3f}"
                  f"{r['opt_step_ratio_vs_inner']:>9.3f}{r['overhead_pct_of_train_step']:>10.2f}"
                  f"{r['snoo_state_bytes_max_rank']:>14,}{row['floor_2x_params_over_ranks']:>12,.0f}"
                  f"{str(r.get('collectives_per_outer_step', '-')):>11}"
                  + (f"{peak / 2**20:>10.1f}" if peak else f"{'-':>10}"))
        print(f"{'':<12}forward/backward {row['fwd_bwd_ms']:.1f} ms; positive control: "
              f"{row['collectives_positive_control']} collective(s) seen for one all_reduce")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_small")
    p.add_argument("--ks", default="1,10,100", help="SNOO's k values")
    p.add_argument("--world-sizes", default="1,2", help="CPU world sizes (gloo)")
    p.add_argument("--cuda", choices=("auto", "yes", "no"), default="auto",
                   help="also measure world size 1 on CUDA (auto: when a GPU is visible)")
    p.add_argument("--block", type=int, default=100, help="steps per timed block (a multiple of every k)")
    p.add_argument("--rounds", type=int, default=8, help="timed blocks per variant")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4, help="inner lr (small: fixed gradients repeat)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",")]
    bad = [k for k in args.ks if args.block % k]
    if bad:
        p.error(f"--block {args.block} is not a multiple of k={bad}: blocks would differ in outer steps")

    rows = []
    for ws in [int(w) for w in args.world_sizes.split(",") if w.strip()]:
        print(f"cpu, world size {ws} ...", flush=True)
        rows.append(run_world(args, ws, "cpu"))
    if args.cuda == "yes" or (args.cuda == "auto" and torch.cuda.is_available()):
        print("cuda, world size 1 ...", flush=True)
        rows.append(run_world(args, 1, "cuda"))
    print_table(rows)

    report = {
        "benchmark": "overhead",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "bench/overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "threads_per_rank": args.threads, "torch": torch.__version__,
                    "load_avg_at_end": os.getloadavg()[0]},
        "model": args.model,
        "clock": "process CPU time (cpu), wall time (cuda)",
        "settings": {"ks": args.ks, "block": args.block, "rounds": args.rounds,
                     "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr},
        "results": rows,
        "max_collectives_per_outer_step": max(
            r.get("collectives_per_outer_step", 0) for row in rows for r in row["variants"].values()),
    }
    tag = "cuda" if any(r["device"] != "cpu" for r in rows) else "cpu"
    out = Path(args.out or REPO / "bench" / "results" / f"overhead_{args.model}_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"collectives per outer step (max over variants and world sizes): "
          f"{report['max_collectives_per_outer_step']}\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
