"""Bytes communicated per training step: AdamW and SNOO under FSDP over all ranks, and DiLoCo
(SNOO with parallel.replicas=2: FSDP inside each replica, the pseudo-gradient averaged across
replicas every K steps, in fp32 and with optim.outer_reduce_dtype=bf16).

    torchrun --nproc_per_node=4 bench/comm.py                                   # llama_small, K=20
    torchrun --nproc_per_node=4 bench/comm.py --model llama_125m --k 100 trainer.batch_size=8

All three sides train in ONE torchrun job through the real trainer (`Trainer.train_step`), one
warm-up step, then K measured steps each: any K consecutive steps hold exactly one outer step,
so per-step figures are averages over a full outer cycle. Every collective is recorded as it is
dispatched (a TorchDispatchMode that also sees the collectives DTensor issues inside its ops,
such as the gradient-norm all-reduce), with its process group's ranks and tensor sizes.

Two byte figures per collective, per rank:
  * payload: the tensor bytes the collective is about (all-gather: the gathered output;
    reduce-scatter: the input; all-reduce: the tensor);
  * sent (the table's figure): what a ring algorithm makes each rank send, payload x
    (n-1)/n for all-gather and reduce-scatter, x 2(n-1)/n for all-reduce, n = group size.
Traffic is split by phase (inner: forward, backward, clipping, the loss all-reduce and inner
optimizer steps; outer: SNOO's outer step) and by reach: "intra" collectives stay inside one
block of world/replicas consecutive ranks (one replica of the DiLoCo side; think one node of a
replicas-node job), "cross" ones span blocks, i.e. would cross the slow inter-node links. FSDP
over all ranks spans every block; DiLoCo crosses blocks only in the outer all-reduce (and the
trainer's per-step loss scalar).

Writes bench/results/comm_<model>.json and prints a table.

`--layouts` compares layouts of one model inside a replica instead (parallel.tp, parallel.ep):
    torchrun --nproc_per_node=4 bench/comm.py --layouts --model llama_small   # FSDP 4, FSDP 2 x TP 2
    torchrun --nproc_per_node=4 bench/comm.py --layouts --model moe_small     # FSDP 4, EP 2 x FSDP 2, EP 4
Each layout trains through the real trainer in the same job: K recorded steps (bytes by kind of
collective: all-gather, reduce-scatter, all-reduce, all-to-all), then timed steps interleaved
ABBA across the layouts, so the step-time ratios come from one run. Writes
bench/results/comm_layouts_<model>.json.

`--pp P` compares pipeline layouts with FSDP over every rank instead, all on the untied model
(model.tie_embeddings=false; the stage count must divide model.num_layers):
    torchrun --nproc_per_node=4 bench/comm.py --layouts --pp 2 --pp-microbatches 4 model.num_layers=8
PP 2 x FSDP 2 under 1F1B, GPipe and Interleaved1F1B (2 stages per rank), and PP 2 x TP 2 under
1F1B. The stages' point-to-point sends (c10d send/recv, which the recorder sees as it sees the
collectives) are counted apart from the collectives. Over the timed steps each pipeline rank
also clocks its time blocked in the schedule's point-to-point waits (bench/pipeline_waits.py):
that share of the schedule's step is its measured bubble, printed beside the theoretical
(p-1)/(v m + p-1) of p ranks, v stages per rank and m micro-batches. Writes
bench/results/comm_layouts_pp_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from common import REPO, compose_config, time_interleaved
from pipeline_waits import WaitClock
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from snoo_train.config import (
    Config,
    pipeline_microbatches,
    pipeline_stages_per_rank,
    validate_config,
)
from snoo_train.dist import destroy_distributed, exit_process, init_distributed
from snoo_train.trainer import Trainer

_SKIP = ("wait_tensor", "_wrap_tensor_autograd", "barrier", "monitored_barrier")


def _group_ranks(func, args, kwargs) -> tuple[int, ...]:
    for a in [*args, *(kwargs or {}).values()]:
        if isinstance(a, torch.ScriptObject):  # eager c10d ops carry the ProcessGroup boxed
            try:
                return tuple(dist.get_process_group_ranks(dist.ProcessGroup.unbox(a)))
            except Exception:  # a boxed ReduceOp
                continue
        if isinstance(a, str) and func.namespace == "_c10d_functional":  # functional: by name
            try:
                return tuple(dist.get_process_group_ranks(dist.distributed_c10d._resolve_process_group(a)))
            except Exception:
                continue
    raise RuntimeError(f"no process group found in the arguments of {func}")


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


def payload_and_sent(name: str, args, n: int, me: int = 0) -> tuple[int, float, str]:
    """(payload bytes, bytes a ring algorithm sends per rank, kind) of one collective; `me` is
    this rank's index in the group."""
    if name in ("_allgather_base_", "all_gather_into_tensor"):
        payload = _nbytes(args[0]) if name == "_allgather_base_" else _nbytes(args[0]) * n
        return payload, payload * (n - 1) / n, "all_gather"
    if name in ("allgather_", "allgather_into_tensor_coalesced_", "all_gather_into_tensor_coalesced"):
        payload = _nbytes(args[1]) * n if name == "allgather_" else _nbytes(args[0]) * n
        return payload, payload * (n - 1) / n, "all_gather"
    if name in ("_reduce_scatter_base_", "reduce_scatter_tensor", "reduce_scatter_", "reduce_scatter_tensor_coalesced"):
        payload = _nbytes(args[1]) if name in ("_reduce_scatter_base_", "reduce_scatter_") else _nbytes(args[0])
        return payload, payload * (n - 1) / n, "reduce_scatter"
    if name in ("allreduce_", "all_reduce", "allreduce_coalesced_", "all_reduce_coalesced", "all_reduce_"):
        payload = _nbytes(args[0])
        return payload, 2 * payload * (n - 1) / n, "all_reduce"
    if name in ("alltoall_base_", "all_to_all_single"):
        # Uneven splits: what leaves this rank is its input minus the rows it keeps for itself.
        inp, splits = (args[1], args[4]) if name == "alltoall_base_" else (args[0], args[2])
        payload = _nbytes(inp)
        kept = payload / n
        if splits and inp.shape[0]:
            kept = payload * splits[me] / inp.shape[0]
        return payload, payload - kept, "all_to_all"
    if name == "send":  # point-to-point (pipeline stages): all of it leaves this rank
        payload = _nbytes(args[0])
        return payload, float(payload), "send"
    if name in ("recv_", "recv_any_source_"):  # its bytes are the sender's
        return _nbytes(args[0]), 0.0, "recv"
    if name in ("broadcast_", "broadcast"):
        payload = _nbytes(args[0])
        return payload, float(payload), "broadcast"
    payload = _nbytes(args[0]) if args else 0
    return payload, float(payload), name  # anything else: counted, at face value


class CommRecorder(TorchDispatchMode):
    """Every collective: name, kind, group ranks, payload bytes, ring bytes sent, and `tag()`
    at the time it was issued."""

    def __init__(self, tag=lambda: None) -> None:
        super().__init__()
        self.ops: list[dict] = []
        self.tag = tag

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            # DTensor first desugars the op (into its collectives, seen below), as torch's
            # CommDebugMode lets it.
            return NotImplemented
        if func.namespace in ("c10d", "_c10d_functional"):
            name = func.overloadpacket.__name__
            if name not in _SKIP:
                ranks = _group_ranks(func, args, kwargs)
                me = ranks.index(dist.get_rank()) if dist.get_rank() in ranks else 0
                payload, sent, kind = payload_and_sent(name, args, len(ranks), me)
                self.ops.append({"name": name, "kind": kind, "ranks": ranks, "payload": payload,
                                 "sent": sent, "tag": self.tag()})  # fmt: skip
        return func(*args, **(kwargs or {}))


def make_config(
    args: argparse.Namespace, optim: str, replicas: int, reduce_dtype: str, run_dir: str, world_size: int,
    extra: list[str] = (),
) -> Config:
    overrides = [
        f"model={args.model}", f"optim={optim}", f"parallel.replicas={replicas}", *extra,
        f"trainer.max_steps={args.k + 1 + args.timed_steps}", f"trainer.batch_size={args.batch_size}",
        f"data.seq_len={args.seq_len}", "trainer.progress=false", "trainer.eval_interval=0",
        "logging.wandb.mode=disabled", *args.overrides,
    ]  # fmt: skip
    if optim.startswith("snoo"):
        overrides += [f"optim.k={args.k}", f"optim.outer_reduce_dtype={reduce_dtype}"]
    cfg = compose_config(overrides, run_dir)
    validate_config(cfg, world_size=world_size)
    return cfg


def measure(trainer: Trainer, k: int, block: tuple[int, ...]) -> dict:
    """One untimed warm-up step, then K recorded steps; this rank's bytes per step."""
    optimizer = trainer.optimizer
    in_optimizer = {"on": False}
    optimizer.register_step_pre_hook(lambda *a: in_optimizer.update(on=True))
    optimizer.register_step_post_hook(lambda *a: in_optimizer.update(on=False))

    trainer.train_step(1)
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    outer_steps = 0
    for step in range(2, k + 2):
        # Each op is tagged with whether it ran inside optimizer.step() (the hooks fire inside).
        recorder = CommRecorder(tag=lambda: in_optimizer["on"])
        with recorder:
            trainer.train_step(step)
        outer = bool(getattr(optimizer, "outer_step_taken", False))
        outer_steps += outer
        for op in recorder.ops:
            phase = "outer" if (op["tag"] and outer) else "inner"
            reach = "intra" if set(op["ranks"]) <= set(block) else "cross"
            for key in ("total", phase, reach, f"{phase}_{reach}", f"{op['kind']}_{reach}"):
                sums[f"sent_{key}"] += op["sent"]
                counts[key] += 1
            sums["payload_total"] += op["payload"]
            sums[f"payload_{phase}"] += op["payload"]
            sums[f"payload_{op['kind']}"] += op["payload"]
    per_step = {key: value / k for key, value in sums.items()}
    return {
        "steps": k,
        "outer_steps": outer_steps,
        "bytes_per_step": per_step,
        "collectives_per_step": {key: value / k for key, value in counts.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_small")
    parser.add_argument("--k", type=int, default=20, help="SNOO's inner steps per outer step")
    parser.add_argument("--replicas", type=int, default=2, help="DiLoCo replicas")
    parser.add_argument("--batch-size", type=int, default=8, help="global sequences per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default=None)
    parser.add_argument("--layouts", action="store_true", help="compare FSDP / TP / EP layouts of --model")
    parser.add_argument("--optim", default="snoo_adamw", help="--layouts: the optimizer of every layout")
    parser.add_argument("--timed-steps", type=int, default=0, help="--layouts: timed steps per layout (default 2K)")
    parser.add_argument("--pp", type=int, default=1,
                        help="--layouts: pipeline layouts of this many stages (each schedule) against FSDP over all ranks")
    parser.add_argument("--pp-microbatches", type=int, default=4, help="--pp: micro-batches per step")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every side")
    args = parser.parse_intermixed_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.layouts:
        args.timed_steps = args.timed_steps or 2 * args.k
        # Pipelines refuse tied embeddings: every layout, FSDP's too, then trains the same untied model.
        args.common = ["model.tie_embeddings=false"] if args.pp > 1 else []
        compare_layouts(args, world_size, t_start)
        return
    if world_size < 2 or world_size % args.replicas:
        parser.error(f"run under torchrun with a multiple of --replicas={args.replicas} ranks (>= 2)")
    tmp = tempfile.mkdtemp(prefix="snoo_comm_")
    sides = {  # name: (optim, replicas, DiLoCo's all-reduce dtype)
        "adamw": ("adamw", 1, "fp32"),
        "snoo": ("snoo_adamw", 1, "fp32"),
        f"diloco_r{args.replicas}": ("snoo_adamw", args.replicas, "fp32"),
        f"diloco_r{args.replicas}_bf16": ("snoo_adamw", args.replicas, "bf16"),
    }
    cfgs = {
        name: make_config(args, o, r, dtype, os.path.join(tmp, name), world_size)
        for name, (o, r, dtype) in sides.items()
    }
    device = cfgs["adamw"].trainer.device
    infos = {r: init_distributed(device, replicas=r) for r in sorted({r for _, r, _ in sides.values()})}
    rank = infos[1].rank
    per_block = world_size // args.replicas
    block = tuple(range(rank // per_block * per_block, (rank // per_block + 1) * per_block))

    results = {}
    for name, (_, replicas, _) in sides.items():
        trainer = Trainer(cfgs[name], infos[replicas])
        dist.barrier()
        results[name] = measure(trainer, args.k, block)
        results[name]["replicas"] = replicas
        trainer.metrics.close()
        num_params = trainer.num_params
        del trainer

    # Every rank's figures; the table shows the mean over ranks (shards can differ by padding).
    gathered: list[dict] = [None] * world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, results)
    destroy_distributed()
    if rank != 0:
        return

    mean: dict[str, dict] = {}
    for name in sides:
        keys = set().union(*(g[name]["bytes_per_step"] for g in gathered))
        mean[name] = {
            "replicas": results[name]["replicas"],
            "outer_steps_in_window": results[name]["outer_steps"],
            "bytes_per_step_per_rank": {
                key: sum(g[name]["bytes_per_step"].get(key, 0.0) for g in gathered) / world_size for key in sorted(keys)
            },
            "collectives_per_step_rank0": results[name]["collectives_per_step"],
        }  # fmt: skip
    base = mean["adamw"]["bytes_per_step_per_rank"]
    for name in sides:
        b = mean[name]["bytes_per_step_per_rank"]
        mean[name]["ratio_vs_adamw"] = {
            key: (b.get(f"sent_{key}", 0.0) / base[f"sent_{key}"]) if base.get(f"sent_{key}") else None
            for key in ("total", "cross", "intra")
        }

    param_bytes = num_params * 4
    report = {
        "benchmark": "comm",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["torchrun", f"--nproc_per_node={world_size}", "bench/comm.py", *sys.argv[1:]]),
        "machine": {"device": infos[1].device.type, "world_size": world_size, "cpu_count": os.cpu_count(),
                    "cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "model": args.model,
        "params": num_params,
        "param_bytes_fp32": param_bytes,
        "settings": {"k": args.k, "replicas": args.replicas, "batch_size": args.batch_size,
                     "seq_len": args.seq_len,
                     "steps_measured_per_side": args.k, "block_ranks": per_block},
        "definitions": {
            "sent": "bytes a ring algorithm makes each rank send: all-gather and reduce-scatter "
                    "payload x (n-1)/n, all-reduce 2 x payload x (n-1)/n, n = group size",
            "payload": "tensor bytes of the collective (all-gather output, reduce-scatter input, "
                       "all-reduce tensor)",
            "intra/cross": f"the group stays inside / spans blocks of {per_block} consecutive ranks "
                           "(one DiLoCo replica; one node of a replicas-node job)",
            "inner/outer": "outer = SNOO's outer step (inside optimizer.step() on an outer step); "
                           "inner = everything else in the train step",
        },
        "results": mean,
        "wall_time_s": time.perf_counter() - t_start,
    }  # fmt: skip
    print_table(report)
    out = Path(args.out or REPO / "bench" / "results" / f"comm_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


# Layouts inside one replica, per model family: name -> overrides.
LAYOUTS = {
    "llama": {"fsdp": [], "fsdp_x_tp2": ["parallel.tp=2"]},
    "moe": {"fsdp": [], "ep2_x_fsdp": ["parallel.ep=2"], "ep4": ["parallel.ep=4"]},
}
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")
# The schedules --pp compares. InterleavedZeroBubble and ZBVZeroBubble stay out while their
# gradients with more than one FSDP layer per stage are being repaired (issue 24).
PP_SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B")


def pipeline_layouts(pp: int, microbatches: int, world_size: int) -> dict[str, list[str]]:
    """--pp: FSDP over every rank (the baseline), PP x FSDP under each schedule, PP x TP 2 (1F1B)."""
    common = [f"parallel.pp={pp}", f"parallel.pp_microbatches={microbatches}"]
    shard = world_size // pp
    layouts: dict[str, list[str]] = {"fsdp": []}
    for schedule in PP_SCHEDULES:
        layouts[f"pp{pp}_x_fsdp{shard}_{schedule.lower()}"] = [*common, f"parallel.pp_schedule={schedule}"]
    if shard % 2 == 0:
        name = f"pp{pp}_x_tp2_1f1b" if shard == 2 else f"pp{pp}_x_fsdp{shard // 2}_x_tp2_1f1b"
        layouts[name] = [*common, "parallel.tp=2", "parallel.pp_schedule=1F1B"]
    return layouts


def compare_layouts(args: argparse.Namespace, world_size: int, t_start: float) -> None:
    """Bytes per rank per step by kind of communication, and step time, for each layout of --model;
    with --pp, the pipeline layouts and each pipeline rank's measured bubble."""
    tmp = tempfile.mkdtemp(prefix="snoo_layouts_")
    family = compose_config([f"model={args.model}"], tmp).model.family
    layouts = pipeline_layouts(args.pp, args.pp_microbatches, world_size) if args.pp > 1 else LAYOUTS[family]
    trainers, results = {}, {}
    for name, extra in layouts.items():
        cfg = make_config(args, args.optim, 1, "fp32", os.path.join(tmp, name), world_size, [*args.common, *extra])
        p = cfg.parallel
        info = init_distributed(cfg.trainer.device, tp=p.tp, ep=p.ep, pp=p.pp)
        trainers[name] = Trainer(cfg, info)
        dist.barrier()
        results[name] = measure(trainers[name], args.k, tuple(range(world_size)))
        results[name]["param_bytes_this_rank"] = sum(
            (t.to_local() if isinstance(t, DTensor) else t).numel() * 4 for t in trainers[name].model.parameters()
        )
        if trainers[name].pipeline is not None:
            results[name]["pipeline"] = {"pp": p.pp, "schedule": p.pp_schedule,
                                         "stages_per_rank": pipeline_stages_per_rank(p),
                                         "microbatches": pipeline_microbatches(p)}  # fmt: skip
    _time_layouts(trainers, results, args)
    gathered: list[dict] = [None] * world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, results)
    num_params, rank = next(iter(trainers.values())).num_params, dist.get_rank()
    del trainers
    destroy_distributed()
    if rank != 0:
        return
    report = _layouts_report(args, world_size, layouts, gathered, num_params, t_start)
    print_layouts(report)
    pp = "pp_" if args.pp > 1 else ""
    out = Path(args.out or REPO / "bench" / "results" / f"comm_layouts_{pp}{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def _time_layouts(trainers: dict[str, Trainer], results: dict[str, dict], args: argparse.Namespace) -> None:
    """Step time of each layout (and a pipeline's time in its point-to-point waits): timed after
    the recorded steps, which the recorder slows, in ABBA order over the layouts."""
    clocks = {name: WaitClock() for name, trainer in trainers.items() if trainer.pipeline is not None}
    for name, clock in clocks.items():
        clock.attach(trainers[name].pipeline.schedule)
    for trainer in trainers.values():
        trainer.train_step = _continuing(trainer, args.k + 1)

    def sync() -> None:  # every rank's queued work done, then all ranks together
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()

    _, elapsed, timed = time_interleaved(trainers, warmup=1, steps=args.timed_steps, block=max(1, args.k // 2),
                                         sync=sync)  # fmt: skip
    for name in trainers:
        results[name]["step_s"] = elapsed[name] / timed
    for name, clock in clocks.items():  # over the timed steps and the warm-up step before them
        results[name]["pipeline"].update(wait_s=clock.wait_s, schedule_s=clock.step_s, schedule_steps=clock.steps)


def _continuing(trainer: Trainer, done: int):
    """train_step numbered after the steps `measure` already took (time_interleaved counts from 1)."""
    step = trainer.train_step
    return lambda n: step(done + n)


def _layouts_report(args, world_size: int, layouts: dict, gathered: list[dict], num_params: int, t_start: float) -> dict:
    mean = lambda name, f: sum(f(g[name]) for g in gathered) / world_size  # noqa: E731
    first = next(iter(layouts))
    results = {}
    for name, extra in layouts.items():
        sent = {kind: mean(name, lambda r, k=kind: r["bytes_per_step"].get(f"sent_{k}_intra", 0.0)) for kind in KINDS}
        p2p = mean(name, lambda r: r["bytes_per_step"].get("sent_send_intra", 0.0))
        results[name] = {
            "overrides": extra,
            "sent_bytes_per_step_per_rank": {"total": sum(sent.values()) + p2p, "collectives": sum(sent.values()),
                                             **sent, "p2p": p2p},
            "p2p_received_bytes_per_step_per_rank": mean(name, lambda r: r["bytes_per_step"].get("payload_recv", 0.0)),
            "param_bytes_per_rank": mean(name, lambda r: r["param_bytes_this_rank"]),
            # The slowest rank sets the pace of a synchronous step.
            "step_s": max(g[name]["step_s"] for g in gathered),
        }  # fmt: skip
        if "pipeline" in gathered[0][name]:
            results[name]["pipeline"] = _bubble([g[name]["pipeline"] for g in gathered])
    for name in layouts:
        r, base = results[name], results[first]
        r["sent_vs_" + first] = r["sent_bytes_per_step_per_rank"]["total"] / base["sent_bytes_per_step_per_rank"]["total"]
        r["step_time_vs_" + first] = r["step_s"] / base["step_s"]
    return {
        "benchmark": "comm_layouts",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["torchrun", f"--nproc_per_node={world_size}", "bench/comm.py", *sys.argv[1:]]),
        "machine": {"world_size": world_size, "cpu_count": os.cpu_count(),
                    "cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "model": args.model, "params": num_params, "optim": args.optim,
        "settings": {"k": args.k, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "recorded_steps": args.k, "timed_steps": args.timed_steps, "pp": args.pp,
                     "pp_microbatches": args.pp_microbatches if args.pp > 1 else None,
                     "overrides_of_every_layout": [*args.common, *args.overrides]},
        "definitions": _LAYOUT_DEFINITIONS,
        "results": results,
        "wall_time_s": time.perf_counter() - t_start,
    }  # fmt: skip


_LAYOUT_DEFINITIONS = {
    "sent": "bytes a ring algorithm makes each rank send (all-to-all: its input minus the rows it keeps), "
            "mean over ranks, per training step; total = collectives + p2p",
    "p2p": "point-to-point sends between pipeline stages (activations forward, their gradients backward), "
           "bytes as sent",
    "bubble_measured": "per rank: seconds blocked in the schedule's point-to-point waits / seconds of the "
                       "schedule's step (forward and backward of every micro-batch), over the timed steps; "
                       "mean over ranks",
    "bubble_theory": "(p-1)/(v m + p-1): p pipeline ranks, v stages per rank, m micro-batches",
}  # fmt: skip


def _bubble(ranks: list[dict]) -> dict:
    """The schedule's shape, each rank's measured bubble and the theoretical one."""
    shape = {key: ranks[0][key] for key in ("pp", "schedule", "stages_per_rank", "microbatches")}
    p, v, m = shape["pp"], shape["stages_per_rank"], shape["microbatches"]
    per_rank = [r["wait_s"] / r["schedule_s"] for r in ranks]
    return {
        **shape,
        "bubble_measured": sum(per_rank) / len(per_rank),
        "bubble_theory": (p - 1) / (v * m + p - 1),
        "bubble_measured_per_rank": per_rank,
        "p2p_wait_s_per_step": sum(r["wait_s"] / r["schedule_steps"] for r in ranks) / len(ranks),
        "schedule_s_per_step": sum(r["schedule_s"] / r["schedule_steps"] for r in ranks) / len(ranks),
    }


def print_layouts(report: dict) -> None:
    mib, s = 2**20, report["settings"]
    first = next(iter(report["results"]))
    print(f"\n{report['model']} ({report['params'] / 1e6:.2f}M params), {report['optim']}, world size "
          f"{report['machine']['world_size']}, batch {s['batch_size']} x {s['seq_len']}: MiB sent per rank per step")
    width = max(13, *(len(name) + 2 for name in report["results"]))
    head = (f"{'layout':<{width}}{'total':>9}" + "".join(f"{k:>16}" for k in (*KINDS, "p2p"))
            + f"{'param MiB/rank':>16}{'step s':>9}{'sent vs ' + first:>15}{'time vs ' + first:>15}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for name, r in report["results"].items():
        b = r["sent_bytes_per_step_per_rank"]
        print(f"{name:<{width}}{b['total'] / mib:>9.3f}" + "".join(f"{b[k] / mib:>16.3f}" for k in (*KINDS, "p2p"))
              + f"{r['param_bytes_per_rank'] / mib:>16.3f}{r['step_s']:>9.3f}"
              + f"{r['sent_vs_' + first]:>15.3f}{r['step_time_vs_' + first]:>15.3f}")  # fmt: skip
    pipelines = {name: r["pipeline"] for name, r in report["results"].items() if "pipeline" in r}
    if pipelines:
        print(f"\n{'pipeline':<{width}}{'schedule':>17}{'v':>3}{'m':>3}{'bubble':>9}{'theory':>9}  per rank")
        for name, b in pipelines.items():
            print(f"{name:<{width}}{b['schedule']:>17}{b['stages_per_rank']:>3}{b['microbatches']:>3}"
                  f"{b['bubble_measured']:>9.3f}{b['bubble_theory']:>9.3f}  "
                  + " ".join(f"{x:.3f}" for x in b["bubble_measured_per_rank"]))  # fmt: skip


def print_table(report: dict) -> None:
    s = report["settings"]
    mib = 2**20
    print(f"\n{report['model']} ({report['params'] / 1e6:.2f}M params, {report['param_bytes_fp32'] / mib:.2f} MiB fp32), "
          f"world size {report['machine']['world_size']}, K={s['k']}, {s['steps_measured_per_side']} steps per side "
          f"(one outer cycle); MiB sent per rank per step (ring model), mean over ranks")  # fmt: skip
    head = f"{'side':<16}{'total':>9}{'inner':>9}{'outer':>9}{'intra':>9}{'cross':>9}{'total/adamw':>13}{'cross/adamw':>13}"
    print(head)
    print("-" * len(head))
    for name, r in report["results"].items():
        b = r["bytes_per_step_per_rank"]
        ratio = r["ratio_vs_adamw"]
        print(f"{name:<16}" + "".join(f"{b.get('sent_' + key, 0.0) / mib:>9.4f}" for key in
              ("total", "inner", "outer", "intra", "cross"))
              + f"{ratio['total']:>13.4f}{ratio['cross']:>13.4f}")  # fmt: skip
    for name, r in report["results"].items():
        if name.startswith("diloco"):
            d = r["bytes_per_step_per_rank"]
            print(f"{name}: cross-block = outer all-reduce {d.get('sent_outer_cross', 0.0) / mib:.4f} MiB/step "
                  f"+ between outer steps {d.get('sent_inner_cross', 0.0):.1f} B/step (replicas meet at outer and log steps only)")


if __name__ == "__main__":
    main()
    exit_process(0)  # a torchrun rank: leave without gloo's teardown (snoo_train/dist.py)
