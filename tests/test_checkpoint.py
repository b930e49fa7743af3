"""Checkpoints: exact resume, resharding, atomicity under kill -9, preemption, export, bad input.

References are independent of the code under test: an uninterrupted run of the same config
(for resume), the file system itself (for atomicity), and transformers' own loader (export).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from snoo_train.checkpoint import (
    LATEST,
    Checkpointer,
    CheckpointError,
    _set_path,
    complete_checkpoints,
    find_resume_checkpoint,
    load_state,
    read_tensor_keys,
    split_state,
    verify_checkpoint,
)
from snoo_train.config import ConfigError
from snoo_train.dist import init_distributed
from snoo_train.preemption import REQUEUE_EXIT_CODE
from snoo_train.trainer import Trainer, TrainingDiverged
from tests.conftest import (
    STEPS,
    TINY,
    entry_env,
    make_config,
    poison_losses,
    run_entry,
    run_trainer,
    train,
)
from tests.dist_utils import free_port

REPO = Path(__file__).resolve().parents[1]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Parameters and every optimizer state tensor (Adam moments, SNOO slow weights and
    momentum), keyed by parameter name, plus the param-group counters."""
    names = {p: n for n, p in trainer.model.named_parameters()}
    out = {f"param/{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    for p, state in trainer.optimizer.state.items():
        for key, value in state.items():
            out[f"state/{names[p]}/{key}"] = value.detach().clone()
    for i, group in enumerate(trainer.optimizer.param_groups):
        out[f"group{i}/snoo_step"] = torch.tensor(group["snoo_step"])
        out[f"group{i}/lr"] = torch.tensor(group["lr"])
    return out


def snapshot(ckpt_dir: Path) -> dict[str, bytes]:
    """Every byte of every complete checkpoint and the latest pointer."""
    return {
        str(p.relative_to(ckpt_dir)): p.read_bytes()
        for p in sorted(ckpt_dir.rglob("*"))
        if p.is_file() and ".incomplete" not in str(p)
    }


# -- state trees, safe loading, atomic publishing -------------------------------------------------


def test_state_tree_splits_into_tensors_and_json_and_back():
    tree = {
        "a": torch.arange(3.0),
        "groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": ["x", "y"]}, {"lr": None}],
        "nested": {"step": 7, "t": torch.ones(2, 2)},
    }
    tensors, plain = split_state(tree)
    assert set(tensors) == {"a", "nested/t"}
    rebuilt = {"a": torch.zeros(3), "groups": [{"lr": 0, "betas": (0, 0), "params": []}, {"lr": 1}],
               "nested": {"step": 0, "t": torch.zeros(2, 2)}}
    for path, value in json.loads(json.dumps(plain)):  # through JSON, as on disk
        _set_path(rebuilt, path, value)
    assert rebuilt["groups"] == tree["groups"] and rebuilt["nested"]["step"] == 7
    assert isinstance(rebuilt["groups"][0]["betas"], tuple)


def test_checkpoint_async_is_accepted_as_the_command_line_spelling():
    from snoo_train.configs import accept_async_alias

    assert accept_async_alias(["x", "checkpoint.async=true", "+checkpoint.async=false", "checkpoint.async_save=true"]) == [
        "x", "checkpoint.async_save=true", "+checkpoint.async_save=false", "checkpoint.async_save=true"
    ]
    cfg = make_config(Path("/tmp/unused"), accept_async_alias(["checkpoint.async=true"]))
    assert cfg.checkpoint.async_save is True


def _save_tiny(ckpt_dir: Path, step: int, value: float, **kw) -> Checkpointer:
    ckpt = Checkpointer(ckpt_dir, **kw)
    ckpt.save(step, {"w": torch.full((4, 3), value), "n": {"step": step}}, {"tag": "t"})
    return ckpt


def test_saves_publish_atomically_and_prune_after_completion(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_latest=2)
    for step in (1, 2, 3):
        ckpt.save(step, {"w": torch.full((2,), float(step)), "n": {"step": step}}, {})
        assert (tmp_path / LATEST).read_text().strip() == f"step_{step:08d}"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000003", "step_00000002"]
    assert not list(tmp_path.glob("*.incomplete"))
    state = {"w": torch.zeros(2), "n": {"step": 0}}
    load_state(tmp_path / "step_00000002", state)
    assert state["w"].tolist() == [2.0, 2.0] and state["n"]["step"] == 2


def test_async_save_writes_the_values_at_save_time(tmp_path):
    w = torch.full((256, 256), 1.0)
    ckpt = Checkpointer(tmp_path, async_save=True)
    ckpt.save(5, {"w": w}, {})
    w.add_(100.0)  # training goes on while the background thread writes
    ckpt.close()
    state = {"w": torch.zeros(256, 256)}
    load_state(tmp_path / "step_00000005", state)
    assert torch.equal(state["w"], torch.full((256, 256), 1.0))
    assert (tmp_path / LATEST).read_text().strip() == "step_00000005"


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_metadata_pickle_cannot_run_code(tmp_path):
    _save_tiny(tmp_path, 1, 1.0)
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "step_00000001"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match="refusing to load posix.system|refusing to load os.system"):
        read_tensor_keys(ckpt)
    assert not marker.exists()


def test_pickled_non_tensor_entries_are_refused(tmp_path):
    # A DCP checkpoint written by other code, with a Python object DCP would unpickle.
    dcp.save({"w": torch.ones(2), "obj": {"anything": 1}}, checkpoint_id=str(tmp_path), no_dist=True)
    (tmp_path / "state.json").write_text(json.dumps({"format": 1, "step": 0, "world_size": 1, "meta": {}, "plain": []}))
    with pytest.raises(CheckpointError, match="pickled objects"):
        load_state(tmp_path, {"w": torch.zeros(2)})


def test_verification_detects_truncation_and_bit_flips(tmp_path):
    _save_tiny(tmp_path, 1, 1.0)
    ckpt = tmp_path / "step_00000001"
    verify_checkpoint(ckpt)
    data = next(ckpt.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="CRC32"):
        verify_checkpoint(ckpt)
    data.write_bytes(bytes(raw[:-10]))
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(ckpt)


# -- exact resume (one process, bitwise) -----------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run that also leaves a checkpoint after every step."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    trainer = run_trainer(run_dir, ["checkpoint.interval=1", "checkpoint.keep_latest=0"])
    return run_dir, full_state(trainer), trainer


@pytest.mark.parametrize("stop_step", [7, 10], ids=["mid_cycle", "on_outer_step"])
def test_resume_reproduces_the_uninterrupted_run_bitwise(reference_run, tmp_path, stop_step):
    ref_dir, ref_state, _ = reference_run
    resumed = run_trainer(
        tmp_path / "run", [f"trainer.resume={ref_dir}/checkpoints/step_{stop_step:08d}", "checkpoint.interval=0"]
    )
    assert resumed.resumed_from.endswith(f"step_{stop_step:08d}")
    want, got = losses(ref_dir), losses(tmp_path / "run")
    assert sorted(got) == list(range(stop_step + 1, STEPS + 1))
    assert all(got[s] == want[s] for s in got), (got, want)
    state = full_state(resumed)
    assert state.keys() == ref_state.keys()
    unequal = [k for k in state if not torch.equal(state[k], ref_state[k])]
    assert not unequal, unequal
    assert any("snoo_slow" in k for k in state) and any("exp_avg_sq" in k for k in state)


def optimizer_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Parameters and every tensor in the optimizer's state, keyed by parameter name (any
    optimizer: SNOO's, GPA's, EMA-Nesterov's and Schedule-Free's own buffers included)."""
    names = {p: n for n, p in trainer.model.named_parameters()}
    out = {f"param/{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    for p, state in trainer.optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"state/{names[p]}/{key}"] = value.detach().clone()
    return out


@pytest.mark.parametrize(
    "optim",
    ["adamw", "lookahead_adamw", "gpa_adamw", "ema_nesterov_adamw", "schedule_free_adamw", "snoo_muon"],
)
def test_every_optimizer_resumes_exactly(tmp_path, optim):
    """Issue 6: each method's state is checkpointed (through optimizer.state and its param
    groups) and resumes bitwise, stopping at step 3 of 5."""
    common = [f"optim={optim}", "trainer.max_steps=5", "trainer.eval_interval=5"]
    full = run_trainer(tmp_path / "full", common + ["checkpoint.interval=3"])
    resumed = run_trainer(
        tmp_path / "resumed",
        common + [f"trainer.resume={tmp_path}/full/checkpoints/step_00000003", "checkpoint.interval=0"],
    )
    want, got = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(got) == [4, 5] and all(got[s] == want[s] for s in got), (got, want)
    a, b = optimizer_tensors(full), optimizer_tensors(resumed)
    assert a.keys() == b.keys() and len(a) > sum(1 for _ in full.model.parameters())
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_weights"] == full.evaluator.eval_sequence


def test_resume_auto_in_the_same_run_dir_truncates_metrics_and_continues(reference_run, tmp_path):
    ref_dir, _, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    for p in (run_dir / "checkpoints").glob("step_*"):
        if int(p.name[5:]) > 8:
            shutil.rmtree(p)
    (run_dir / "checkpoints" / LATEST).write_text("step_00000008\n")
    trainer = run_trainer(run_dir, ["checkpoint.interval=4"])
    assert trainer.resumed_from.endswith("step_00000008")
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # no step twice, none missing
    assert losses(run_dir) == losses(ref_dir)


# -- export -----------------------------------------------------------------------------------


def test_export_loads_with_automodel_and_matches_the_slow_weights_logits(reference_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from snoo_train.export import main as export_main

    ref_dir, _, trainer = reference_run  # 12 steps, k=5: the final outer step at 12 ends mid-cycle
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final_logits = trainer.model(input_ids=ids).logits
        with trainer.evaluator.weights():
            slow_logits = trainer.model(input_ids=ids).logits
    assert torch.equal(final_logits, slow_logits)  # after it fast == slow: the final model
    export_main([str(ref_dir), str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()

    def exported_logits(out: str) -> torch.Tensor:
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(tmp_path / out)(input_ids=ids).logits

    torch.testing.assert_close(exported_logits("hf"), slow_logits, rtol=1e-5, atol=1e-5)
    # Mid-cycle (step 7, two inner steps after the outer step at 5) the export writes the slow
    # weights, which are step 5's parameters, not the fast ones (--weights params).
    ckpts = ref_dir / "checkpoints"
    export_main([str(ckpts / "step_00000007"), str(tmp_path / "mid")])
    export_main([str(ckpts / "step_00000007"), str(tmp_path / "mid_fast"), "--weights", "params"])
    export_main([str(ckpts / "step_00000005"), str(tmp_path / "outer5"), "--weights", "params"])
    torch.testing.assert_close(exported_logits("mid"), exported_logits("outer5"), rtol=0, atol=0)
    assert not torch.allclose(exported_logits("mid"), exported_logits("mid_fast"), atol=1e-3)


# -- world sizes 2 -> 1 and 4, kill -9, SIGTERM (subprocesses) -------------------------------------


@pytest.mark.slow
def test_checkpoint_from_two_ranks_resumes_at_one_and_four(tmp_path):
    ws2 = tmp_path / "ws2"
    common = TINY + ["checkpoint.keep_latest=0"]
    train(common + ["checkpoint.interval=6", f"hydra.run.dir={ws2}"], tmp_path, nproc=2)
    want = losses(ws2)
    resume = f"trainer.resume={ws2}/checkpoints/step_00000006"
    run_trainer(tmp_path / "ws1", ["checkpoint.keep_latest=0", resume])  # one process: in this one
    train(common + [resume, f"hydra.run.dir={tmp_path / 'ws4'}"], tmp_path, nproc=4)
    for nproc in (1, 4):
        got = losses(tmp_path / f"ws{nproc}")
        assert sorted(got) == list(range(7, STEPS + 1))
        assert [got[s] for s in got] == pytest.approx([want[s] for s in got], rel=1e-4), nproc
    # And the ws2 checkpoint exports in one process.
    from snoo_train.export import load_model

    model, _ = load_model(ws2)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
def test_diloco_two_replicas_resume_exactly_and_export(tmp_path):
    """DiLoCo (2 replicas x 2 shards): each replica's fast weights and AdamW state differ
    mid-cycle and are saved under their own keys, so a resume at step 6 (k=5) is bitwise."""
    diloco = TINY + ["parallel.replicas=2", "trainer.max_steps=8", "checkpoint.keep_latest=0"]
    full = tmp_path / "full"
    train(diloco + ["checkpoint.interval=6", f"hydra.run.dir={full}"], tmp_path, nproc=4)
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["step"] for r in records if "snoo/pseudo_grad_norm" in r] == [5, 6, 7, 8]  # after the first outer step
    assert [r["val_weights"] for r in records if "val_loss" in r] == ["slow", "slow"]
    assert json.loads((full / "summary.json").read_text())["world_size"] == 4
    keys = read_tensor_keys(full / "checkpoints" / "step_00000006")
    assert any(k.startswith("replica1/optim/state/") for k in keys)
    resumed = tmp_path / "resumed"
    train(
        diloco + [f"trainer.resume={full}/checkpoints/step_00000006", "checkpoint.interval=0",
                  f"hydra.run.dir={resumed}"],
        tmp_path, nproc=4,
    )
    want, got = losses(full), losses(resumed)
    assert sorted(got) == [7, 8] and all(got[s] == want[s] for s in got), (got, want)
    # A different replica count cannot take the per-replica state.
    with pytest.raises(CheckpointError, match="parallel.replicas=2"):
        Trainer(make_config(tmp_path / "one", [f"trainer.resume={full}", "trainer.max_steps=8"]), init_distributed("cpu"))
    from snoo_train.export import load_model

    model, _ = load_model(full)  # replica 0's slow weights, in one process
    assert sum(p.numel() for p in model.parameters()) > 0


FAULT_RUNNER = """
import os, signal, sys
from torch.distributed.checkpoint import FileSystemWriter
original = FileSystemWriter.write_data
def write_data(self, plan, planner):
    # rank 1 dies (kill -9) in the middle of writing the checkpoint of step 6
    if os.environ.get("RANK") == "1" and "step_00000006" in str(self.path):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, plan, planner)
FileSystemWriter.write_data = write_data
from snoo_train.train import main
sys.argv[0] = "snoo_train.train"
main()
"""


@pytest.mark.slow
def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    run_dir = tmp_path / "run"
    runner = tmp_path / "fault_runner.py"
    runner.write_text(FAULT_RUNNER)
    args = TINY + ["checkpoint.interval=3", "checkpoint.keep_latest=0", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", str(runner), *args],
        cwd=tmp_path, env=entry_env(), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode != 0
    ckpts = run_dir / "checkpoints"
    assert (ckpts / LATEST).read_text().strip() == "step_00000003", proc.stderr[-3000:]
    assert (ckpts / "step_00000006.incomplete").exists()  # the half-written save, not published
    assert find_resume_checkpoint(ckpts) == ckpts / "step_00000003"

    # The restart (trainer.resume=auto, here in one process: the checkpoint reshards).
    trainer = run_trainer(run_dir, ["checkpoint.interval=3", "checkpoint.keep_latest=0"])
    assert trainer.resumed_from == str(ckpts / "step_00000003")
    assert not list(ckpts.glob("*.incomplete"))
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))


def _wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError("the run did not get going")


@pytest.mark.slow
def test_sigterm_to_a_torchrun_job_saves_exits_for_requeue_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = TINY + ["trainer.max_steps=2000", "checkpoint.interval=0", f"hydra.run.dir={run_dir}"]
    env = dict(entry_env(), NPROC="2")
    proc = subprocess.Popen(
        ["bash", str(REPO / "launch" / "torchrun.sh"), *args], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _wait_for_steps(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    saved = find_resume_checkpoint(run_dir / "checkpoints")
    step = int(saved.name[5:])
    assert f"stopped after step {step}" in err
    assert max(losses(run_dir)) == step

    # The requeued job: same run directory, trainer.resume=auto (in one process here).
    trainer = run_trainer(run_dir, [f"trainer.max_steps={step + 3}", "checkpoint.interval=0"])
    assert trainer.resumed_from == str(saved)
    assert sorted(losses(run_dir))[-4:] == [step, step + 1, step + 2, step + 3]


def test_sigterm_to_one_process_saves_and_exits_for_requeue(tmp_path):
    run_dir = tmp_path / "run"
    args = TINY + ["trainer.max_steps=2000", "checkpoint.interval=0", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "snoo_train.train", *args], cwd=tmp_path, env=entry_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _wait_for_steps(run_dir, 3, proc)
    proc.send_signal(signal.SIGUSR1)  # what SLURM's --signal sends ahead of the time limit
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert "SIGUSR1" in err and "Traceback" not in err
    saved = find_resume_checkpoint(run_dir / "checkpoints")
    verify_checkpoint(saved)
    assert max(losses(run_dir)) == int(saved.name[5:])


# -- bad input: one clear message, nothing saved is lost ----------------------------------------------


def _rerun_entry(run_dir: Path, extra: list[str]) -> subprocess.CompletedProcess:
    proc = run_entry(TINY + [f"hydra.run.dir={run_dir}", *extra], run_dir.parent, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def test_missing_data_path_is_one_message_and_keeps_checkpoints(run_copy):
    before = snapshot(run_copy / "checkpoints")
    proc = _rerun_entry(run_copy, ["data=local", f"data.files=[{run_copy}/nope.jsonl]"])
    assert "nope.jsonl" in proc.stderr
    assert snapshot(run_copy / "checkpoints") == before


def test_checkpoint_of_another_model_is_refused_by_name(run_copy):
    before = snapshot(run_copy / "checkpoints")
    proc = _rerun_entry(run_copy, ["model.hidden_size=32", "model.num_heads=2", "model.num_kv_heads=1"])
    assert "different model" in proc.stderr and "model.hidden_size=64 (this run: 32)" in proc.stderr
    assert snapshot(run_copy / "checkpoints") == before


def test_checkpoint_of_another_optimizer_is_refused(run_copy):
    with pytest.raises(CheckpointError, match="optim.outer=snoo .this run: none"):
        Trainer(make_config(run_copy, ["optim=adamw"]), init_distributed("cpu"))


def test_corrupt_latest_falls_back_to_the_previous_checkpoint(run_copy, caplog):
    data = next((run_copy / "checkpoints" / "step_00000012").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated
    trainer = Trainer(make_config(run_copy), init_distributed("cpu"))
    assert trainer.resumed_from.endswith("step_00000006") and trainer.step == 6
    assert "truncated" in caplog.text and "previous complete checkpoint" in caplog.text
    trainer.checkpointer.close()
    trainer.metrics.close()


def test_corrupt_checkpoint_named_explicitly_is_an_error(run_copy):
    ckpt = run_copy / "checkpoints" / "step_00000006"
    before = snapshot(run_copy / "checkpoints")
    (ckpt / ".metadata").write_bytes(b"garbage")
    proc = _rerun_entry(run_copy, [f"trainer.resume={ckpt}"])
    assert "step_00000006" in proc.stderr and ".metadata" in proc.stderr
    assert {k: v for k, v in snapshot(run_copy / "checkpoints").items() if "00000006/.metadata" not in k} == {
        k: v for k, v in before.items() if "00000006/.metadata" not in k
    }


def test_out_of_range_value_is_refused_before_anything_is_touched(run_copy):
    # Validation runs before any process group, data or checkpoint is touched (the CLI prints
    # the message as one line: tests/test_configs.py).
    before = snapshot(run_copy / "checkpoints")
    for bad, key in (
        ("checkpoint.interval=-1", "checkpoint.interval=-1"),
        ("checkpoint.keep_latest=-2", "checkpoint.keep_latest=-2"),
        ("trainer.nonfinite=ignore", "trainer.nonfinite"),
        ("trainer.nonfinite_max_skips=0", "trainer.nonfinite_max_skips"),
    ):
        with pytest.raises(ConfigError, match=key):
            make_config(run_copy, [bad])
    assert snapshot(run_copy / "checkpoints") == before


def test_nonfinite_loss_stop_saves_nothing_corrupt(run_copy, monkeypatch):
    before = snapshot(run_copy / "checkpoints")
    poison_losses(monkeypatch, {2})
    trainer = Trainer(
        make_config(run_copy, ["trainer.max_steps=24", "checkpoint.interval=1", "checkpoint.keep_latest=0"]),
        init_distributed("cpu"),
    )
    assert trainer.step == 12
    with pytest.raises(TrainingDiverged, match="training loss is nan at step 14"):
        trainer.fit()
    after = snapshot(run_copy / "checkpoints")
    # The step-13 checkpoint is new and finite; nothing of step 14 was saved; older ones intact.
    assert (run_copy / "checkpoints" / LATEST).read_text().strip() == "step_00000013"
    assert not (run_copy / "checkpoints" / "step_00000014").exists()
    assert all(after[k] == v for k, v in before.items() if k != LATEST)


def test_nonfinite_loss_skip_leaves_weights_and_optimizer_state_untouched(tmp_path, monkeypatch):
    poison_losses(monkeypatch, {3})
    cfg = make_config(tmp_path / "run", ["trainer.nonfinite=skip", "trainer.max_steps=4", "checkpoint.interval=0"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    seen = []
    original = trainer.train_step

    def step(s):
        before = full_state(trainer)
        out = original(s)
        seen.append((s, out[2], before, full_state(trainer), trainer.scheduler.last_epoch))
        return out

    trainer.train_step = step
    summary = trainer.fit()
    assert [s for s, skipped, *_ in seen if skipped] == [3]
    _, _, before, after, epoch = seen[2]
    # The skip is decided on the device (no host sync, docs/development.md "Steps without host syncs"): the
    # host-side counters (AdamW's step, SNOO's snoo_step, the LR schedule) advance as if the
    # step had been taken; the parameters and every state tensor are untouched.
    counters = [k for k in before if k.endswith(("/step", "/snoo_step", "/lr"))]
    assert all(torch.equal(before[k], after[k]) for k in before if k not in counters)  # params, Adam, SNOO
    assert all(torch.equal(after[k], before[k] + 1) for k in counters if not k.endswith("/lr"))
    assert epoch == seen[1][4] + 1
    assert summary["skipped_steps"] == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] == 1
