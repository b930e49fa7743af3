"""What trainer.nonfinite=skip costs per training step: stop (no mask) vs skip with the SkipMask
before issue 21 (`OldSkipMask`, below) vs skip with today's (snoo_train/trainer/nonfinite.py).

    python bench/skip_mask.py                                   # llama_small, SNOO(AdamW), 8 x 64 tokens
    python bench/skip_mask.py --steps 60 model=llama_125m

Three Trainers from the same config and seed (the same weights and batches) train in ONE
process, in alternating blocks of --block steps (forward order, then reversed: ABBA...), so load
on the machine hits all three alike and the ratios come from one run. A side's step time is its
median block / --block; on CPU the clock is the process's CPU time with one torch thread
(--threads: load from other processes does not inflate it, and no thread spins waiting for
another), on CUDA wall time after a synchronize. Every step is finite: this is the
price of being ready to skip, paid on every step. The snapshot's size is counted exactly (local
bytes of what each mask copies per step), against the parameters' bytes.

Writes bench/results/skip_mask_<model>_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from common import REPO, compose_config, local_bytes, repo_path, write_report

from snoo_train.dist import init_distributed
from snoo_train.trainer import Trainer
from snoo_train.trainer.nonfinite import _local


class OldSkipMask:
    """The SkipMask as it was before issue 21 (commit 62a7852), kept only as this benchmark's
    "before": it snapshots every state tensor (SNOO's slow weights and momentum included) on
    every step, and evaluates `ok.to(device)` once per tensor."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._saved: list[torch.Tensor] = []

    def _tensors(self) -> list[torch.Tensor]:
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                out.append(p)
                out += [v for v in self.optimizer.state.get(p, {}).values() if _old_is_masked(v)]
        return out

    def _state_missing(self) -> bool:
        state = self.optimizer.state
        return any(p.grad is not None and not state.get(p) for g in self.optimizer.param_groups for p in g["params"])

    def step(self, ok, *, agreed=lambda ok: ok, agree_on_host=lambda ok: ok):
        if self._state_missing():
            if not agree_on_host(bool(ok)):
                return False, torch.zeros_like(ok)
            self.optimizer.step()
            return True, agreed(ok)
        tensors = self._tensors()
        with torch.no_grad():
            self._snapshot([_local(t) for t in tensors])
        self.optimizer.step()
        applied = agreed(ok)
        with torch.no_grad():
            self._restore_if_bad([_local(t) for t in tensors], applied)
        return True, applied

    def _snapshot(self, tensors: list[torch.Tensor]) -> None:
        if [(s.shape, s.dtype, s.device) for s in self._saved] != [(t.shape, t.dtype, t.device) for t in tensors]:
            self._saved = [t.clone() for t in tensors]
        else:
            torch._foreach_copy_(self._saved, tensors)

    def _restore_if_bad(self, tensors: list[torch.Tensor], ok: torch.Tensor) -> None:
        flags: dict[torch.device, torch.Tensor] = {}
        for t, saved in zip(tensors, self._saved):
            flag = flags.setdefault(t.device, ok.to(t.device))
            torch.where(flag, t, saved, out=t)


def _old_is_masked(v) -> bool:
    # every tensor but a 0-d CPU one (a host step counter)
    return isinstance(v, torch.Tensor) and not (_local(v).ndim == 0 and _local(v).device.type == "cpu")


def build(args, nonfinite: str, run_dir: str, device: str) -> Trainer:
    overrides = [
        f"model={args.model}", f"optim={args.optim}", f"trainer.batch_size={args.batch_size}",
        f"data.seq_len={args.seq_len}", f"data.max_documents={args.max_documents}", f"trainer.nonfinite={nonfinite}",
        "trainer.log_interval=1000000", "trainer.eval_interval=0", "checkpoint.interval=0",
        "trainer.progress=false", *args.overrides,
    ]  # fmt: skip
    return Trainer(compose_config(overrides, run_dir), init_distributed(device))


def time_blocks(
    trainers: dict[str, Trainer], *, warmup: int, rounds: int, block: int, clock: Callable[[], float], sync
) -> dict[str, list[float]]:
    """Seconds of each timed block per side, ABBA order; `warmup` untimed steps first."""
    step = dict.fromkeys(trainers, 0)
    blocks: dict[str, list[float]] = {name: [] for name in trainers}

    def run(name: str, n: int) -> float:
        sync()
        t0 = clock()
        for _ in range(n):
            step[name] += 1
            trainers[name].train_step(step[name])
        sync()
        return clock() - t0

    for name in trainers:
        run(name, warmup)
    names = list(trainers)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            blocks[name].append(run(name, block))
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_small")
    parser.add_argument("--optim", default="snoo_adamw")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--max-documents", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=12, help="timed blocks per side")
    parser.add_argument("--block", type=int, default=4, help="steps per block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (1: no spinning threads inflate the CPU time)")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for all three sides")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clock = time.perf_counter if device == "cuda" else time.process_time
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cpu":
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            "stop": build(args, "stop", f"{tmp}/stop", device),
            "skip_before": build(args, "skip", f"{tmp}/before", device),
            "skip_after": build(args, "skip", f"{tmp}/after", device),
        }
        trainers["skip_before"].runner.mask = OldSkipMask(trainers["skip_before"].optimizer)
        blocks = time_blocks(trainers, warmup=args.warmup, rounds=args.rounds, block=args.block, clock=clock, sync=sync)
        params = sum(local_bytes(p) for p in trainers["stop"].model.parameters())
        snapshot = {name: sum(local_bytes(s) for s in trainers[name].runner.mask._saved) for name in ("skip_before", "skip_after")}

    ms = {name: 1000 * statistics.median(b) / args.block for name, b in blocks.items()}
    report = {
        "benchmark": repo_path(__file__),
        "command": "python bench/skip_mask.py " + " ".join(sys.argv[1:]),
        "device": device,
        "torch": torch.__version__,
        "model": args.model,
        "optim": args.optim,
        "tokens_per_step": args.batch_size * args.seq_len,
        "clock": "wall" if device == "cuda" else "process CPU time",
        "threads": torch.get_num_threads(),
        "steps_per_block": args.block,
        "blocks_per_side": args.rounds,
        "ms_per_step_median": ms,
        "ms_per_step_mean": {name: 1000 * statistics.mean(b) / args.block for name, b in blocks.items()},
        "block_seconds": blocks,
        "overhead_vs_stop": {name: ms[name] / ms["stop"] - 1 for name in ("skip_before", "skip_after")},
        "param_bytes": params,
        "snapshot_bytes": snapshot,
        "snapshot_x_params": {name: b / params for name, b in snapshot.items()},
    }
    print(f"{args.model}, {args.optim}, {args.batch_size} x {args.seq_len} tokens, {device} ({report['clock']})")
    print(f"{'side':<12} {'ms/step':>8} {'vs stop':>8} {'snapshot':>9}")
    for name in ms:
        over = f"{100 * (ms[name] / ms['stop'] - 1):+.1f}%" if name != "stop" else ""
        snap = f"{snapshot[name] / params:.2f}x" if name in snapshot else ""
        print(f"{name:<12} {ms[name]:8.1f} {over:>8} {snap:>9}")
    out = args.out or REPO / "bench" / "results" / f"skip_mask_{args.model}_{device}.json"
    write_report(report, out)


if __name__ == "__main__":
    main()
