"""Warm-start memory: peak RSS per rank while `model.from_pretrained` loads a Hugging Face
checkpoint into an FSDP2-sharded model on CPU, against the bytes of the rank's shard and of the
whole model; and the time to load.

    python bench/warm_start.py                                    # llama_125m, 32k vocab, 4 ranks
    python bench/warm_start.py --model llama_small --world-size 2 # in miniature

The checkpoint is a transformers LlamaForCausalLM of the preset's shape, saved with
save_pretrained (fp32 safetensors) in a scratch directory. Each rank (a torchrun job, gloo, one
thread): build on the meta device, fully_shard (the trainer's `parallelize`), reset the
high-water mark (/proc/self/clear_refs), then the trainer's `materialize(..., pretrained=DIR)`;
the peak is VmHWM minus VmRSS just before. It includes the shard itself and the file pages the
reads touch (safetensors maps the file). Each rank then checks its shard against the file
(max |difference|, expected 0). Writes bench/results/warm_start_<model>_v<vocab>_ws<N>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, torchrun_ranks, write_report

MIB = 2**20


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _model_config(args: argparse.Namespace, pretrained: str | None):
    import dataclasses

    from snoo_train.models import PRESETS

    return dataclasses.replace(PRESETS[args.model], from_pretrained=pretrained, vocab_size=args.vocab)


def worker(args: argparse.Namespace) -> None:
    """One rank: load, measure, check the shard against the file, write this rank's JSON."""
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from snoo_train.models import build_model, materialize, parallelize
    from snoo_train.models.shard_init import local_indices

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = build_model(_model_config(args, args.checkpoint), args.vocab, seed=0, device="meta")
    parallelize(model, mesh=init_device_mesh("cpu", (world_size,)))
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    materialize(model, device="cpu", seed=0, pretrained=args.checkpoint)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    worst, shard = 0.0, 0
    with safe_open(Path(args.checkpoint) / "model.safetensors", "pt") as f:
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            shard += local.numel() * local.element_size()
            want = f.get_tensor(name)[tuple(local_indices(p)[0:1])] if local.numel() else None
            if want is not None:
                worst = max(worst, (local.detach() - want.view_as(local)).abs().max().item())
    out = {"rank": rank, "shard_bytes": shard, "peak_increase_bytes": (peak - before) * 1024,
           "load_seconds": seconds, "max_abs_difference": worst}  # fmt: skip
    (Path(args.out) / f"rank_{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def save_checkpoint(args: argparse.Namespace, directory: Path) -> int:
    """A random-weight LlamaForCausalLM of the preset's shape, saved with save_pretrained; its bytes."""
    from transformers import LlamaForCausalLM

    from snoo_train.models.llama import llama_config

    # The checkpoint is transformers' own model of the preset's shape (a multiple-of-64 vocabulary).
    model = LlamaForCausalLM(llama_config(_model_config(args, None), args.vocab))
    model.save_pretrained(directory, safe_serialization=True)
    return sum(p.numel() * p.element_size() for p in model.parameters())



def launch(args: argparse.Namespace, scratch: Path) -> list[dict]:
    out = scratch / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    worker = ["--worker", "--out", str(out), "--model", args.model, "--vocab", str(args.vocab), "--checkpoint", args.checkpoint]
    return torchrun_ranks(__file__, args.world_size, worker, out, "rank_{rank}.json", "warm start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_125m", help="a dense preset")
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000, help="the checkpoint's vocabulary (unpadded)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as scratch:
        args.checkpoint = str(Path(scratch) / "hf")
        model_bytes = save_checkpoint(args, Path(args.checkpoint))
        ranks = launch(args, Path(scratch))
    report = {
        "model": args.model, "vocab": args.vocab, "world_size": args.world_size, "model_bytes": model_bytes,
        "ranks": ranks,
        "max_peak_increase_bytes": max(r["peak_increase_bytes"] for r in ranks),
        "max_peak_over_shard": max(r["peak_increase_bytes"] / r["shard_bytes"] for r in ranks),
        "max_peak_over_model": max(r["peak_increase_bytes"] for r in ranks) / model_bytes,
        "max_load_seconds": max(r["load_seconds"] for r in ranks),
        "max_abs_difference": max(r["max_abs_difference"] for r in ranks),
    }  # fmt: skip
    for r in ranks:
        print(f"rank {r['rank']}: shard {r['shard_bytes'] / MIB:.1f} MiB, peak +{r['peak_increase_bytes'] / MIB:.1f} "
              f"MiB, load {r['load_seconds']:.2f} s, max |diff| {r['max_abs_difference']:.1e}")  # fmt: skip
    print(f"model {model_bytes / MIB:.1f} MiB; worst peak / shard {report['max_peak_over_shard']:.2f}, "
          f"peak / model {report['max_peak_over_model']:.2f}")  # fmt: skip
    default = REPO / "bench" / "results" / f"warm_start_{args.model}_v{args.vocab}_ws{args.world_size}.json"
    write_report(report, args.out or default)


if __name__ == "__main__":
    main()
