"""Checkpoint cost: save and load time (sync and async), how long an async save blocks the
training loop compared with a sync one, and the size on disk against the state it holds.

    python bench/checkpoint.py                                 # llama_small, one process
    python bench/checkpoint.py --model llama_125m --repeats 3 trainer.batch_size=8

Blocking is measured two ways, both in this one run so the ratio is not machine drift:
  * call: how long `save_checkpoint()` takes to return (sync: the whole write; async: staging
    the tensors into a host copy);
  * loop: the extra wall time of `--window` training steps that start with a save, over the
    same steps without one (async writing competes with training for CPU and disk, which the
    call time alone would hide).
Size: bytes of every file in a checkpoint against parameters + inner optimizer state + SNOO's
2 x parameters, the tensors it must hold.
Writes bench/results/checkpoint_<model>.json.

    python bench/checkpoint.py --spread                        # world sizes 1, 2, 4 (torchrun, gloo)
    python bench/checkpoint.py --spread --ranks 1,2,4,8 --model llama_125m

`--spread`: who pays for checksums. For a fixed model (SNOO(AdamW): parameters, two Adam
moments, slow weights and momentum, each sharded over the ranks like FSDP2 shards them), each
world size saves and verifies one checkpoint, and each rank reports its own work: writing and
checksumming its files while writing them (plus, on rank 0, merging and publishing the
manifest), and verifying the share of files dealt to it before a resume; wall and CPU
seconds (CPU seconds do not depend on how many cores the ranks share). `rank 0 alone` is the
former cost: one rank re-reading and checksumming every file, after each save and again
before each resume. Writes bench/results/checkpoint_spread_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, compose_config, state_bytes, write_report

from snoo_train.checkpoint import Checkpointer, verify_checkpoint, verify_spread
from snoo_train.dist import init_distributed
from snoo_train.trainer import Trainer


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- --spread: each rank's save and verify time at several world sizes ------------------------------

STATE_COPIES = ("param", "exp_avg", "exp_avg_sq", "snoo_slow", "snoo_momentum")  # SNOO(AdamW)


def sharded_state(model: str, rank: int, world_size: int) -> dict:
    """The model's parameters and SNOO(AdamW)'s four copies of them, each row-sharded over the
    ranks as FSDP2 shards them (this rank's part only; DTensors above one rank)."""
    from snoo_train.models import PRESETS, build_model

    shapes = {n: p.shape for n, p in build_model(PRESETS[model], 257, seed=0, device="meta").named_parameters()}
    mesh = None
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(rank)
    state: dict = {}
    for copy in STATE_COPIES:
        for name, shape in shapes.items():
            rows = -(-shape[0] // world_size)  # torch.chunk's split: Shard(0)'s
            local_rows = max(0, min(rows, shape[0] - rank * rows))
            local = torch.rand((local_rows, *shape[1:]), generator=gen)
            if mesh is not None:
                from torch.distributed.tensor import DTensor, Shard

                local = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape,
                                           stride=torch.empty(shape, device="meta").stride())  # fmt: skip
            state.setdefault(copy, {})[name] = local
    return state


def spread_worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: save and verify a checkpoint `--repeats` times, report its own times."""
    import torch.distributed as dist

    info = init_distributed("cpu")
    state = sharded_state(args.model, info.rank, info.world_size)
    barrier = dist.barrier if info.world_size > 1 else (lambda: None)
    rows = []
    directory = Path(args.tmp) / f"ws{info.world_size}"  # the parent's temporary directory
    ckpt = Checkpointer(directory, keep_latest=1, rank=info.rank, world_size=info.world_size)
    for repeat in range(args.repeats):
        barrier()
        t0 = time.perf_counter()
        ckpt.save(repeat + 1, state, {}, blocking=True)
        row = {"save_call_s": time.perf_counter() - t0, **ckpt.last_timing}
        path = directory / f"step_{repeat + 1:08d}"
        barrier()
        row.update(verify_spread(path))
        barrier()
        if info.rank == 0:  # the former cost: one rank re-reads and checksums every file
            t0 = time.perf_counter()
            verify_checkpoint(path)
            row["rank0_alone_s"] = time.perf_counter() - t0
            row["checkpoint_bytes"] = sum(p.stat().st_size for p in path.iterdir())
        barrier()
        rows.append(row)
    per_rank = [rows]
    if info.world_size > 1:
        per_rank = [None] * info.world_size
        dist.all_gather_object(per_rank, rows)
    barrier()
    if info.rank == 0:
        Path(args.part).write_text(json.dumps(per_rank))
    if info.world_size > 1:
        dist.destroy_process_group()


def own_work(row: dict) -> tuple[float, float]:
    """(wall, CPU) seconds of a rank's own save work: its writes, plus rank 0's publishing."""
    return row["write_s"] + row.get("publish_s", 0.0), row["write_cpu_s"] + row.get("publish_cpu_s", 0.0)


def spread(args: argparse.Namespace) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.ranks.split(",")]:
            part = Path(tmp) / f"ws{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   __file__, "--spread-worker", "--part", str(part), "--tmp", tmp, "--model", args.model,
                   "--repeats", str(args.repeats)]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
            subprocess.run(cmd, check=True, env=env)
            per_rank = json.loads(part.read_text())
            summary = []
            for rank, rows in enumerate(per_rank):
                med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "checkpoint_bytes"}
                own = [own_work(r) for r in rows]
                med["save_own_s"] = statistics.median(o[0] for o in own)
                med["save_own_cpu_s"] = statistics.median(o[1] for o in own)
                summary.append({"rank": rank, **med})
            results[n] = {"per_rank": summary, "checkpoint_bytes": per_rank[0][0]["checkpoint_bytes"]}

    print(f"\ncheckpoint save and verify per rank, {args.model} SNOO(AdamW) state, median of {args.repeats}; "
          "seconds wall (CPU)")  # fmt: skip
    print(f"{'ranks':>5} {'rank':>4} {'save: own work':>16} {'save call':>10} {'verify: own share':>18} {'rank 0 alone':>13}")
    for n, res in results.items():
        for r in res["per_rank"]:
            alone = f"{r['rank0_alone_s']:.3f}" if "rank0_alone_s" in r else ""
            print(f"{n:>5} {r['rank']:>4} {r['save_own_s']:>7.3f} ({r['save_own_cpu_s']:.3f}) {r['save_call_s']:>10.3f} "
                  f"{r['verify_s']:>8.3f} ({r['verify_cpu_s']:.3f}) {alone:>13}")  # fmt: skip
    ratios = {}
    for n, res in results.items():
        ranks = res["per_rank"]
        if n > 1:
            others = ranks[1:]
            ratios[n] = {
                f"{what}_rank0_over_max_other_{unit}": ranks[0][key] / max(r[key] for r in others)
                for what, unit, key in (
                    ("save", "wall", "save_own_s"), ("save", "cpu", "save_own_cpu_s"),
                    ("verify", "wall", "verify_s"), ("verify", "cpu", "verify_cpu_s"), ("verify", "bytes", "verify_bytes"),
                )
            }  # fmt: skip
            v = ratios[n]
            print(f"{n} ranks, rank 0 / slowest other rank: save {v['save_rank0_over_max_other_wall']:.2f} wall, "
                  f"{v['save_rank0_over_max_other_cpu']:.2f} CPU; verify {v['verify_rank0_over_max_other_wall']:.2f} wall, "
                  f"{v['verify_rank0_over_max_other_cpu']:.2f} CPU, {v['verify_rank0_over_max_other_bytes']:.3f} bytes")  # fmt: skip
    report = {
        "model": args.model,
        "state": "parameters + exp_avg + exp_avg_sq + snoo_slow + snoo_momentum, fp32, Shard(0) over the ranks",
        "checkpoint_bytes": next(iter(results.values()))["checkpoint_bytes"],
        "repeats": args.repeats,
        "cpu_cores": os.cpu_count(),
        "world_sizes": {str(n): res for n, res in results.items()},
        "rank0_over_slowest_other": {str(n): v for n, v in ratios.items()},
        "command": "python bench/checkpoint.py " + " ".join(sys.argv[1:]),
    }
    write_report(report, args.out or REPO / "bench" / "results" / f"checkpoint_spread_{args.model}.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_small")
    parser.add_argument("--repeats", type=int, default=3, help="saves and loads timed per mode")
    parser.add_argument("--window", type=int, default=5, help="training steps timed after each save")
    parser.add_argument("--out", default=None)
    parser.add_argument("--spread", action="store_true", help="each rank's save and verify time at --ranks world sizes")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--spread-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    if args.spread_worker:
        return spread_worker(args)
    if args.spread:
        return spread(args)

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"model={args.model}", "optim=snoo_adamw", "trainer.progress=false",
            "trainer.eval_interval=0", "trainer.max_steps=100000", "data.max_documents=400",
            "checkpoint.interval=0", "checkpoint.keep_latest=0", "trainer.resume=none", *args.overrides,
        ]  # fmt: skip
        info = init_distributed("auto")
        sync_cuda = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
        trainers = {}
        for mode in ("sync", "async"):
            cfg = compose_config(overrides + [f"checkpoint.async_save={mode == 'async'}"], f"{tmp}/{mode}")
            trainers[mode] = Trainer(cfg, info)
        step = {mode: 0 for mode in trainers}

        def train(mode: str, n: int) -> float:
            sync_cuda()
            t0 = time.perf_counter()
            for _ in range(n):
                step[mode] += 1
                trainers[mode].step = step[mode]
                trainers[mode].train_step(step[mode])
            sync_cuda()
            return time.perf_counter() - t0

        for mode in trainers:  # optimizer state exists, first-step costs are paid
            train(mode, 3)

        results: dict[str, dict[str, list[float]]] = {m: {"call_s": [], "loop_extra_s": [], "write_s": []} for m in trainers}
        # Alternate modes and interleave baseline windows, so noise hits both alike.
        for r in range(args.repeats):
            for mode in ("sync", "async") if r % 2 == 0 else ("async", "sync"):
                trainer = trainers[mode]
                base = train(mode, args.window)
                t0 = time.perf_counter()
                trainer.save_checkpoint()
                call = time.perf_counter() - t0
                loop = call + train(mode, args.window)
                trainer.checkpointer.wait()
                write = time.perf_counter() - t0
                results[mode]["call_s"].append(call)
                results[mode]["loop_extra_s"].append(loop - base)
                results[mode]["write_s"].append(write)

        ckpt = sorted((Path(tmp) / "sync" / "checkpoints").glob("step_*"))[-1]
        load_s, verify_s = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            verify_checkpoint(ckpt)
            verify_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            trainers["sync"].state.load(str(ckpt))
            sync_cuda()
            load_s.append(time.perf_counter() - t0)

        sb = state_bytes(trainers["sync"])
        expected = sb["param_bytes"] + sb["inner_state_bytes"] + sb["snoo_state_bytes"]
        on_disk = dir_bytes(ckpt)
        step_s = train("sync", args.window) / args.window

    med = {m: {k: statistics.median(v) for k, v in results[m].items()} for m in results}
    report = {
        "model": args.model,
        "device": str(info.device),
        "params": sum(p.numel() for p in trainers["sync"].model.parameters()),
        "train_step_s": step_s,
        "save": med,
        "save_all": results,
        "async_vs_sync_call_ratio": med["async"]["call_s"] / med["sync"]["call_s"],
        "async_vs_sync_loop_blocked_ratio": med["async"]["loop_extra_s"] / med["sync"]["loop_extra_s"],
        "load_s": statistics.median(load_s),
        "verify_s": statistics.median(verify_s),
        "bytes_on_disk": on_disk,
        "bytes_expected": expected,
        **sb,
        "disk_over_expected": on_disk / expected,
        "command": "python bench/checkpoint.py " + " ".join(sys.argv[1:]),
    }
    print(f"\ncheckpoint cost, {args.model} ({report['params'] / 1e6:.1f}M params) on {info.device}, "
          f"median of {args.repeats}; a training step takes {step_s:.3f} s")  # fmt: skip
    print(f"{'':8} {'call (s)':>10} {'loop blocked (s)':>18} {'write done (s)':>16}")
    for mode in ("sync", "async"):
        m = med[mode]
        print(f"{mode:8} {m['call_s']:>10.3f} {m['loop_extra_s']:>18.3f} {m['write_s']:>16.3f}")
    print(f"async / sync: call {report['async_vs_sync_call_ratio']:.3f}, "
          f"loop blocked {report['async_vs_sync_loop_blocked_ratio']:.3f}")  # fmt: skip
    print(f"load {report['load_s']:.3f} s (+ verify CRC32 {report['verify_s']:.3f} s)")
    print(f"on disk {on_disk:,} B vs params {sb['param_bytes']:,} + inner state {sb['inner_state_bytes']:,} "
          f"+ SNOO {sb['snoo_state_bytes']:,} = {expected:,} B (ratio {report['disk_over_expected']:.4f})")  # fmt: skip
    write_report(report, args.out or REPO / "bench" / "results" / f"checkpoint_{args.model}.json")


if __name__ == "__main__":
    main()
