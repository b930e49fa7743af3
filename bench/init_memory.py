"""Init memory: peak RSS per rank while an FSDP2-sharded model is materialized on CPU, for the
full-tensor init (before: every rank draws every full tensor and keeps its slice) and the
sharded one (each rank draws only up to its own rows, in chunks), against the bytes of the
rank's shard; and the time to initialize.

    python bench/init_memory.py                                    # llama_1b, 4 ranks, 50k vocab
    python bench/init_memory.py --model llama_125m --vocab 128256 --world-size 8  # Llama-3 vocab

Each variant runs as its own torchrun job (gloo, one thread per rank), so no high-water mark
carries over from another. In each rank: build on the meta device, fully_shard over the ranks
(the trainer's `parallelize`), reset the high-water mark (/proc/self/clear_refs), then the
trainer's `materialize` (allocate, initialize); the peak is VmHWM minus VmRSS just before.
Every rank fingerprints its shard (crc32 of each local tensor's bytes) so the report shows the
two variants are bitwise the same. `--repeats 2` runs full, sharded, sharded, full (ABBA).
The peak includes the shard itself: `to_empty` allocates pages that only the init touches.
Writes bench/results/init_memory_<model>_v<vocab>_ws<N>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from common import REPO, repo_path, torchrun_ranks, write_report

GIB = 2**30
VARIANTS = ("full", "sharded")


def full_tensor_init(model: torch.nn.Module, *, seed: int) -> None:
    """The init before this change, kept as the baseline: each full tensor drawn on CPU, each
    DTensor keeping its slice through distribute_tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from snoo_train.models.build import _canonical_name, _init_std

    for name, param in model.named_parameters():
        name = _canonical_name(name)
        generator = torch.Generator().manual_seed(
            (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
        )
        full = torch.empty(param.shape, dtype=torch.float32)
        if name.endswith("bias"):
            full.zero_()
        elif param.ndim == 1:
            full.fill_(1.0)
        else:
            full.normal_(0.0, _init_std(name, model.config), generator=generator)
        if isinstance(param, DTensor):
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(full)


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def worker(args: argparse.Namespace) -> None:
    """One rank of one variant: materialize, measure, write this rank's JSON under --out."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import snoo_train.models.build as build
    from snoo_train.models import PRESETS, build_model, parallelize

    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = build_model(PRESETS[args.model], args.vocab, seed=0, device="meta")
    parallelize(model, mesh=init_device_mesh("cpu", (world_size,)))
    if args.worker == "full":
        build.init_weights = torch.no_grad()(full_tensor_init)  # the trainer's path, old init
    dist.barrier()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        reset = True
    except OSError:  # not permitted: the mark since start-up (the meta build costs ~nothing)
        reset = False
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    build.materialize(model, device="cpu", seed=0)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    locals_ = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    crc = 0
    for t in locals_:
        crc = zlib.crc32(t.detach().contiguous().view(torch.uint8).numpy(), crc)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    out = {
        "rank": rank,
        "shard_bytes": sum(t.numel() * t.element_size() for t in locals_),
        "largest_full_tensor_bytes": largest,
        "rss_before_bytes": before * 1024,
        "peak_increase_bytes": (peak - before) * 1024,
        "init_seconds": seconds,
        "crc32": crc,
        "hwm_reset": reset,
    }
    (Path(args.out) / f"{args.worker}_{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def _estimate_fits(args: argparse.Namespace) -> tuple[float, float]:
    """(GiB the full variant needs at most, GiB available): every shard, plus on every rank one
    full copy of the largest tensor and its slice, plus ~0.6 GiB of interpreter and libraries."""
    from snoo_train.models import PRESETS, build_model

    model = build_model(PRESETS[args.model], args.vocab, seed=0, device="meta")
    total = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    need = total + args.world_size * (largest * (1 + 1 / args.world_size) + 0.6 * GIB)
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1))
    return need / GIB, available * 1024 / GIB


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"



def launch(variant: str, args: argparse.Namespace, scratch: Path) -> list[dict]:
    """Run one variant as a torchrun job; its ranks' reports, by rank."""
    out = scratch / variant
    out.mkdir(parents=True, exist_ok=True)
    worker = ["--worker", variant, "--out", str(out), "--model", args.model, "--vocab", str(args.vocab)]
    return torchrun_ranks(__file__, args.world_size, worker, out, f"{variant}_{{rank}}.json", variant)


def summarize(runs: dict[str, list[list[dict]]]) -> dict:
    """Per variant: each rank's worst peak and time over the repeats, and their maxima."""
    summary = {}
    for variant, repeats in runs.items():
        ranks = []
        for r in range(len(repeats[0])):
            mine = [rep[r] for rep in repeats]
            ranks.append({
                "rank": r,
                "shard_bytes": mine[0]["shard_bytes"],
                "peak_increase_bytes": max(m["peak_increase_bytes"] for m in mine),
                "init_seconds": min(m["init_seconds"] for m in mine),
                "crc32": mine[0]["crc32"],
                "largest_full_tensor_bytes": mine[0]["largest_full_tensor_bytes"],
                "hwm_reset": all(m["hwm_reset"] for m in mine),
            })  # fmt: skip
        summary[variant] = {
            "ranks": ranks,
            "max_peak_increase_bytes": max(r["peak_increase_bytes"] for r in ranks),
            "max_peak_over_shard": max(r["peak_increase_bytes"] / r["shard_bytes"] for r in ranks),
            "max_init_seconds": max(r["init_seconds"] for r in ranks),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_1b")
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50257, help="tokenizer vocabulary (padded to 64)")
    parser.add_argument("--repeats", type=int, default=1, help="2: full, sharded, sharded, full")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    need, available = _estimate_fits(args)
    print(f"{args.model} at world size {args.world_size}: the full-tensor init needs up to "
          f"~{need:.1f} GiB; {available:.1f} GiB available")  # fmt: skip
    if need > available:
        sys.exit("not enough memory for this model at this world size: pick a smaller --model")
    order = [v for i in range(args.repeats) for v in (VARIANTS if i % 2 == 0 else VARIANTS[::-1])]
    runs: dict[str, list[list[dict]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="snoo_initmem_") as scratch:
        for i, variant in enumerate(order):
            runs[variant].append(launch(variant, args, Path(scratch) / str(i)))
    summary = summarize(runs)
    identical = [r["crc32"] for r in summary["full"]["ranks"]] == [
        r["crc32"] for r in summary["sharded"]["ranks"]
    ]

    print(f"{'variant':>8} {'rank':>4} {'shard MiB':>10} {'peak+ MiB':>10} {'peak/shard':>10} {'init s':>7}")
    for variant in VARIANTS:
        for r in summary[variant]["ranks"]:
            print(f"{variant:>8} {r['rank']:>4} {r['shard_bytes'] / 2**20:>10.1f} "
                  f"{r['peak_increase_bytes'] / 2**20:>10.1f} "
                  f"{r['peak_increase_bytes'] / r['shard_bytes']:>10.2f} {r['init_seconds']:>7.2f}")  # fmt: skip
    print(f"bitwise identical shards: {identical}")
    report = {
        "model": args.model,
        "vocab": args.vocab,
        "world_size": args.world_size,
        "repeats": args.repeats,
        "dtype": "float32",
        "command": "python bench/init_memory.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "commit": _commit(),
        "identical": identical,
        "results": summary,
    }
    name = f"init_memory_{args.model}_v{args.vocab}_ws{args.world_size}.json"
    out = args.out or REPO / "bench" / "results" / name
    write_report(report, out)
    print(f"report: {repo_path(out)}")


if __name__ == "__main__":
    main()
