"""One GPU check, prepared before a GPU is lent: every GPU figure the README quotes, in one run of
at most 8 minutes on one H100/H200, written to one JSON.

    python bench/gpu_check.py                                  # llama_1b + moe_1b, bf16, compiled
    python bench/gpu_check.py --out $OUT/gpu_check.json        # on the lent machine
    python bench/gpu_check.py --device cpu --model llama_tiny --steps 3   # the suite's run (never rots)

What it measures, each part on its own (a part that fails records its error and the rest go on;
the JSON is rewritten after every part, so a run cut short still leaves what it measured):

* `llama`: tokens/s and MFU of `--model` (bf16, torch.compile on CUDA) with AdamW, SNOO(AdamW) and
  SNOO(Muon), each without and with activation checkpointing; the peak device memory of each
  against the memory planner's estimate (`snoo_train.plan`), and the host syncs of non-log steps.
* `moe`: tokens/s and MFU (active parameters) of `--moe-model` with AdamW.
* `checkpoint`: save and load GB/s of a SNOO(AdamW) checkpoint of `--model`.

Host syncs: the steps after the timed ones run under `torch.cuda.set_sync_debug_mode("warn")`,
which warns at every synchronising CUDA call; the check counts the warnings (the issue's bar is
"error" mode raising none: the same zero, and a count says how far from it). A step driven here
is a non-log step: the loop's logging, evaluation and checks run in `Trainer.fit`, not in
`Trainer.train_step`. On CPU every read is a host read; the check counts `.item()`-like reads
there instead (the optimizers' 0-d step counters included, free on a GPU), so the path runs.

Parts stop starting once `--budget-s` (default 420 s) is spent, and say so, so the run fits
its 8 minutes even when compilation is slower than planned.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from common import REPO, compose_config, state_bytes, write_report
from torch.utils._python_dispatch import TorchDispatchMode

from snoo_train.config import validate_config
from snoo_train.dist import init_distributed
from snoo_train.trainer import Trainer

OPTIMIZERS = ("adamw", "snoo_adamw", "snoo_muon")
MOE_FOR = {"llama_tiny": "moe_tiny", "llama_small": "moe_small"}  # otherwise moe_1b


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", default="llama_1b")
    p.add_argument("--moe-model", default=None, help="default: moe_1b (moe_tiny for llama_tiny)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--sync-steps", type=int, default=4, help="steps counted for host syncs")
    p.add_argument("--k", type=int, default=10, help="SNOO's k (an outer step inside the timed steps)")
    p.add_argument("--batch-size", type=int, default=None, help="global sequences per step (cuda 8, cpu 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (cuda 2048, cpu 64)")
    p.add_argument("--vocab", type=int, default=32000, help="model.vocab_size (the data is bytes)")
    p.add_argument("--budget-s", type=float, default=420.0, help="no part starts after this many seconds")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.json"))
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.batch_size = args.batch_size or (8 if gpu else 4)
    args.seq_len = args.seq_len or (2048 if gpu else 64)
    args.moe_model = args.moe_model or MOE_FOR.get(args.model, "moe_1b")
    return args


class Check:
    """The report, its deadline, and the parts run so far (each rewritten to the JSON at once)."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.t0 = args, time.perf_counter()
        self.tmp = Path(tempfile.mkdtemp(prefix="snoo_gpu_check_"))
        self.info = init_distributed(args.device)
        self.device = self.info.device
        self.report = {
            "benchmark": "gpu_check",
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(["python bench/gpu_check.py", *sys.argv[1:]]),
            "machine": machine(self.device),
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "parts": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, name: str, part) -> None:
        if self.elapsed() > self.args.budget_s:
            self.report["parts"][name] = {"skipped": f"budget of {self.args.budget_s:.0f} s spent"}
        else:
            t0 = time.perf_counter()
            try:
                result = part(self)
            except Exception as err:  # a check reports every failure and goes on to the next part
                traceback.print_exc()
                result = {"error": f"{type(err).__name__}: {err}"[:2000]}
            result["part_s"] = round(time.perf_counter() - t0, 1)
            self.report["parts"][name] = result
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        write_report(self.report, self.args.out)

    def trainer(self, name: str, overrides: list[str]) -> Trainer:
        a = self.args
        gpu = self.device.type == "cuda"
        cfg = compose_config(
            [*overrides, f"trainer.batch_size={a.batch_size}", f"data.seq_len={a.seq_len}",
             f"model.vocab_size={a.vocab}", f"trainer.compile={gpu}", f"trainer.device={a.device}",
             f"data.cache_dir={self.tmp / 'data_cache'}", "trainer.max_steps=100000", "trainer.progress=false",
             "trainer.eval_interval=0", "checkpoint.interval=0", "trainer.resume=none",
             "logging.wandb.mode=disabled", *([] if gpu else ["data.max_documents=200"])],
            str(self.tmp / name),
        )  # fmt: skip
        validate_config(cfg, world_size=1)
        return Trainer(cfg, self.info)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def machine(device: torch.device) -> dict:
    gpu = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if gpu else None,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def free(trainer: Trainer | None) -> None:
    """Drop a trainer and everything compiled for it before the next is built."""
    if trainer is not None:
        trainer.metrics.close()
        trainer.loader.close()  # the prefetch thread holds pinned batches
    del trainer
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# -- throughput and MFU ---------------------------------------------------------------------------


def timed(check: Check, trainer: Trainer) -> dict:
    """Warm-up steps (the first compiles), then timed steps with the device drained around them."""
    a = check.args

    def steps(n: int) -> float:
        check.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            trainer.step += 1
            trainer.train_step(trainer.step)
        check.sync()
        return time.perf_counter() - t0

    trainer.step = 0
    warmup_s = steps(a.warmup)
    seconds = steps(a.steps)
    tokens_per_s = a.steps * trainer.loader.tokens_per_step / seconds
    mfu = tokens_per_s * trainer.flops_per_token / trainer.peak_flops if trainer.peak_flops else None
    return {"tokens_per_s": round(tokens_per_s, 1), "step_s": seconds / a.steps, "mfu": mfu,
            "warmup_s": round(warmup_s, 1), "params": trainer.num_params}  # fmt: skip


class HostReads(TorchDispatchMode):
    """CPU stand-in for the CUDA sync check: host reads of tensor values, those of the optimizers'
    0-d CPU step counters (no sync on a GPU either) counted apart."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        super().__init__()
        self.counters = {
            v.data_ptr() for s in optimizer.state.values() for k, v in s.items()
            if k == "step" and isinstance(v, torch.Tensor) and v.ndim == 0
        }  # fmt: skip
        self.of_counters = self.others = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            if args[0].data_ptr() in self.counters:
                self.of_counters += 1
            else:
                self.others += 1
        return func(*args, **(kwargs or {}))


def host_syncs(check: Check, trainer: Trainer) -> dict:
    """Synchronising calls in `--sync-steps` non-log steps (after the timed ones: compiled, state built)."""
    first = trainer.step + 1
    if check.device.type != "cuda":
        with HostReads(trainer.optimizer) as reads:
            for step in range(first, first + check.args.sync_steps):
                trainer.train_step(step)
        trainer.step = first + check.args.sync_steps - 1
        return {"host_reads": reads.others, "step_counter_reads": reads.of_counters, "steps": check.args.sync_steps}
    check.sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in range(first, first + check.args.sync_steps):
                trainer.train_step(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    check.sync()
    trainer.step = first + check.args.sync_steps - 1
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    return {"host_syncs": len(syncs), "steps": check.args.sync_steps, "first": syncs[:3]}


def planned_peak(trainer: Trainer) -> int:
    from snoo_train.plan import estimate

    return estimate(trainer.cfg, world_size=1).peak_bytes


def one_configuration(check: Check, name: str, overrides: list[str]) -> dict:
    if check.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(check.device)
    trainer = check.trainer(name, overrides)
    try:
        result = timed(check, trainer)
        result["host"] = host_syncs(check, trainer)
        result["batches_pinned"] = trainer.loader.pin  # data.pin_memory=auto: on CUDA
        result.update(state_bytes(trainer))
        result["planned_peak_bytes"] = planned_peak(trainer)
        if check.device.type == "cuda":
            result["peak_bytes"] = torch.cuda.max_memory_allocated(check.device)
            result["peak_over_planned"] = result["peak_bytes"] / result["planned_peak_bytes"]
    finally:
        free(trainer)
    return result


def llama(check: Check) -> dict:
    a, out = check.args, {}
    for ac in (False, True):
        for optim in OPTIMIZERS:
            key = f"{optim}{'_ac' if ac else ''}"
            if check.elapsed() > a.budget_s:
                out[key] = {"skipped": "budget spent"}
                continue
            overrides = [f"model={a.model}", f"optim={optim}", f"trainer.activation_checkpointing={ac}"]
            if optim.startswith("snoo"):
                overrides.append(f"optim.k={a.k}")
            try:
                out[key] = one_configuration(check, key, overrides)
            except Exception as err:  # one configuration's failure leaves the others' figures
                traceback.print_exc()
                out[key] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            print(f"{a.model} {key}: {out[key]}", flush=True)
    ok = {k: v for k, v in out.items() if "tokens_per_s" in v}
    if "adamw" in ok:
        out["tokens_per_s_over_adamw"] = {k: v["tokens_per_s"] / ok["adamw"]["tokens_per_s"] for k, v in ok.items()}
    return out


def moe(check: Check) -> dict:
    a = check.args
    result = one_configuration(check, "moe", [f"model={a.moe_model}", "optim=adamw"])
    return {"model": a.moe_model, **result}


# -- checkpoint bandwidth -------------------------------------------------------------------------


def checkpoint(check: Check) -> dict:
    """Save and load of SNOO(AdamW)'s full state (uncompiled: the forward does not matter here)."""
    a = check.args
    trainer = check.trainer("ckpt", [f"model={a.model}", "optim=snoo_adamw", f"optim.k={a.k}", "trainer.compile=false"])
    try:
        trainer.step = 1
        trainer.train_step(1)  # the optimizer's state exists from its first step
        check.sync()
        t0 = time.perf_counter()
        path = Path(trainer.save_checkpoint(blocking=True))
        save_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        t0 = time.perf_counter()
        trainer.state.load(str(path))
        check.sync()
        load_s = time.perf_counter() - t0
        return {"bytes": size, "save_s": save_s, "load_s": load_s,
                "save_gb_per_s": size / save_s / 1e9, "load_gb_per_s": size / load_s / 1e9}  # fmt: skip
    finally:
        free(trainer)


def summary(report: dict) -> None:
    parts = report["parts"]
    print(f"\ngpu_check on {report['machine']['device']}, {report['elapsed_s']} s")
    for key, r in parts.get("llama", {}).items():
        if isinstance(r, dict) and "tokens_per_s" in r:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
            print(f"  {key:<16} {r['tokens_per_s']:>12,.0f} tok/s  MFU {mfu:>6}  host {r['host']}")
    for name, r in parts.items():
        if "error" in r or "skipped" in r:
            print(f"  {name}: {r.get('error') or r.get('skipped')}")


def main() -> None:
    check = Check(parse_args())
    try:
        for name, part in (("llama", llama), ("moe", moe), ("checkpoint", checkpoint)):
            check.run(name, part)
    finally:
        shutil.rmtree(check.tmp, ignore_errors=True)
    summary(check.report)


if __name__ == "__main__":
    main()
