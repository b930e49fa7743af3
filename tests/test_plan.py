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
from tests.dist_utils import run_distributed

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
    loss = causal_lm_loss(trainer.model, trainer.runner.to_device(trainer.loader.next_step()[0]))
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
    from snoo_train.dist import init_distributed
    from snoo_train.trainer import Trainer

    for name, overrides in LAYOUTS.items():
        cfg = make_config(Path(out_dir) / name, overrides, world_size=world_size)
        p = cfg.parallel
        trainer = Trainer(cfg, init_distributed("cpu", replicas=p.replicas, tp=p.tp, ep=p.ep))
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
