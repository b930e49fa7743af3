"""Golden losses: the training losses of short runs, recorded once, replayed by a test.

    python -m tests.golden.replay --record      # rewrite tests/golden/losses.json

Every `optim=` config on `llama_tiny` and `moe_tiny` at world size 1 (one Hydra multirun, one
process), and `adamw` and `snoo_adamw` on `llama_tiny` at world size 2 (torchrun), 20 steps
each, through the entry point. A change that should not change training (a re-layout) must
reproduce them bitwise on the same torch build and CPU; tests/test_golden.py checks it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tests.conftest import entry_env

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GOLDEN = HERE / "losses.json"
OPTIMS = sorted(p.stem for p in (REPO / "snoo_train" / "configs" / "groups" / "optim").glob("*.yaml"))
MODELS = ("llama_tiny", "moe_tiny")
WS2_OPTIMS = ("adamw", "snoo_adamw")
STEPS = 20
COMMON = [
    "trainer=quick",
    f"trainer.max_steps={STEPS}",
    "trainer.batch_size=8",
    "trainer.log_interval=1",
    "trainer.eval_interval=10",
    "trainer.eval_batches=1",
    "data.seq_len=64",
    "data.max_documents=200",
    "checkpoint.interval=0",
    "logging.wandb.mode=disabled",
]


def _losses(run_dir: Path) -> dict[str, list[float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "loss": [r["loss"] for r in records],
        "val_loss": [r["val_loss"] for r in records if "val_loss" in r],
    }


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=entry_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def run_cases(work: Path) -> dict[str, dict[str, list[float]]]:
    """Run every case in `work` and return {case: {"loss": [...], "val_loss": [...]}}."""
    sweep = work / "ws1"
    _run(
        [sys.executable, "-m", "snoo_train.train", "-m", f"model={','.join(MODELS)}", f"optim={','.join(OPTIMS)}",
         *COMMON, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${model.name}-${optim.name}"],
        cwd=work,
    )  # fmt: skip
    out = {f"ws1/{m}/{o}": _losses(sweep / f"{m}-{o}") for m in MODELS for o in OPTIMS}
    for optim in WS2_OPTIMS:
        run_dir = work / f"ws2-{optim}"
        _run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "snoo_train.train", "model=llama_tiny", f"optim={optim}", *COMMON, f"hydra.run.dir={run_dir}"],
            cwd=work,
        )  # fmt: skip
        out[f"ws2/llama_tiny/{optim}"] = _losses(run_dir)
    return out


def machine() -> dict[str, str]:
    """What bitwise equality depends on besides the code: the torch build and the CPU kernels."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="write tests/golden/losses.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = run_cases(Path(tmp))
    if args.record:
        GOLDEN.write_text(json.dumps({"machine": machine(), "steps": STEPS, "cases": cases}, indent=1) + "\n")
        print(f"wrote {GOLDEN}: {len(cases)} cases")
    else:
        golden = json.loads(GOLDEN.read_text())["cases"]
        same = sum(cases[k] == golden.get(k) for k in cases)
        print(f"{same} of {len(cases)} cases match {GOLDEN} bitwise")


if __name__ == "__main__":
    main()
