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
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, compose_config, state_bytes, write_report

from snoo_train.checkpoint import verify_checkpoint
from snoo_train.dist import init_distributed
from snoo_train.trainer import Trainer


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_small")
    parser.add_argument("--repeats", type=int, default=3, help="saves and loads timed per mode")
    parser.add_argument("--window", type=int, default=5, help="training steps timed after each save")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()

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
