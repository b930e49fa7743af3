"""The convergence regime: budgets from tokens per parameter, seed aggregation and the scaling
study (bench/scaling.py, +experiment=scaling).

References: parameters counted on the built model (not the formula under test), hand-computed
means and standard deviations, and synthetic speedups whose trend is known."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snoo_train.analysis.speedup import gain_versus_seed_noise, seed_spread
from snoo_train.models import PRESETS, build_model, non_embedding_parameters
from snoo_train.models.flops import count_parameters, steps_for_tokens_per_param
from tests.conftest import typed

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["llama_tiny", "llama_mini", "llama_midi", "llama_small", "moe_tiny"])
def test_the_budget_gives_the_tokens_per_parameter_asked_for(name):
    model = build_model(PRESETS[name], 257, seed=0, device="meta")
    counted = count_parameters(model, exclude_embeddings=True)  # the tied head is the embedding
    assert non_embedding_parameters(PRESETS[name]) == counted
    steps = steps_for_tokens_per_param(PRESETS[name], 20, 8, 256)
    assert steps == math.ceil(20 * counted / 2048)
    assert (steps - 1) * 2048 < 20 * counted <= steps * 2048
    if name.startswith("llama_") and name != "llama_small":
        # The Hydra preset computes the same budget for whichever model it sweeps.
        assert typed(["+experiment=scaling", f"model={name}"]).trainer.max_steps == steps


def test_the_scaling_preset_sweeps_sizes_optimizers_lrs_and_seeds():
    from tests.conftest import compose_config

    cfg = compose_config(["+experiment=scaling"], hydra=True)
    params = cfg.hydra.sweeper.params
    assert params["model"] == "llama_tiny,llama_mini,llama_midi"
    assert params["optim"] == "adamw,snoo_adamw" and params["trainer.seed"] == "0,1"


def test_seed_spread_is_the_mean_and_sample_std_of_what_was_reached():
    stats = seed_spread([1.0, 1.2, None])
    assert stats["reached"] == 2 and stats["seeds"] == 3
    assert math.isclose(stats["mean"], 1.1) and math.isclose(stats["std"], math.sqrt(0.02))
    assert seed_spread([None, None])["mean"] is None
    assert seed_spread([1.5])["std"] == 0.0


def test_a_gain_within_the_seed_spread_is_reported_as_such():
    # SNOO ahead on two seeds and behind on one, by less than the spread: noise.
    noisy = gain_versus_seed_noise([3.00, 3.02, 2.98], [2.99, 3.03, 2.97])
    assert noisy["verdict"] == "within seed noise"
    # Ahead on every seed by 0.1 with a spread of 0.01: a real gain.
    real = gain_versus_seed_noise([3.00, 3.01, 2.99], [2.90, 2.91, 2.89])
    assert real["verdict"] == "candidate lower" and math.isclose(real["mean_gain"], 0.1)
    # Ahead on every seed, but by less than the seeds move the losses: still noise.
    small = gain_versus_seed_noise([3.00, 3.10, 2.90], [2.99, 3.09, 2.89])
    assert small["verdict"] == "within seed noise"
    assert gain_versus_seed_noise([3.0], [2.9])["verdict"] == "one seed: noise unknown"


def test_a_trend_is_fitted_only_when_the_error_bars_do_not_overlap():
    sys.path.insert(0, str(REPO / "bench"))
    from scaling import trend

    def size(params, mean, std, reached=2):
        return {"non_embedding_params": params, "crossing_speedup": {"mean": mean, "std": std, "reached": reached, "seeds": 2}}

    apart = trend([size(1e5, 1.0, 0.01), size(1e6, 1.2, 0.01), size(1e7, 1.4, 0.01)], "crossing_speedup")
    assert apart["fitted"] and math.isclose(apart["slope_per_decade"], 0.2)
    overlapping = trend([size(1e5, 1.0, 0.2), size(1e6, 1.2, 0.2)], "crossing_speedup")
    assert not overlapping["fitted"] and "overlap" in overlapping["reason"]
    # Reached on one seed of two: its std of 0 says nothing about the noise, so no trend.
    one = trend([size(1e5, 1.05, 0.0, reached=1), size(1e6, 1.02, 0.0, reached=1)], "crossing_speedup")
    assert not one["fitted"] and "not reached on every seed" in one["reason"]
    missing = trend([size(1e5, 1.0, 0.1), size(1e6, None, None, reached=0)], "crossing_speedup")
    assert not missing["fitted"]


@pytest.fixture(scope="module")
def scaling_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling") / "scaling"
    cmd = [
        sys.executable, "bench/scaling.py", "--sizes", "llama_tiny,llama_mini", "--tokens-per-param", "0.03",
        "--seeds", "0,1", "--batch-size", "4", "--seq-len", "32", "--eval-interval", "5", "--eval-batches", "1",
        # A starved baseline: SNOO beats it, so every stage (crossing, budgets, seeds) runs.
        "--baseline-lrs", "1e-4", "--snoo-lrs", "3e-3", "--outer", "5,0.7,0.5", "--fractions", "0.6",
        "--jobs", "2", "--out", str(out), "data.max_documents=100", "trainer.warmup_steps=2",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text()), out, proc.stdout


def test_a_miniature_scaling_study_writes_the_documented_json_and_png(scaling_run):
    report, out, stdout = scaling_run
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert {"sizes", "trend", "settings", "command", "date", "machine", "wall_time_s"} <= report.keys()
    assert [s["model"] for s in report["sizes"]] == ["llama_tiny", "llama_mini"]
    for size in report["sizes"]:
        for key in ("baseline_final", "snoo_final", "crossing_speedup", "budget_speedup"):
            assert {"mean", "std", "min", "max", "reached", "seeds", "values"} <= size[key].keys()
            assert size[key]["seeds"] == 2
        assert size["non_embedding_params"] == non_embedding_parameters(PRESETS[size["model"]])
        assert size["steps"] == steps_for_tokens_per_param(PRESETS[size["model"]], 0.03, 4, 32)
        assert size["tokens"] == size["steps"] * 4 * 32 and size["train_flops"] > 0
        convergence = json.loads(Path(size["report"]).read_text())
        assert [r["seed"] for r in convergence["seeds"]["per_seed"]] == [0, 1]
        finals = [r["baseline_final"] for r in convergence["seeds"]["per_seed"]]
        assert math.isclose(size["baseline_final"]["mean"], sum(finals) / 2)
        assert size["gain"]["verdict"] in ("within seed noise", "candidate lower", "baseline lower")
    assert "trend" in stdout and report["trend"]["metric"] == "crossing_speedup"
