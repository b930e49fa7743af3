"""The training entry point and its parts: LR schedules, weight-decay groups, DTensor-correct
gradient clipping, and end-to-end runs (one process and torchrun with 2 ranks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from snoo_train.metrics import MetricsLogger, peak_flops, peak_flops_by_name
from snoo_train.models import PRESETS, build_model, flops_per_token, materialize, parallelize
from snoo_train.optim import SNOO
from snoo_train.optim.build import weight_decay_groups
from snoo_train.schedule import build_scheduler, lr_multiplier
from snoo_train.trainer import causal_lm_loss, clip_grad_norm
from tests.conftest import PEAK, QUICK, VOCAB, entry_env, read_records, run_entry, train
from tests.dist_utils import run_distributed
from tests.records import assert_records_match

REPO = Path(__file__).resolve().parents[1]

RECORD_FIELDS = {
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "elapsed_s",
    "peak_mem_bytes",
    "weight_norm",
}
SNOO_FIELDS = {"snoo/pseudo_grad_norm", "snoo/slow_weight_norm"}


# -- learning-rate schedules -----------------------------------------------------------------


def multipliers(kind: str, **kw) -> list[float]:
    fn = lr_multiplier(kind, **kw)
    return [fn(i) for i in range(kw["max_steps"])]


def test_constant_schedule_warms_up_linearly():
    assert multipliers("constant", max_steps=6, warmup_steps=4) == pytest.approx(
        [0.25, 0.5, 0.75, 1, 1, 1]
    )


def test_cosine_schedule_hand_computed():
    m = multipliers("cosine", max_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert m[0] == pytest.approx(0.5) and m[1] == pytest.approx(1.0)
    # step 2 is the first of 8 decay steps: progress 1/8
    assert m[2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 8)))
    assert m[5] == pytest.approx(0.55)  # progress 1/2: half way between 1 and 0.1
    assert m[9] == pytest.approx(0.1)  # the last step reaches min_lr_ratio
    assert all(a >= b for a, b in zip(m[1:], m[2:]))


def test_wsd_schedule_hand_computed():
    m = multipliers("wsd", max_steps=10, warmup_steps=2, min_lr_ratio=0.1, decay_fraction=0.3)
    assert m == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 0.7, 0.4, 0.1])


def test_no_warmup_starts_at_full_lr():
    assert multipliers(
        "wsd", max_steps=4, warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.5
    ) == pytest.approx([1, 1, 0.5, 0.0])


class _Sched:
    lr_schedule, max_steps, warmup_steps, min_lr_ratio, decay_fraction = "wsd", 10, 2, 0.1, 0.3


def test_scheduler_drives_the_inner_lr_through_snoo():
    p = torch.nn.Parameter(torch.zeros(3))
    inner = torch.optim.AdamW([p], lr=0.01)
    opt = SNOO(inner, k=3)
    sched = build_scheduler(opt, _Sched)
    seen = []
    for _ in range(10):
        seen.append(inner.param_groups[0]["lr"])
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.01 * m for m in [0.5, 1, 1, 1, 1, 1, 1, 0.7, 0.4, 0.1]])
    assert opt.param_groups[0]["snoo_lr"] == 0.7  # the outer lr is not scheduled


# -- weight decay and gradient clipping --------------------------------------------------------


def test_weight_decay_only_on_matrices():
    model = build_model(PRESETS["llama_tiny"], VOCAB, seed=0)
    decay, no_decay = weight_decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    emb = model.get_input_embeddings().weight
    assert any(p is emb for p in no_decay["params"])
    assert all(p.ndim == 2 and p is not emb for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"] if p is not emb)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _batch(seed: int, n: int = 4, seq: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (n, seq + 1), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def _reference_grads(max_norm: float) -> tuple[float, list[torch.Tensor]]:
    """Single process, plain tensors, norm and clipping written out by hand."""
    model = build_model(PRESETS["llama_tiny"], VOCAB, seed=0)
    causal_lm_loss(model, _batch(1)).backward()
    grads = [p.grad.double() for p in model.parameters()]
    norm = math.sqrt(sum(g.pow(2).sum().item() for g in grads))
    coef = min(1.0, max_norm / (norm + 1e-6))
    return norm, [(g * coef).float() for g in grads]


def test_clip_grad_norm_single_process():
    ref_norm, ref_grads = _reference_grads(0.05)
    assert ref_norm > 0.05  # the clip must actually act
    model = build_model(PRESETS["llama_tiny"], VOCAB, seed=0)
    causal_lm_loss(model, _batch(1)).backward()
    assert float(clip_grad_norm(model.parameters(), 0.05)) == pytest.approx(ref_norm, rel=1e-5)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def _clip_under_fsdp(rank: int, world_size: int, max_norm: float) -> None:
    ref_norm, ref_grads = _reference_grads(max_norm)
    mesh = init_device_mesh("cpu", (world_size,))
    model = build_model(PRESETS["llama_tiny"], VOCAB, seed=0, device="meta")
    parallelize(model, mesh=mesh)
    materialize(model, device="cpu", seed=0)
    batch = _batch(1)
    per_rank = batch["input_ids"].shape[0] // world_size
    local = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
    causal_lm_loss(model, local).backward()  # FSDP2 averages the shards' gradients

    norm = clip_grad_norm(model.parameters(), max_norm)
    assert isinstance(norm, torch.Tensor) and not isinstance(norm, DTensor) and norm.ndim == 0  # on the device, global
    norm = float(norm)
    assert norm == pytest.approx(ref_norm, rel=1e-5), (norm, ref_norm)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad.full_tensor(), g, rtol=1e-4, atol=1e-6)
    # gloo can abort a rank whose peer tears the group down while its last send is in flight.
    dist.barrier()


@pytest.mark.slow
def test_clip_grad_norm_under_fsdp_matches_single_process():
    run_distributed(_clip_under_fsdp, 2, 0.05)


# -- metrics ---------------------------------------------------------------------------------


def _metrics_cfg(mode: str = "disabled") -> SimpleNamespace:
    wandb = SimpleNamespace(
        mode=mode, project="snoo-train-test", entity=None, name=None, group=None, tags=[]
    )
    return SimpleNamespace(
        logging=SimpleNamespace(metrics_file="metrics.jsonl", wandb=wandb),
        trainer=SimpleNamespace(progress=True),
    )


def test_peak_flops_table():
    assert peak_flops_by_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_by_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_by_name("NVIDIA H200") == 989e12
    assert peak_flops_by_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_by_name("NVIDIA GeForce GTX 1080") is None
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 1e12) == 1e12


def test_metrics_logger_writes_jsonl_on_rank_0_only(tmp_path):
    for rank in (1, 0):
        logger = MetricsLogger(str(tmp_path / f"rank{rank}"), _metrics_cfg(), rank, total_steps=2)
        logger.advance(1)
        logger.log({"step": 1, "loss": torch.tensor(2.5), "lr": 1e-3})
        logger.log({"step": 2, "loss": 2.0, "val_loss": 2.1})
        logger.close()
    assert not (tmp_path / "rank1").exists()
    assert read_records(tmp_path / "rank0") == [
        {"step": 1, "loss": 2.5, "lr": 1e-3},
        {"step": 2, "loss": 2.0, "val_loss": 2.1},
    ]


_LOGGER_SNIPPET = """
import sys
from types import SimpleNamespace as NS
from snoo_train.metrics import MetricsLogger
wandb = NS(mode=sys.argv[2], project="snoo-train-test", entity=None, name=None, group=None, tags=[])
cfg = NS(logging=NS(metrics_file="metrics.jsonl", wandb=wandb), trainer=NS(progress=False))
logger = MetricsLogger(sys.argv[1], cfg, 0, resolved_config={"optim": {"lr": 1e-3}})
logger.log({"step": 1, "loss": 2.0})
logger.close()
assert ("wandb" in sys.modules) == (sys.argv[2] != "disabled")
"""


def _log_one_record(run_dir: Path, mode: str) -> None:
    env = dict(entry_env(), WANDB_MODE=mode, WANDB_SILENT="true")
    cmd = [sys.executable, "-c", _LOGGER_SNIPPET, str(run_dir), mode]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=120)
    assert read_records(run_dir) == [{"step": 1, "loss": 2.0}]


def test_wandb_disabled_is_never_imported(tmp_path):
    _log_one_record(tmp_path, "disabled")
    assert not (tmp_path / "wandb").exists()


@pytest.mark.slow
def test_wandb_offline_writes_a_local_run(tmp_path):
    _log_one_record(tmp_path, "offline")
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


# -- end to end ------------------------------------------------------------------------------


def check_run(run_dir: Path, *, snoo: bool) -> list[dict]:
    records = read_records(run_dir)
    assert [r["step"] for r in records] == [1, 5, 10, 15, 20, 25, 30]
    for r in records:
        assert RECORD_FIELDS <= r.keys(), r
        assert all(math.isfinite(r[k]) for k in RECORD_FIELDS), r
    assert records[-1]["tokens"] == 30 * 8 * 64
    world_size = json.loads((run_dir / "summary.json").read_text())["world_size"]
    fpt = flops_per_token(PRESETS["llama_tiny"], VOCAB, 64)
    for r in records:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / (PEAK * world_size))
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5, [r["loss"] for r in records]
    with_outer = [r for r in records if SNOO_FIELDS <= r.keys()]
    if snoo:  # k=20 in snoo_adamw: the first outer step is step 20
        assert [r["step"] for r in with_outer] == [20, 25, 30]
        assert all(r[k] > 0 for r in with_outer for k in SNOO_FIELDS)
    else:
        assert not with_outer
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert (run_dir / "config.yaml").exists()
    return records


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory) -> dict[str, Path]:
    """One single-process run per optimizer, shared by the tests below."""
    runs = {}
    for optim in ("adamw", "snoo_adamw"):
        cwd = tmp_path_factory.mktemp(optim)
        runs[optim] = cwd / "run"
        train(QUICK + [f"optim={optim}", f"hydra.run.dir={runs[optim]}"], cwd=cwd)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw", "snoo_adamw"])
def test_single_process_training(single_runs, optim):
    run_dir = single_runs[optim]
    check_run(run_dir, snoo=optim == "snoo_adamw")
    saved = (run_dir / "config.yaml").read_text()
    assert f"run_dir: {run_dir}" in saved and f"name: {optim}" in saved


@pytest.mark.slow
def test_torchrun_two_ranks_share_one_run_dir_and_match_one_process(single_runs, tmp_path):
    # Default hydra.run.dir (runs/${now:...}): each rank's clock would name its own directory.
    # grad_accum=2 on 2 ranks sees the same 8 sequences per step as the single process.
    train(QUICK + ["optim=snoo_adamw", "trainer.grad_accum=2"], cwd=tmp_path, nproc=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    assert len(list(tmp_path.rglob("metrics.jsonl"))) == 1
    records = check_run(run_dirs[0], snoo=True)
    assert json.loads((run_dirs[0] / "summary.json").read_text())["world_size"] == 2

    reference = read_records(single_runs["snoo_adamw"])
    keys = ("loss", "grad_norm", "val_loss", "weight_norm", "snoo/pseudo_grad_norm", "snoo/slow_weight_norm")
    assert_records_match(records, reference, keys, rel=1e-3)


@pytest.mark.slow
def test_diverging_loss_stops_with_a_clear_error(tmp_path):
    args = QUICK + [
        "optim=adamw",
        "optim.lr=1e30",
        "trainer.grad_clip=0",
        "trainer.warmup_steps=0",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = run_entry(args, tmp_path, timeout=120)
    assert proc.returncode != 0
    # lr=1e30 blows up the gradient norm or the loss first, depending on the step.
    assert ("training loss is" in proc.stderr or "gradient norm is" in proc.stderr), proc.stderr
    assert "optim.lr" in proc.stderr and "trainer.nonfinite=skip" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["missing_file", "wrong_text_field"])
def test_bad_data_input_is_one_clear_error(tmp_path, problem):
    if problem == "missing_file":
        files, expected = tmp_path / "nope.txt", "nope.txt"
        extra = []
    else:
        files, expected = tmp_path / "docs.jsonl", "data.text_field"
        files.write_text('{"body": "def f():\\n    return 1"}\n' * 50)
        extra = ["data.text_field=content"]
    args = QUICK + [
        "data=local",
        f"data.files=[{files}]",
        f"hydra.run.dir={tmp_path / 'run'}",
        *extra,
    ]
    proc = run_entry(args, tmp_path, timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
