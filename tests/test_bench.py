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
import torch
from omegaconf import OmegaConf

from snoo_train.analysis.speedup import (
    budget_speedup,
    crossing_point,
    crossing_speedup,
    format_speedup,
    smallest_sufficient_fraction,
)
from snoo_train.models import PRESETS, flops_per_token

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
    # The middle panel's weight norms are the runs' logged ones, read from their metrics.
    for r in runs:
        lines = (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        logged = {rec["step"]: rec["weight_norm"] for rec in map(json.loads, lines)}
        assert dict(zip(r["curve"]["norm_step"], r["curve"]["weight_norm"])) == logged
        assert all(v > 0 for v in logged.values())

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

    from snoo_train.config import validate_config
    from snoo_train.configs import CONFIG_DIR  # importing it registers the schema

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
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


def run_bench(args: list[str], *, nproc: int = 0, timeout: int = 240) -> subprocess.CompletedProcess:
    """A bench script from the repository root, one torch thread, no wandb; under torchrun with
    `nproc` ranks when given. Asserts it succeeded (its output tails in the message)."""
    from tests.dist_utils import free_port

    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"] if nproc else []
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))  # fmt: skip
    proc = subprocess.run([sys.executable, *launcher, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# -- bench/comm.py in miniature -----------------------------------------------------------------


@pytest.mark.slow
def test_comm_bench_counts_fsdp_and_diloco_traffic(tmp_path):
    out = tmp_path / "comm.json"
    run_bench([
        "bench/comm.py", "--model", "llama_tiny", "--k", "2", "--batch-size", "8", "--seq-len", "32",
        "--out", str(out), "data.max_documents=100",
    ], nproc=4)  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["adamw", "snoo", "diloco_r2", "diloco_r2_bf16"]
    adamw, snoo, diloco, bf16 = (results[k]["bytes_per_step_per_rank"] for k in results)
    # SNOO adds no communication to FSDP; DiLoCo's replicas talk once per cycle (K=2 steps).
    assert snoo["sent_total"] == adamw["sent_total"] and adamw.get("sent_intra", 0) == 0
    assert results["diloco_r2"]["outer_steps_in_window"] == 1
    # Outer: one all-reduce of this rank's half of the fp32 parameters over 2 replicas, per K.
    shard_bytes = json.loads(out.read_text())["param_bytes_fp32"] / 2
    assert diloco["sent_outer_cross"] == pytest.approx(shard_bytes / 2, rel=0.02)
    assert bf16["sent_outer_cross"] == pytest.approx(diloco["sent_outer_cross"] / 2, rel=1e-6)
    # Inside a replica FSDP runs over 2 ranks instead of 4: (2-1)/2 of (4-1)/4 per byte.
    assert diloco["sent_inner_intra"] == pytest.approx(adamw["sent_total"] * 2 / 3, rel=0.02)
    # Nothing crosses replicas between outer steps (the loss is averaged within a replica).
    assert diloco.get("sent_inner_cross", 0) == 0


@pytest.mark.slow
def test_comm_layouts_bench_counts_pipeline_sends_and_bubbles(tmp_path):
    out = tmp_path / "comm_pp.json"
    batch, seq, hidden, m = 8, 32, 64, 4  # llama_tiny's hidden size; fp32 on CPU
    run_bench([
        "bench/comm.py", "--layouts", "--pp", "2", "--pp-microbatches", str(m), "--model", "llama_tiny",
        "--k", "2", "--timed-steps", "2", "--batch-size", str(batch), "--seq-len", str(seq), "--out", str(out),
        "model.num_layers=4", "data.max_documents=100",
    ], nproc=4)  # fmt: skip
    report = json.loads(out.read_text())
    results = report["results"]
    assert list(results) == ["fsdp", "pp2_x_fsdp2_1f1b", "pp2_x_fsdp2_gpipe", "pp2_x_fsdp2_interleaved1f1b",
                             "pp2_x_tp2_1f1b"]  # fmt: skip
    assert "model.tie_embeddings=false" in report["settings"]["overrides_of_every_layout"]
    # (stage boundaries, sequences per pipeline, positions per rank) of each pipeline layout:
    # 4 ranks = 2 stages x 2 (FSDP shards, each its own batch half, or TP ranks, each a sequence half).
    shapes = {"pp2_x_fsdp2_1f1b": (1, batch // 2, seq), "pp2_x_fsdp2_gpipe": (1, batch // 2, seq),
              "pp2_x_fsdp2_interleaved1f1b": (3, batch // 2, seq), "pp2_x_tp2_1f1b": (1, batch, seq // 2)}  # fmt: skip
    for name, r in results.items():
        sent = r["sent_bytes_per_step_per_rank"]
        assert sent["collectives"] > 0 and r["step_s"] > 0
        assert sent["total"] == sent["collectives"] + sent["p2p"]
        assert r["sent_vs_fsdp"] == pytest.approx(sent["total"] / results["fsdp"]["sent_bytes_per_step_per_rank"]["total"])
        if name == "fsdp":
            assert sent["p2p"] == 0 and "pipeline" not in r
            continue
        # Each micro-batch's activations cross every boundary forward and their gradients backward,
        # spread over the 2 ranks of a pipeline; what one rank sends, its neighbour receives.
        boundaries, sequences, positions = shapes[name]
        activation = sequences // m * positions * hidden * 4
        assert sent["p2p"] == boundaries * 2 * m * activation / 2
        assert r["p2p_received_bytes_per_step_per_rank"] == sent["p2p"]
        pipe = r["pipeline"]
        assert all(0 <= b <= 1 for b in pipe["bubble_measured_per_rank"]) and len(pipe["bubble_measured_per_rank"]) == 4
        assert 0 < pipe["bubble_measured"] < 1
        v = 2 if name.endswith("interleaved1f1b") else 1
        assert (pipe["stages_per_rank"], pipe["microbatches"]) == (v, m)
        assert pipe["bubble_theory"] == pytest.approx(1 / (v * m + 1))  # (p-1)/(v m + p-1), p = 2


# -- bench/slow_links.py bytes in miniature ----------------------------------------------------


@pytest.mark.slow
def test_slow_links_bench_records_the_wire_formats_bytes(tmp_path):
    """2 replicas x 1 shard, K=2: what the recorder counted crossing replicas against the wire
    formats written out here from the model's tensors (outer_quant.py's documented format)."""
    from snoo_train.models import build_model

    out = tmp_path / "slow.json"
    run_bench([
        "bench/slow_links.py", "bytes", "--model", "llama_tiny", "--k", "2", "--fragments", "1,2",
        "--batch-size", "8", "--seq-len", "32", "--out", str(out), "data.max_documents=100",
    ], nproc=2)  # fmt: skip
    res = json.loads(out.read_text())["mean"]
    numels = [p.numel() for p in build_model(PRESETS["llama_tiny"], 257, seed=0).parameters()]
    n = sum(numels)
    # One shard per replica: the whole model. fp32 ring all-reduce over 2: 2 x 1/2 x 4 B x (n + flag).
    assert res["diloco_f1_fp32"]["outer_cross_per_cycle"] == 4 * (n + 1)
    assert res["diloco_f1_bf16_allreduce"]["outer_cross_per_cycle"] == 2 * (n + 1)
    # int8: each tensor padded to 128-element blocks, a 4-byte scale per block, 1 byte a code,
    # a flag byte, rounded up to 4; the all_gather sends the one other replica this message.
    blocks = sum(-(-x // 128) for x in numels)
    int8 = 4 * blocks + 128 * blocks + 1
    assert res["diloco_f1_q_int8"]["outer_cross_per_cycle"] == -(-int8 // 4) * 4
    int4 = 4 * blocks + 64 * blocks + 1
    assert res["diloco_f1_q_int4"]["outer_cross_per_cycle"] == -(-int4 // 4) * 4
    # Two fragments: two messages per cycle, the same elements give or take a flag and a rounding.
    f2 = res["diloco_f2_q_int8"]["outer_cross_per_cycle"]
    assert int8 < f2 <= int8 + 8
    assert res["diloco_f2_fp32"]["outer_cross_per_cycle"] == 4 * (n + 2)
    # HSDP AdamW all-reduces every gradient across replicas every step (K=2 steps per cycle);
    # the trainer's logged loss scalar rides on top.
    assert res["hsdp_adamw"]["cross_per_inner_step"] == pytest.approx(4 * n, rel=1e-3)
    # Between syncs DiLoCo's replicas do not talk: all cross traffic is the outer sync.
    for name, row in res.items():
        if name != "hsdp_adamw":
            assert row["cross_per_cycle"] == row["outer_cross_per_cycle"], name


def _slow_link_worker(rank: int, world_size: int) -> None:
    import time

    import torch.distributed as dist

    sys.path.insert(0, str(REPO / "bench"))
    import slow_links

    import snoo_train.optim.outer_quant as outer_quant

    slow = dist.new_group(list(range(world_size)))
    link = slow_links.SlowLink(slow)
    link.latency = 1.0
    x = torch.ones(4)
    t0 = time.perf_counter()
    dist.all_reduce(x, group=slow)  # synchronous: returns no earlier than issue + L
    assert time.perf_counter() - t0 >= 1.0 and x.tolist() == [2.0] * 4
    t0 = time.perf_counter()
    work = dist.all_reduce(x, group=slow, async_op=True)
    issued = time.perf_counter() - t0
    work.wait()  # async: the wait, not the issue, takes the latency
    assert issued < 1.0 <= time.perf_counter() - t0 and x.tolist() == [4.0] * 4
    out = torch.empty(2 * world_size, dtype=torch.uint8)
    t0 = time.perf_counter()
    outer_quant._all_gather(out, torch.full((2,), rank, dtype=torch.uint8), group=slow, async_op=True).wait()
    assert time.perf_counter() - t0 >= 1.0 and out.tolist() == [0, 0, 1, 1]
    t0 = time.perf_counter()
    dist.all_reduce(x)  # another group: as fast as ever
    link.latency = 0.0
    dist.all_reduce(x, group=slow)  # switched off
    assert time.perf_counter() - t0 < 1.0 and link.calls == 3


@pytest.mark.slow
def test_slow_link_delays_only_the_replicate_group_s_collectives():
    """bench/slow_links.py's latency wrapper on real gloo groups: a synchronous collective
    returns, an asynchronous one's wait() returns, no earlier than issue + L; others untouched."""
    from tests.dist_utils import run_distributed

    run_distributed(_slow_link_worker, 2)


# -- bench/init_memory.py in miniature ----------------------------------------------------------


@pytest.mark.slow
def test_init_memory_bench_reports_both_inits_identical_and_each_rank_s_shard(tmp_path):
    out = tmp_path / "init.json"
    cmd = [sys.executable, "bench/init_memory.py", "--model", "llama_tiny", "--world-size", "2",
           "--vocab", "257", "--out", str(out)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["identical"] is True and report["world_size"] == 2
    # Each rank's shard: torch.chunk over 2 ranks of every parameter's dim 0, in fp32 (the
    # embedding is tied, so the head is not counted twice). Vocabulary 257 -> 320 rows.
    cfg = PRESETS["llama_tiny"]
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.hidden_size // cfg.num_heads
    layer = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]
    shapes = [(320, h), (h,)] + layer * cfg.num_layers
    for variant in ("full", "sharded"):
        for rank, r in enumerate(report["results"][variant]["ranks"]):
            rows = [len(range(s[0])[rank * -(-s[0] // 2):(rank + 1) * -(-s[0] // 2)]) for s in shapes]
            want = sum(n * (s[1] if len(s) > 1 else 1) * 4 for n, s in zip(rows, shapes))
            assert r["shard_bytes"] == want and r["peak_increase_bytes"] > 0, (variant, rank)


# -- bench/step_path.py in miniature ------------------------------------------------------------


@pytest.mark.slow
def test_step_path_bench_in_miniature(tmp_path):
    """bench/step_path.py with its before/after override lists: the same optimizer code on both
    sides, so prefetching must leave the validation loss bit for bit the same."""
    out = tmp_path / "step_path.json"
    cmd = [
        sys.executable, "bench/step_path.py", "--model", "llama_tiny", "--steps", "2", "--block", "1",
        "--warmup", "1", "--threads", "1", "--before", "data.prefetch=0", "data.pin_memory=false",
        "--after", "data.prefetch=3", "--out", str(out),
        "trainer.batch_size=8", "data.seq_len=64", "data.max_documents=200", "trainer.device=cpu",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    before, after = report["results"]["before"], report["results"]["after"]
    assert before["overrides"] == ["data.prefetch=0", "data.pin_memory=false"] and after["overrides"] == ["data.prefetch=3"]
    # Two copies per side (one built first, one last), each 1 warm-up + 2 timed steps.
    assert report["timed_steps_per_side"] == 4 and before["steps_trained"] == after["steps_trained"] == 6
    assert report["tokens_per_step"] == 8 * 64
    for side in (before, after):
        assert side["tokens_per_s"] == pytest.approx(report["tokens_per_step"] / side["step_time_s"])
        assert side["batch_wait_ms_median"] >= 0
    assert report["tokens_per_s_ratio_after_over_before"] == pytest.approx(before["step_time_s_median"] / after["step_time_s_median"])
    assert report["tokens_per_s_ratio_of_block_totals"] == pytest.approx(after["tokens_per_s"] / before["tokens_per_s"])
    assert len(set(before["val_losses"] + after["val_losses"])) == 1 and report["val_loss_equal"] is True


# -- bench/methods.py: the comparison logic on synthetic runs, and in miniature -----------------


def _synthetic(method, lr, final, steps=(100, 200, 300), status="ok", start=4.0):
    """A run whose validation curve falls linearly from `start` at step 100 to `final` at 300."""
    if status != "ok":
        return {"method": method, "lr": lr, "status": status, "final_val_loss": math.nan, "curve": {}}
    losses = [start + (final - start) * (s - steps[0]) / (steps[-1] - steps[0]) for s in steps]
    return {"method": method, "lr": lr, "status": status, "final_val_loss": final,
            "curve": {"step": list(steps), "val_loss": losses}, "val_weights": "w", "run_dir": f"{method}{lr}"}  # fmt: skip


def test_methods_winners_edges_and_crossings_on_synthetic_curves():
    # The benchmarks import their siblings as scripts do (bench/ first on sys.path).
    sys.path.insert(0, str(REPO / "bench"))
    from methods import compare, grid_edge, parse_lr_grids, tables

    runs = [
        # AdamW: best in the middle of its grid; target = 3.0.
        _synthetic("adamw", 1e-3, 3.2), _synthetic("adamw", 2e-3, 3.0), _synthetic("adamw", 4e-3, 3.1),
        # SNOO: best at the high end (the 8e-3 run crashed, so it says nothing about 8e-3);
        # 4.0 -> 2.0 over steps 100..300 reaches 3.0 at step 200: speedup 300 / 200.
        _synthetic("snoo_adamw", 2e-3, 2.5), _synthetic("snoo_adamw", 4e-3, 2.0),
        _synthetic("snoo_adamw", 8e-3, None, status="failed"),
        # GPA: better than its other lr, never reaches the target.
        _synthetic("gpa_adamw", 2e-3, 3.05), _synthetic("gpa_adamw", 4e-3, 3.3),
        # EMA-Nesterov: every run diverged.
        _synthetic("ema_nesterov_adamw", 2e-3, None, status="diverged"),
        # Schedule-Free: a single lr; already at the target at its first evaluation.
        _synthetic("schedule_free_adamw", 3e-3, 2.9, start=2.95),
    ]  # fmt: skip
    methods = ["adamw", "snoo_adamw", "gpa_adamw", "ema_nesterov_adamw", "schedule_free_adamw"]
    target, rows = compare(runs, methods, "adamw", steps=300)
    assert target == 3.0
    row = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == methods
    assert (row["adamw"]["lr"], row["adamw"]["lr_at_grid_edge"]) == (2e-3, None)
    assert row["adamw"]["crossing_step"] == 300 and row["adamw"]["crossing_speedup"] == 1.0
    snoo = row["snoo_adamw"]
    assert (snoo["lr"], snoo["lr_at_grid_edge"], snoo["lr_grid"]) == (4e-3, "high", [2e-3, 4e-3, 8e-3])
    assert snoo["crossing_step"] == pytest.approx(200) and snoo["crossing_speedup"] == pytest.approx(1.5)
    assert snoo["delta_vs_baseline"] == pytest.approx(-1.0)
    gpa = row["gpa_adamw"]
    assert (gpa["lr"], gpa["lr_at_grid_edge"], gpa["final_val_loss"]) == (2e-3, "low", 3.05)
    assert gpa["crossing_step"] is None and gpa["crossing_speedup"] is None
    assert row["ema_nesterov_adamw"]["status"] == "diverged" and row["ema_nesterov_adamw"]["lr"] is None
    sf = row["schedule_free_adamw"]
    assert sf["lr_at_grid_edge"] == "single" and sf["crossing_step"] == 100 and sf["crossing_speedup"] == 3.0
    # Every run gets its own crossing against the same target.
    assert next(r for r in runs if r["lr"] == 2e-3 and r["method"] == "snoo_adamw")["crossing_step"] == pytest.approx(
        100 + 200 * (4.0 - 3.0) / (4.0 - 2.5))  # fmt: skip
    assert grid_edge([{"lr": 1.0, "status": "ok"}, {"lr": 2.0, "status": "diverged"}], 1.0) == "low"

    report = {
        "model": "m", "baseline": "adamw", "target_val_loss": target, "methods": rows, "runs": runs,
        "device": {"used": "cpu"},
        "settings": {"params": 1e6, "steps": 300, "tokens_per_step": 512, "seed": 0, "methods": methods},
    }  # fmt: skip
    text = tables(report)
    line = {r: next(ln for ln in text.splitlines() if ln.startswith(f"| {r} |"))
            for r in ("AdamW", "SNOO", "GPA", "EMA-Nesterov", "Schedule-Free")}  # fmt: skip
    assert "0.004 (high edge)" in line["SNOO"] and "| 200 | 1.50x |" in line["SNOO"]
    assert "not reached" in line["GPA"] and "(low edge)" in line["GPA"]
    assert "diverged" in line["EMA-Nesterov"] and "(single lr)" in line["Schedule-Free"]
    assert "lr at the edge of its grid (its best lr may lie beyond): SNOO, GPA" in text

    grids = parse_lr_grids(["adamw", "gpa_adamw"], "1e-3,2e-3", ["gpa_adamw=2e-3,4e-3,8e-3"])
    assert grids == {"adamw": [1e-3, 2e-3], "gpa_adamw": [2e-3, 4e-3, 8e-3]}
    with pytest.raises(ValueError, match="METHOD"):
        parse_lr_grids(["adamw"], "1e-3", ["gpa=1e-3"])  # a method not compared: a typo


@pytest.mark.slow
def test_methods_bench_in_miniature(tmp_path):
    out = tmp_path / "methods"
    cmd = [
        sys.executable, "bench/methods.py", "--model", "llama_tiny", "--steps", "12",
        "--methods", "adamw,snoo_adamw", "--lrs", "3e-3", "--batch-size", "8", "--seq-len", "64",
        "--eval-interval", "4", "--eval-batches", "2", "--jobs", "2", "--threads", "1",
        "--device", "cpu", "--out", str(out), "--data-cache", str(tmp_path / "cache"),
        "data.max_documents=200", "trainer.warmup_steps=2", "optim.k=4",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    documented = {"target_val_loss", "baseline", "methods", "runs", "settings", "device", "machine",
                  "command", "date", "caveat", "wall_time_s", "runs_reused"}  # fmt: skip
    assert documented <= report.keys()
    assert report["device"]["requested"] == "cpu" and report["device"]["used"] == "cpu"
    assert "trainer.device=cpu" not in report["settings"]["overrides"]  # passed, not echoed twice
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    runs = {r["method"]: r for r in report["runs"]}
    assert set(runs) == {"adamw", "snoo_adamw"} and all(r["status"] == "ok" for r in runs.values())
    assert runs["adamw"]["val_weights"] == "params" and runs["snoo_adamw"]["val_weights"] == "slow"
    assert runs["adamw"]["curve"]["step"] == [4, 8, 12] and runs["adamw"]["lr_schedule"] == "cosine"
    for r in runs.values():
        assert r["final_val_loss"] == r["curve"]["val_loss"][-1] and Path(r["run_dir"]).is_dir()
    target = report["target_val_loss"]
    assert target == runs["adamw"]["final_val_loss"]
    rows = {r["method"]: r for r in report["methods"]}
    assert rows["snoo_adamw"]["lr"] == 3e-3 and rows["snoo_adamw"]["lr_at_grid_edge"] == "single"
    snoo = rows["snoo_adamw"]
    if snoo["crossing_step"] is None:
        assert min(runs["snoo_adamw"]["curve"]["val_loss"]) > target
    else:
        assert snoo["crossing_speedup"] == pytest.approx(12 / snoo["crossing_step"])
        curve = runs["snoo_adamw"]["curve"]
        assert all(v > target for s, v in zip(curve["step"], curve["val_loss"]) if s < snoo["crossing_step"])
    assert "| AdamW | params | cosine | 0.003 (single lr) |" in proc.stdout
    assert "| SNOO | slow |" in proc.stdout

    # Run again: both runs are reused from the work directory, and the figures are the same.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads(out.with_suffix(".json").read_text())
    assert second["runs_reused"] == 2 and second["methods"] == report["methods"]


# -- bench/gpu_check.py on CPU: the GPU check runs end to end, so it is ready when a GPU is lent ---


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_writes_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    run_bench(["bench/gpu_check.py", "--device", "cpu", "--model", "llama_tiny", "--steps", "3", "--out", str(out)],
              timeout=300)  # fmt: skip
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert set(parts) == {"llama", "moe", "checkpoint"}
    configs = [f"{o}{ac}" for ac in ("", "_ac") for o in ("adamw", "snoo_adamw", "snoo_muon")]
    for name in configs:
        r = parts["llama"][name]
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["mfu"] is None  # no peak FLOP/s known for a CPU
        # Non-log steps read nothing from the device but the optimizers' own step counters.
        assert r["host"]["host_reads"] == 0 and r["host"]["steps"] == 4
        assert r["batches_pinned"] is False  # pinned only for a CUDA device
        assert r["planned_peak_bytes"] > r["param_bytes"] > 0
        assert (r["snoo_state_bytes"] > 0) == name.startswith("snoo")
    assert parts["llama"]["tokens_per_s_over_adamw"]["adamw"] == 1.0
    assert parts["moe"]["model"] == "moe_tiny" and parts["moe"]["tokens_per_s"] > 0
    # SNOO(AdamW)'s checkpoint holds at least the parameters, two Adam moments and two outer copies.
    ckpt = parts["checkpoint"]
    assert ckpt["bytes"] >= 5 * parts["llama"]["snoo_adamw"]["param_bytes"]
    assert ckpt["save_gb_per_s"] > 0 and ckpt["load_gb_per_s"] > 0
    assert report["elapsed_s"] < report["settings"]["budget_s"]


# -- bench/repetition.py in miniature --------------------------------------------------------


@pytest.mark.slow
def test_repetition_runs_every_epoch_count_on_one_held_out_set(tmp_path):
    out, data = tmp_path / "rep", tmp_path / "data"
    cmd = [
        "bench/repetition.py", "--model", "llama_tiny", "--epochs", "1,2", "--pairs", "adamw",
        "--seeds", "0", "--steps", "8", "--batch-size", "4", "--seq-len", "32", "--eval-interval", "4",
        "--eval-batches", "1", "--adamw-lrs", "3e-3", "--snoo-adamw-lrs", "3e-3", "--outer", "4,0.7,0.5",
        "--out", str(out), "--data-dir", str(data), "trainer.warmup_steps=2",
    ]  # fmt: skip
    run_bench(cmd, timeout=400)
    report = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000

    # Corpus E holds B/E tokens (its last document cut to fit); every E holds out the same documents.
    budget = 8 * 4 * 32
    manifests = {c["epochs"]: json.loads((data / c["store"] / "manifest.json").read_text()) for c in report["corpora"]}
    for c in report["corpora"]:
        assert manifests[c["epochs"]]["splits"]["train"]["tokens"] == c["train_tokens"] == -(-budget // c["epochs"])
    assert manifests[1]["splits"]["val"] == manifests[2]["splits"]["val"]

    # The table's figures are the runs' own final validation losses, read from their metrics.
    final = {}
    for r in report["runs"]:
        metrics = REPO / r["run_dir"] / "metrics.jsonl"  # run_dir: repository-relative, or absolute outside it
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        final[(r["optim"], r["epochs"])] = [x["val_loss"] for x in records if "val_loss" in x][-1]
        assert all(x["weight_norm"] > 0 for x in records)
    assert len(final) == 4
    for e in ("1", "2"):
        row = report["table"]["adamw"][e]
        assert row["adamw"]["mean"] == final[("adamw", int(e))]
        assert row["snoo_adamw"]["mean"] == final[("snoo_adamw", int(e))]
        assert row["gap"]["mean"] == pytest.approx(final[("adamw", int(e))] - final[("snoo_adamw", int(e))])


def test_batch_size_retunes_each_batch_size_by_its_rule(tmp_path, monkeypatch):
    """bench/batch_size.py's glue, with convergence.py's sweep replaced by a recorder (the sweep
    itself is tested above): the steps keep the token budget, the lr grids follow sqrt(b / ref),
    k is swept at every b, and each row carries its report's seed statistics."""
    sys.path.insert(0, str(REPO / "bench"))
    import batch_size
    import convergence

    calls = {}

    def fake_main(argv):
        opts = dict(zip(argv[::2], argv[1::2]))
        b = int(opts["--batch-size"])
        calls[b] = opts
        spread = {"mean": 1.0 + b / 100, "std": 0.01}
        return {"baseline": {"lr": 1.0}, "snoo": {"lr": 2.0},
                "seeds": {"crossing_speedup": spread, "budget_speedup": spread, "baseline_final": spread,
                          "snoo_final": spread, "gain": {"verdict": f"v{b}"}}}  # fmt: skip

    monkeypatch.setattr(convergence, "main", fake_main)
    out = batch_size.main(["--batch-sizes", "4,16", "--tokens", "6400", "--seq-len", "32", "--ref-batch", "4",
                           "--baseline-lrs", "1e-3,2e-3", "--snoo-lrs", "5e-4", "--ks", "5,10",
                           "--evals", "4", "--out", str(tmp_path / "bs")])  # fmt: skip
    assert sorted(calls) == [4, 16]
    assert calls[4]["--steps"] == "50" and calls[16]["--steps"] == "12"  # 6400 tokens / (b x 32)
    assert calls[4]["--baseline-lrs"] == "0.001,0.002" and calls[16]["--baseline-lrs"] == "0.002,0.004"
    assert calls[16]["--snoo-lrs"] == "0.001" and calls[16]["--eval-interval"] == "3"
    assert calls[16]["--outer"] == "5,0.7,0.5;10,0.7,0.5"
    assert [r["crossing_speedup"]["mean"] for r in out["rows"]] == [1.04, 1.16]
    assert [r["gain"]["verdict"] for r in out["rows"]] == ["v4", "v16"]
    assert (tmp_path / "bs.png").stat().st_size > 10_000
