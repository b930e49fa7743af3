"""The memory planner against real tensors: the bytes of this rank's local shards of a tiny model
trained on gloo at world size 2, the tensors autograd saves in a forward, and the CLI's contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from snoo_train.config import ConfigError
from snoo_train.plan import estimate
from snoo_train.plan.__main__ import main, parse_size
from snoo_train.plan.activations import stored_activation_bytes
from tests.conftest import REPO, entry_env, make_config, typed
from tests.dist_utils import build_layout, run_distributed

# intermediate_size=171: odd, so FSDP's chunks are uneven (86 + 85 rows) and padded.
LAYOUTS = {
    "adamw": ["optim=adamw", "model.intermediate_size=171"],
    "snoo_adamw_skip": ["optim=snoo_adamw", "trainer.nonfinite=skip", "model.intermediate_size=171"],
    "muon": ["optim=muon", "model.intermediate_size=171"],
    "snoo_adamw_tp2": ["optim=snoo_adamw", "parallel.tp=2"],
    "moe_ep2": ["model=moe_tiny", "optim=adamw", "parallel.ep=2"],
    "gpa": ["optim=gpa_adamw", "model.intermediate_size=171"],
    # DiLoCo on 2 replicas of one rank: the error-feedback residual is a third outer copy
    "diloco_int8_ef": ["optim=snoo_adamw", "parallel.replicas=2", "optim.outer_quant=int8", "optim.error_feedback=true",
                       "model.intermediate_size=171"],
    "schedule_free": ["optim=schedule_free_adamw", "trainer.lr_schedule=constant", "model.intermediate_size=171"],
    # Pipeline parallelism: each rank its own stage (layer 0 + embedding, layer 1 + norm + head)
    "snoo_adamw_pp2": ["optim=snoo_adamw", "parallel.pp=2", "model.tie_embeddings=false", "model.intermediate_size=171"],
}
OUTER_PREFIXES = ("snoo_", "gpa_", "ema_")


def _nbytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under `tensors` (FSDP2 pads a shard's storage; the
    reduce-scattered gradients of one group are views of one buffer)."""
    seen = {}
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _measure(trainer) -> dict[str, int]:
    """This rank's real bytes after two optimizer steps and one more backward (for gradients)."""
    from snoo_train.trainer.step import causal_lm_loss

    trainer.train_step(1)
    trainer.train_step(2)
    batch = trainer.runner.to_device(trainer.loader.next_step()[0])
    if trainer.pipeline is not None:  # the schedule's forward and backward (reduce-scattered once)
        trainer.pipeline.train(batch)
    else:
        loss = causal_lm_loss(trainer.model, batch)
        with trainer.runner.backward_context():  # tensor parallel: the loss is a sharded one
            loss.backward()
    params = list(trainer.model.parameters())
    out = {"param_bytes": _storage_bytes(params), "grad_bytes": _storage_bytes(p.grad for p in params)}
    out["inner_state_bytes"] = out["outer_state_bytes"] = 0
    for state in trainer.optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out["outer_state_bytes" if key.startswith(OUTER_PREFIXES) else "inner_state_bytes"] += _nbytes(value)
    mask = trainer.runner.mask
    out["snapshot_bytes"] = sum(_nbytes(t) for t in mask._saved) if mask is not None else 0
    return out


def _layouts_worker(rank: int, world_size: int, out_dir: str) -> None:
    for name, overrides in LAYOUTS.items():
        trainer = build_layout(str(Path(out_dir) / name), overrides)
        cfg = trainer.cfg
        measured = _measure(trainer)
        planned = estimate(cfg, world_size, rank=rank).as_dict()
        Path(out_dir, f"{name}.{rank}.json").write_text(json.dumps({"measured": measured, "planned": planned}))
        del trainer
        dist.barrier()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plan_layouts")
    run_distributed(_layouts_worker, 2, str(out))
    return out


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_state_bytes_equal_the_real_local_shards(layouts, name, rank):
    record = json.loads((layouts / f"{name}.{rank}.json").read_text())
    measured, planned = record["measured"], record["planned"]
    for key, value in measured.items():
        assert planned[key] == value, f"{name} rank {rank}: {key} planned {planned[key]}, real {value}"
    assert measured["param_bytes"] > 0 and measured["inner_state_bytes"] > 0


def _saved_bytes(model, input_ids) -> int:
    """Bytes of the distinct storages autograd saves during a forward, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and t.dtype.is_floating_point:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids, use_cache=False).logits.sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("model", ["llama_tiny", "moe_tiny"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_what_autograd_saves(tmp_path, checkpointing, model):
    """fp32 on CPU, SDPA without a mask (as the trainer runs it): the formula's saved tensors
    against the storages autograd really keeps, within the small tensors it leaves out."""
    from snoo_train.models import build_model, parallelize
    from snoo_train.trainer.step import causal_attention_without_mask

    cfg = make_config(tmp_path, [f"model={model}", "model.num_layers=3"])
    m, b, s = cfg.model, 4, 64
    model = build_model(m, 257, seed=0)
    parallelize(model, mesh=None, activation_checkpointing=checkpointing)
    ids = torch.randint(0, 257, (b, s))
    with causal_attention_without_mask(model):
        real = _saved_bytes(model, ids)
    planned = stored_activation_bytes(m, b, s, 4, checkpointing=checkpointing)
    assert planned == pytest.approx(real, rel=0.05), (planned, real)


def test_checkpointing_trades_activations_for_one_layer(tmp_path):
    cfg = make_config(tmp_path, ["model=llama_small", "trainer.device=cpu", "data.seq_len=256"])
    off = estimate(cfg, 1)
    cfg.trainer.activation_checkpointing = True
    on = estimate(cfg, 1)
    # Everything but activations is the same; the plan reports both variants either way.
    assert on.param_bytes == off.param_bytes and on.inner_state_bytes == off.inner_state_bytes
    assert on.activation_bytes < off.activation_bytes
    assert (on.activation_bytes_with_ac, on.activation_bytes_without_ac) == (off.activation_bytes_with_ac, off.activation_bytes_without_ac)
    assert on.peak_bytes == off.peak_bytes_with_ac and off.peak_bytes == on.peak_bytes_without_ac
    assert on.peak_bytes < off.peak_bytes


def test_cli_prints_and_honours_device_memory(capsys):
    args = ["model=llama_tiny", "trainer.device=cpu", "trainer.batch_size=8", "world_size=2"]
    assert main([*args, "--device-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "peak" in out and "fits" in out and "world size 2" in out
    assert main([*args, "--device-memory=1MiB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan == estimate(typed(args[:-1]), 2).as_dict()


@pytest.mark.parametrize(
    "args, key",
    [
        (["trainer.batch_siz=3"], "trainer.batch_siz"),
        (["trainer.batch_size=3", "world_size=2"], "trainer.batch_size=3"),
        (["world_size=zero"], "world_size"),
        (["--device-memory", "80 parsecs"], "--device-memory"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, args, key):
    assert main(["model=llama_tiny", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and key in err and len(err.splitlines()) == 1, err


def test_sizes():
    assert parse_size("80GiB") == 80 * 2**30 and parse_size("141GB") == 141 * 10**9 and parse_size("512") == 512
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_python_dash_m_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "snoo_train.plan", "model=llama_tiny", "trainer.device=cpu", "--device-memory", "1MiB"],
        cwd=REPO, env=entry_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "does NOT fit" in proc.stdout, proc.stderr


def test_plan_check_bench_runs(tmp_path):
    """bench/plan_check.py in miniature (llama_tiny, one run): it measures and reports. Its
    ratios mean something only at the bench's own model size, where training dominates the RSS."""
    out = tmp_path / "plan_check.json"
    proc = subprocess.run(
        [sys.executable, "bench/plan_check.py", "--world-sizes", "1", "--optims", "adamw", "--checkpointing", "off",
         "--steps", "1", "--out", str(out), "model=llama_tiny", "model.hidden_size=64", "model.intermediate_size=172",
         "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2"],
        cwd=REPO, env=entry_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["measured_peak_bytes"] > 0 and row["plan"]["peak_bytes"] == row["planned_peak_bytes"] > 0


# -- pipeline parallelism (snoo_train/plan/pipeline.py) ----------------------------------------------

# llama_tiny untied, 4 layers: h 64, 2 kv heads of 16, MLP 172, vocabulary 320 (257 bytes padded).
H, KV, MLP, VOCAB = 64, 2 * 16, 172, 320
LAYER = 2 * H * H + 2 * KV * H + 3 * MLP * H + 2 * H  # q, o; k, v; gate, up, down; two norms


def _tiny_pp(tmp_path, *extra: str):
    """PP 2 x FSDP 2 on 4 ranks (fp32 on CPU): stage 0 = layers 0-1 + embedding, stage 1 = layers
    2-3 + final norm + head; every dimension even, so FSDP's halves are unpadded."""
    overrides = ["model.tie_embeddings=false", "model.num_layers=4", "trainer.device=cpu", "parallel.pp=2", *extra]
    return make_config(tmp_path, overrides, world_size=4)


def test_pipeline_rank_holds_its_stage_share(tmp_path):
    cfg = _tiny_pp(tmp_path)
    numel = {0: 2 * LAYER + VOCAB * H, 1: 2 * LAYER + H + VOCAB * H}
    tensors = {0: 2 * 9 + 1, 1: 2 * 9 + 2}
    for rank, stage in ((0, 0), (1, 0), (2, 1), (3, 1)):
        plan = estimate(cfg, 4, rank=rank)
        local = 4 * numel[stage] // 2  # fp32, halved by the stage's two FSDP ranks
        assert (plan.pp_rank, plan.stages, plan.layers) == (stage, [stage], [2 * stage, 2 * stage + 1])
        assert plan.param_bytes == plan.grad_bytes == local
        assert plan.inner_state_bytes == 2 * local + 4 * tensors[stage]  # AdamW's m, v and step
        assert plan.outer_state_bytes == 2 * local  # SNOO's slow weights and momentum
        # The whole stage gathered (fp32 here) and its fp32 accumulated gradient, one layer's fresh gradient.
        assert plan.fsdp_buffer_bytes == 4 * numel[stage] + 4 * numel[stage] + 4 * LAYER
        assert plan.micro_batch == 8 // 2 // 2  # batch / data-parallel ranks / micro-batches (one per stage)
        # torch's receive buffers, one per micro-batch: gradients into stage 0, activations into stage 1
        assert plan.pipeline_buffer_bytes == 2 * 4 * (2 * 64 * H)


def test_pipeline_activations_follow_the_schedule(tmp_path):
    """4 micro-batches of 1 sequence. Checkpointed, a stage-0 micro-batch keeps its 2 layers'
    inputs and the stage's output, 3 x [1, 64, 64] fp32; 1F1B keeps 2 in flight on pipeline rank 0,
    GPipe all 4. The last stage holds each in-flight micro-batch's logits and log_softmax output
    ([1, 64, 320] fp32 each) and the current one's two gradients."""
    ac = ["parallel.pp_microbatches=4", "trainer.activation_checkpointing=true"]
    cfgs = {s: _tiny_pp(tmp_path, *ac, f"parallel.pp_schedule={s}") for s in ("1F1B", "GPipe")}
    first = {s: estimate(cfg, 4, rank=0) for s, cfg in cfgs.items()}
    last = {s: estimate(cfg, 4, rank=2) for s, cfg in cfgs.items()}
    assert first["1F1B"].micro_batch == 1
    assert (first["1F1B"].chunks_in_flight, first["GPipe"].chunks_in_flight) == (2, 4)
    assert first["GPipe"].activation_bytes - first["1F1B"].activation_bytes == 2 * 3 * 4 * 64 * H
    logits = 64 * VOCAB
    assert last["1F1B"].loss_bytes == 1 * (4 + 4) * logits + 8 * logits
    assert last["GPipe"].loss_bytes == 4 * (4 + 4) * logits + 8 * logits
    for s, cfg in cfgs.items():  # by default, the pipeline rank with the largest peak
        assert estimate(cfg, 4).peak_bytes == max(first[s].peak_bytes, last[s].peak_bytes)


def test_single_stage_schedules_in_flight():
    from snoo_train.plan.pipeline import InFlight, in_flight

    # 1F1B: pipeline rank r runs P - r warm-up forwards, then a backward before each forward.
    assert [in_flight("1F1B", 4, r, 8, 1, r == 3).first for r in range(4)] == [4, 3, 2, 1]
    assert in_flight("1F1B", 4, 0, 4, 1, False) == InFlight(4, 3, 0, 0)  # no forward left after the first backward
    assert in_flight("1F1B", 4, 3, 8, 1, True) == InFlight(1, 1, 1, 1)
    # GPipe: every forward before the first backward.
    assert in_flight("GPipe", 4, 0, 8, 1, False) == InFlight(8, 7, 0, 0)
    assert in_flight("GPipe", 4, 3, 8, 1, True) == InFlight(8, 7, 8, 7)


@pytest.mark.parametrize("pp, microbatches, v", [(2, 2, 2), (2, 3, 2), (4, 4, 2), (4, 10, 2), (3, 4, 3), (8, 16, 2)])
def test_interleaved_in_flight_is_torchs_order(pp, microbatches, v):
    """Interleaved1F1B's chunks in flight on each rank against the order torch builds (its private
    _calculate_single_rank_operations on a bare instance: no process group needed)."""
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, _ComputationType

    from snoo_train.plan.pipeline import in_flight

    schedule = object.__new__(ScheduleInterleaved1F1B)
    rounds = max(1, microbatches // pp)
    schedule.pp_group_size, schedule._n_microbatches, schedule.n_local_stages = pp, microbatches, v
    schedule.number_of_rounds, schedule.microbatches_per_round = rounds, microbatches // rounds
    for rank in range(pp):
        live, peak, live_last, peak_last = 0, 0, 0, 0
        for action in filter(None, schedule._calculate_single_rank_operations(rank)):
            step = 1 if action.computation_type == _ComputationType.FORWARD else -1
            live += step
            live_last += step if action.stage_index == pp * v - 1 else 0
            peak, peak_last = max(peak, live), max(peak_last, live_last)
        k = in_flight("Interleaved1F1B", pp, rank, microbatches, v, rank == pp - 1)
        assert (k.first, k.later, k.last_first) == (peak, peak, peak_last), rank


@pytest.mark.parametrize("schedule", ["InterleavedZeroBubble", "ZBVZeroBubble"])
def test_zero_bubble_schedules_are_refused(capsys, schedule):
    args = ["model=llama_tiny", "model.tie_embeddings=false", "model.num_layers=4", "parallel.pp=2"]
    assert main([*args, f"parallel.pp_schedule={schedule}", "world_size=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: parallel.pp_schedule=") and len(err.splitlines()) == 1, err


def test_cli_names_the_pipeline_rank(capsys):
    args = ["model=llama_tiny", "model.tie_embeddings=false", "model.num_layers=4", "parallel.pp=2", "trainer.device=cpu"]
    assert main([*args, "world_size=4"]) == 0
    out = capsys.readouterr().out
    assert "pp rank 0 (rank 0, stage 0: decoder layers 0-1, embedding;" in out
    assert "pp rank 1 (rank 2, stage 1: decoder layers 2-3, final norm + head;" in out
    assert main([*args, "world_size=4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan == estimate(typed(args), 4).as_dict() and plan["stages"] in ([0], [1])
