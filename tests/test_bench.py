"""The speedup arithmetic on curves with known answers, MFU on a hand-computed model, and a
miniature run of bench/convergence.py end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from snoo_train.models import PRESETS, flops_per_token
from snoo_train.speedup import (
    budget_speedup,
    crossing_point,
    crossing_speedup,
    format_speedup,
    smallest_sufficient_fraction,
)

REPO = Path(__file__).resolve().parents[1]

# -- crossing speedup ---------------------------------------------------------------------------


def test_crossing_is_interpolated_between_evaluations():
    # Straight line from 4.0 at step 0 to 1.0 at step 30: 2.5 is crossed at step 15.
    assert crossing_point([0, 10, 20, 30], [4.0, 3.0, 2.0, 1.0], 2.5) == pytest.approx(15.0)
    # Uneven spacing: 3.0 at 100, 2.0 at 300 -> 2.75 at 150.
    assert crossing_point([100, 300], [3.0, 2.0], 2.75) == pytest.approx(150.0)


def test_crossing_exactly_at_an_evaluation_and_before_the_first():
    assert crossing_point([10, 20, 30], [3.0, 2.0, 1.0], 2.0) == 20.0
    # Already below the target at the first evaluation: nothing is known earlier.
    assert crossing_point([10, 20], [1.0, 0.5], 2.0) == 10.0


def test_curve_that_never_reaches_the_target_gives_none_not_a_number():
    xs, losses = [10, 20, 30], [3.0, 2.5, 2.1]
    assert crossing_point(xs, losses, 2.0) is None
    assert crossing_speedup(30, xs, losses, 2.0) is None
    assert format_speedup(None) == "not reached"


def test_non_finite_losses_never_count_as_reaching():
    # A diverged evaluation (nan) is skipped, and the next crossing is not interpolated from it.
    assert crossing_point([10, 20, 30], [3.0, math.nan, 1.0], 2.0) == 30.0
    assert crossing_point([10, 20], [math.nan, math.inf], 2.0) is None


def test_crossing_speedup_of_a_time_rescaled_power_law():
    # Baseline L(s) = 2 + 8 / sqrt(s); the candidate is the same curve run 1.25x faster,
    # L(1.25 s). Baseline budget B = 1000: the candidate reaches L(1000) at s = 800 exactly.
    steps = list(range(20, 1001, 20))
    target = 2 + 8 / math.sqrt(1000)
    candidate = [2 + 8 / math.sqrt(1.25 * s) for s in steps]
    assert crossing_point(steps, candidate, target) == pytest.approx(800.0)
    assert crossing_speedup(1000, steps, candidate, target) == pytest.approx(1.25)
    # The baseline against itself: speedup 1.
    baseline = [2 + 8 / math.sqrt(s) for s in steps]
    assert crossing_speedup(1000, steps, baseline, target) == pytest.approx(1.0)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="length"):
        crossing_point([1, 2], [1.0], 0.5)


# -- budget speedup -----------------------------------------------------------------------------


def test_budget_speedup_is_one_over_the_smallest_sufficient_fraction():
    finals = {1.0: 1.90, 0.9: 1.95, 0.8: 2.00, 0.7: 2.10, 0.6: 2.30}
    assert smallest_sufficient_fraction(finals, target=2.0) == 0.8  # "at or below"
    assert budget_speedup(finals, target=2.0) == pytest.approx(1.25)


def test_a_lucky_short_budget_past_a_failed_longer_one_does_not_count():
    finals = {1.0: 1.9, 0.9: 2.1, 0.8: 1.95}
    assert budget_speedup(finals, target=2.0) == pytest.approx(1.0)


def test_budget_never_reaching_the_target_is_none():
    finals = {1.0: 2.2, 0.5: 2.5}
    assert smallest_sufficient_fraction(finals, target=2.0) is None
    assert budget_speedup(finals, target=2.0) is None
    assert budget_speedup({1.0: math.nan}, target=2.0) is None


# -- MFU accounting -----------------------------------------------------------------------------

# llama_tiny (hidden 64, mlp 172, 2 layers, 4 heads of 16, 2 kv heads, tied embeddings), the byte
# tokenizer's 257 tokens padded to 320, seq_len 64, counted by hand:
#   attention q, o 64x64 each, k, v 64x32 each   12288 per layer
#   mlp gate, up, down 3 x 64 x 172              33024 per layer
#   two RMSNorms                                   128 per layer
#   2 layers                                     90880
#   final norm 64 + head matmul 64 x 320         20544   (the tied head's matmul is paid)
#   6 x 111424                                  668544
#   attention scores + values 12 x 2 x 64 x 64   98304
TINY_FLOPS_PER_TOKEN = 766848


def test_flops_per_token_hand_computed():
    assert flops_per_token(PRESETS["llama_tiny"], 257, 64) == TINY_FLOPS_PER_TOKEN


# -- bench/convergence.py in miniature --------------------------------------------------------

PEAK = 1e12  # a made-up device peak, so that CPU runs log MFU


@pytest.fixture(scope="module")
def convergence(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("convergence") / "conv"
    cmd = [
        sys.executable, "bench/convergence.py", "--model", "llama_tiny", "--steps", "20",
        "--batch-size", "8", "--seq-len", "64", "--eval-interval", "5", "--eval-batches", "2",
        # A baseline starved of learning rate: SNOO at a normal one must beat it, so that every
        # stage runs (the budget stage only starts when the full budget reaches the target).
        "--baseline-lrs", "1e-4", "--snoo-lrs", "3e-3", "--outer", "5,0.7,0.5",
        "--fractions", "0.5", "--jobs", "2", "--out", str(out),
        "--data-cache", str(out.parent / "cache"),
        "data.max_documents=200", "trainer.warmup_steps=2", f"trainer.peak_flops={PEAK}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "crossing speedup" in proc.stdout and "budget speedup" in proc.stdout
    return json.loads(out.with_suffix(".json").read_text()), out


@pytest.mark.slow
def test_convergence_writes_documented_json_and_png(convergence):
    report, out = convergence
    documented = {
        "target_val_loss", "crossing_speedup", "crossing_step", "budget_speedup",
        "budget_fraction", "baseline", "snoo", "budget", "runs", "settings", "machine",
        "command", "date", "wall_time_s", "caveat",
    }
    assert documented <= report.keys()
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    runs = report["runs"]
    assert sorted(r["side"] for r in runs) == ["baseline", "budget", "snoo"]
    assert all(r["status"] == "ok" for r in runs), runs
    budget_run = next(r for r in runs if r["side"] == "budget")
    assert budget_run["steps"] == 10 and budget_run["fraction"] == 0.5
    # One baseline run: it is the winner, and its final loss is the target.
    base = next(r for r in runs if r["side"] == "baseline")
    assert report["target_val_loss"] == base["final_val_loss"] == base["curve"]["val_loss"][-1]
    assert base["curve"]["step"] == [5, 10, 15, 20]
    assert set(report["budget"]) == {"0.5", "1.0"}

    # The figures agree with the losses they were computed from.
    target = report["target_val_loss"]
    snoo = next(r for r in runs if r["side"] == "snoo")
    assert report["budget"]["1.0"] == snoo["final_val_loss"] < target
    curve = snoo["curve"]
    assert curve["step"][0] <= report["crossing_step"] <= 20
    assert report["crossing_speedup"] == pytest.approx(20 / report["crossing_step"])
    assert report["crossing_speedup"] >= 1.0
    before = [loss for step, loss in zip(curve["step"], curve["val_loss"]) if step < report["crossing_step"]]
    assert all(loss > target for loss in before)
    if report["budget"]["0.5"] <= target:
        assert report["budget_fraction"] == 0.5 and report["budget_speedup"] == pytest.approx(2.0)
    else:
        assert report["budget_fraction"] == 1.0 and report["budget_speedup"] == pytest.approx(1.0)


@pytest.mark.slow
def test_convergence_runs_log_mfu_and_flops_hand_computed(convergence):
    report, _ = convergence
    run_dir = Path(report["runs"][0]["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = 8 * 64
    for r in records:
        # MFU = tokens/s x FLOPs per token / peak (world size 1)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * TINY_FLOPS_PER_TOKEN / PEAK)
        assert r["flops"] == pytest.approx(r["step"] * tokens_per_step * TINY_FLOPS_PER_TOKEN)
        assert r["peak_mem_bytes"] > 0 and r["tokens_per_s"] > 0


# -- sweep presets (configs/experiment/) --------------------------------------------------------


def compose_experiment(name: str):
    from hydra import compose, initialize_config_dir

    import snoo_train.train  # noqa: F401  (registers the schema the presets merge into)
    from snoo_train.config import validate_config

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose("config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    validate_config(cfg)  # values in range: the sweep would not fail at its first job
    return cfg


@pytest.mark.parametrize(
    "name, params, optim",
    [
        ("k_ablation", {"optim.k": "1,5,10,20,50,100,200"}, "snoo_adamw"),
        ("eta_mu_grid", {"optim.outer_lr": "0.4,0.7,1.0", "optim.outer_momentum": "0.0,0.5,0.75,0.9"}, "snoo_adamw"),
        ("snoo_vs_adamw", {"model": "llama_tiny,llama_small", "optim": "adamw,snoo_adamw"}, None),
    ],
)
def test_experiment_presets_compose_into_valid_sweeps(name, params, optim):
    cfg = compose_experiment(name)
    assert dict(cfg.hydra.sweeper.params) == params
    # Each sweep gets its own directory under multirun/<name>/, one subdir per job.
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert sweep["dir"].startswith(f"multirun/{name}/")
    assert sweep["subdir"] == "${hydra.job.num}"
    if optim:
        assert cfg.optim.name == optim and cfg.model.name == "llama_small"
