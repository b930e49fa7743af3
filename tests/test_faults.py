"""The fault and bad-input matrix: what a careful new user and a hostile tester try.

Every case either works as asked or stops with one `error: ...` line (no traceback), and every
checkpoint, metrics line and exported file that existed before is byte-identical after. Most
cases start from a copy of one tiny finished run (checkpoints at steps 6 and 12, SNOO k=5).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from snoo_train.checkpoint import (
    Checkpointer,
    NonFiniteState,
    _write_manifest,
    latest_checkpoint,
)
from snoo_train.dist import init_distributed
from snoo_train.preemption import REQUEUE_EXIT_CODE
from snoo_train.rundir import RunDirError
from snoo_train.trainer import Trainer
from tests.conftest import TINY, entry_env, make_config, run_entry
from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]
CKPT6, CKPT12 = "step_00000006", "step_00000012"


# -- shared run and helpers -------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every byte of every file under the roots (checkpoints, metrics, exports)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out.update({str(p): p.read_bytes() for p in files})
    return out


def saved_state(run_dir: Path) -> dict[str, bytes]:
    """What must survive a refused command: the checkpoints, the metrics and the config."""
    return snapshot(run_dir / "checkpoints", run_dir / "metrics.jsonl", run_dir / "config.yaml")


def entry(args: list[str], cwd: Path, *, timeout: float = 120, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    return run_entry(args, cwd, timeout=timeout, env=env, **popen)


def on(run_dir: Path, *extra: str) -> list[str]:
    return TINY + [f"hydra.run.dir={run_dir}", *extra]


def one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with exactly one `error:` line holding every fragment, and no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, (proc.returncode, out[-3000:])
    assert "Traceback" not in out, out[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def plain_value(ckpt: Path, path: list) -> object:
    """One non-tensor value of a checkpoint (state.json), by its path in the state tree."""
    for p, value in json.loads((ckpt / "state.json").read_text())["plain"]:
        if p == path:
            return value
    raise KeyError(path)


def cosine(step: int, max_steps: int, warmup: int, min_ratio: float) -> float:
    """The cosine schedule's multiplier for optimizer step `step` (0-based), from its definition."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup + 1) / (max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -- 1. changed hyper-parameters on resume --------------------------------------------------------


def test_changed_hyperparameters_apply_on_resume_and_are_recorded(run_copy):
    changed = ["optim.k=3", "optim.outer_lr=0.3", "optim.lr=1e-4", "trainer.max_steps=16"]
    proc = entry(on(run_copy, *changed), run_copy.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    for line in ("optim.k: 5 -> 3", "optim.outer_lr: 0.7 -> 0.3", "optim.lr: 0.002 -> 0.0001", "trainer.max_steps: 12 -> 16"):
        assert f"resume: {line} (applied from step 13 on)" in log, line
    assert log.count("resume: ") == 4

    # The first resumed step uses the new peak on the new schedule (quick: warmup 2, min 0.1).
    first = records(run_copy)[[r["step"] for r in records(run_copy)].index(13)]
    assert first["lr"] == pytest.approx(1e-4 * cosine(12, 16, 2, 0.1), rel=1e-9)
    ckpt = run_copy / "checkpoints" / "step_00000016"
    for group in (0, 1):
        assert plain_value(ckpt, ["optim", "param_groups", group, "snoo_k"]) == 3
        assert plain_value(ckpt, ["optim", "param_groups", group, "snoo_lr"]) == 0.3
        assert plain_value(ckpt, ["optim", "param_groups", group, "initial_lr"]) == 1e-4
    # k=3 from step 13 on: the 13th..15th inner steps end in an outer step at 15.
    assert plain_value(ckpt, ["optim", "param_groups", 0, "snoo_step"]) == 16
    saved = (run_copy / "config.yaml").read_text()
    assert "k: 3" in saved and "outer_lr: 0.3" in saved and "lr: 0.0001" in saved

    # The recorded config is the truth: resuming again with the same values changes nothing.
    again = entry(on(run_copy, *changed[:3], "trainer.max_steps=18"), run_copy.parent)
    assert again.returncode == 0, again.stderr[-3000:]
    warned = [ln for ln in (again.stdout + again.stderr).splitlines() if "resume: " in ln]
    assert len(warned) == 1 and "resume: trainer.max_steps: 16 -> 18" in warned[0]


@pytest.mark.parametrize(
    "change, refusal",
    [
        ("optim=lookahead_adamw", "optim.name='snoo_adamw' (this run: 'lookahead_adamw'; a different optimizer)"),
        ("data.seq_len=32", "data.seq_len=64 (this run: 32"),
        ("trainer.seed=1", "trainer.seed=0 (this run: 1"),
    ],
)
def test_structural_changes_on_resume_are_refused(run_copy, change, refusal):
    before = saved_state(run_copy)
    one_error_line(entry(on(run_copy, change), run_copy.parent), "cannot resume", refusal, "new hydra.run.dir")
    assert saved_state(run_copy) == before


# -- 2. one run per run directory -----------------------------------------------------------------


def _wait_for_records(run_dir: Path, proc: subprocess.Popen, n: int = 1, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError("the first run did not get going")


def test_a_second_run_on_a_busy_run_directory_is_refused_at_once(tmp_path):
    run_dir = tmp_path / "run"
    args = on(run_dir, "trainer.max_steps=100000", "checkpoint.interval=2", "trainer.log_interval=1")
    first = subprocess.Popen(
        [sys.executable, "-m", "snoo_train.train", *args], cwd=tmp_path, env=entry_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_records(run_dir, first, n=3)
        t0 = time.time()
        second = entry(args, tmp_path)
        one_error_line(second, "is in use by run pid", str(first.pid), "another hydra.run.dir")
        assert time.time() - t0 < 60
        assert first.poll() is None  # the first run goes on, untouched
        lines = len((run_dir / "metrics.jsonl").read_text().splitlines())
        _wait_for_records(run_dir, first, n=lines + 2)
    finally:
        first.send_signal(signal.SIGTERM)  # preempted: saves, exits 75
        first.communicate(timeout=120)
    assert first.returncode == REQUEUE_EXIT_CODE
    steps = [r["step"] for r in records(run_dir)]
    assert steps == list(range(1, len(steps) + 1))  # every step once, in order
    assert (run_dir / ".lock").read_text() == ""  # released


def test_a_stale_lock_of_a_dead_run_is_taken_over(run_copy):
    (run_copy / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 999999, "started": 0}) + "\n")
    proc = entry(on(run_copy, "trainer.max_steps=14"), run_copy.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "took over the run directory lock" in log and "999999" in log


# -- 3. starting fresh where a run already is ---------------------------------------------------


def test_resume_none_in_a_directory_with_checkpoints_is_refused(run_copy):
    before = saved_state(run_copy)
    one_error_line(
        entry(on(run_copy, "trainer.resume=none"), run_copy.parent),
        "holds an earlier run", CKPT12, "metrics.jsonl", "new hydra.run.dir", "trainer.archive_previous_run=true",
    )  # fmt: skip
    assert saved_state(run_copy) == before


def test_archive_previous_run_moves_it_aside_then_starts_fresh(run_copy):
    before = {k.replace(str(run_copy), ""): v for k, v in snapshot(run_copy / "checkpoints", run_copy / "metrics.jsonl").items()}
    proc = entry(on(run_copy, "trainer.resume=none", "trainer.archive_previous_run=true", "trainer.max_steps=3"), run_copy.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = (run_copy / "archive").iterdir()
    moved = {k.replace(str(archive), ""): v for k, v in snapshot(archive / "checkpoints", archive / "metrics.jsonl").items()}
    assert moved == before  # every earlier byte kept, only moved
    assert [r["step"] for r in records(run_copy)] == [1, 2, 3]


def test_no_checkpoint_but_earlier_metrics_is_refused_too(tmp_path):
    run_dir = tmp_path / "run"
    assert entry(on(run_dir, "trainer.max_steps=3", "checkpoint.interval=0"), tmp_path).returncode == 0
    before = snapshot(run_dir / "metrics.jsonl")
    one_error_line(entry(on(run_dir, "trainer.max_steps=3"), tmp_path), "no checkpoint to resume from")
    assert snapshot(run_dir / "metrics.jsonl") == before


# -- 4. non-finite values never reach a checkpoint ----------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        ("optim.outer_lr=inf", "optim.outer_lr=inf must be a finite number"),
        ("optim.lr=nan", "optim.lr=nan must be a finite number"),  # item 12
        ("optim.betas=[0.9,inf]", "optim.betas[1]=inf must be a finite number"),
    ],
)
def test_non_finite_config_values_are_refused(run_copy, bad, message):
    before = saved_state(run_copy)
    one_error_line(entry(on(run_copy, bad), run_copy.parent), message)
    assert saved_state(run_copy) == before


def test_a_non_finite_state_is_never_published(tmp_path):
    ckpt = Checkpointer(tmp_path)
    good = {"model": {"w": torch.ones(3)}, "trainer": {"step": 1}}
    ckpt.save(1, good, {})
    before = snapshot(tmp_path)
    bad = {"model": {"w": torch.tensor([1.0, float("nan"), 2.0]), "b": torch.ones(2)}, "trainer": {"step": 2}}
    with pytest.raises(NonFiniteState, match=r"not saving step 2: 1 tensor\(s\) hold NaN or inf \(first: model/w\).*step_00000001"):
        ckpt.save(2, bad, {})
    assert snapshot(tmp_path) == before and latest_checkpoint(tmp_path).name == "step_00000001"


def _non_finite_on_one_rank(rank: int, world_size: int, directory: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(8, dtype=torch.float32)
    full[7] = float("inf")  # only the last rank's shard holds it
    tree = {"model": {"w": distribute_tensor(full, mesh, [Shard(0)]), "b": distribute_tensor(torch.ones(4), mesh, [Shard(0)])}}
    with pytest.raises(NonFiniteState, match=r"1 tensor\(s\) hold NaN or inf \(first: model/w\)"):
        Checkpointer(directory, rank=rank, world_size=world_size).save(1, tree, {})
    assert not any(Path(directory).glob("step_*"))


def test_a_non_finite_shard_on_one_rank_stops_every_rank(tmp_path):
    run_distributed(_non_finite_on_one_rank, 2, str(tmp_path))


# -- 5. preemption during start-up ------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_sigterm_during_start_up_of_one_process_exits_for_requeue(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "snoo_train.train", *on(tmp_path / "run")], cwd=tmp_path, env=entry_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.0)  # inside the imports of torch and transformers
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert "during start-up, before step 1: nothing to save" in err and "Traceback" not in err


def test_sigterm_to_torchrun_before_the_first_step_exits_for_requeue(tmp_path):
    run_dir = tmp_path / "run"
    script = subprocess.Popen(
        ["bash", str(REPO / "launch" / "torchrun.sh"), *on(run_dir)], cwd=tmp_path, env=dict(entry_env(), NPROC="2"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 60
    workers: list[int] = []
    while time.time() < deadline and len(workers) < 2:  # torchrun has started both workers
        workers = [w for t in _children(script.pid) for w in _children(t)]
        time.sleep(0.05)
    assert len(workers) == 2
    # Past the interpreter's own start (a few ms no handler can cover), inside the imports.
    time.sleep(1.0)
    script.send_signal(signal.SIGTERM)
    _, err = script.communicate(timeout=120)
    assert script.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert "during start-up" in err
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


# -- 6. documents without text ----------------------------------------------------------------------


def _half_without_text(path: Path) -> Path:
    with open(path, "w") as f:
        for i in range(400):
            doc = {"text": f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 8} if i % 2 == 0 else {"body": "x"}
            f.write(json.dumps(doc) + "\n")
    return path


def test_documents_without_text_stop_the_run(tmp_path):
    corpus = _half_without_text(tmp_path / "corpus.jsonl")
    args = on(tmp_path / "run", "data=local", f"data.files=[{corpus}]", "data.max_documents=null", "trainer.max_steps=2")
    one_error_line(
        entry(args, tmp_path),
        "200 of 400 documents have no 'text'", f"{corpus} line 2", "data.skip_invalid_documents=true",
    )  # fmt: skip
    proc = entry(args + ["data.skip_invalid_documents=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "200 of 400 documents have no 'text'" in log and "skipped" in log


# -- 7. the checkpoint directory cannot be written ----------------------------------------------------


def test_an_unwritable_checkpoint_dir_is_refused_before_the_first_step(tmp_path):
    (tmp_path / "blocker").write_text("a file where a directory should be")
    proc = entry(on(tmp_path / "run", f"checkpoint.dir={tmp_path}/blocker/ckpt"), tmp_path)
    one_error_line(proc, "checkpoint.dir", "blocker/ckpt is not writable")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_too_little_free_space_is_refused_before_the_first_step(run_copy, monkeypatch):
    import snoo_train.rundir

    monkeypatch.setattr(snoo_train.rundir.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    before = saved_state(run_copy)
    with pytest.raises(RunDirError, match=r"has 0.00 GiB free; one checkpoint of this run needs about"):
        Trainer(make_config(run_copy, ["trainer.max_steps=18"]), init_distributed("cpu"))
    assert saved_state(run_copy) == before


def _limit_file_size() -> None:
    # Writes past 256 KiB fail with EFBIG (Python ignores SIGXFSZ): a disk that fills up
    # between the start-up check and a save, as any user, root included.
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoints(run_copy):
    before = saved_state(run_copy)
    proc = entry(on(run_copy, "trainer.max_steps=18"), run_copy.parent, preexec_fn=_limit_file_size)
    one_error_line(proc, "cannot write checkpoint step_00000018", "a file-size limit of 262144 bytes", f"{CKPT12} is intact")
    after = snapshot(run_copy / "checkpoints")
    assert {k: v for k, v in after.items() if ".incomplete" not in k} == {k: v for k, v in before.items() if "/checkpoints/" in k}
    assert latest_checkpoint(run_copy / "checkpoints").name == CKPT12


# -- 8. no network ------------------------------------------------------------------------------------


@pytest.mark.parametrize("offline", [False, True])
def test_an_unknown_tokenizer_without_network_fails_within_seconds(tmp_path, offline):
    env = dict(entry_env(), HF_HUB_OFFLINE="1") if offline else {k: v for k, v in entry_env().items() if k != "HF_HUB_OFFLINE"}
    t0 = time.time()
    proc = entry(on(tmp_path / "run", "data.tokenizer=nonexistent-name"), tmp_path, env=env)
    line = one_error_line(proc, "data.tokenizer='nonexistent-name'", "not found")
    assert time.time() - t0 < 30
    if offline:
        assert "HF_HUB_OFFLINE" in line


def test_a_hub_dataset_without_network_fails_within_seconds(tmp_path):
    t0 = time.time()
    proc = entry(on(tmp_path / "run", "data=hf", "data.path=snoo-train-tests/no-such-dataset", "data.tokenizer=byte"), tmp_path)
    one_error_line(proc, "data.path='snoo-train-tests/no-such-dataset'")
    assert time.time() - t0 < 30


# -- 9. unreadable local data --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"", "empty.jsonl is empty"),
        ("garbage.parquet", bytes(range(256)) * 4, "garbage.parquet is not a readable parquet file"),
        ("numbers.jsonl", b'{"text": 1}\n{"text": 2}\n', "holds a int ('1'), not text, in {dir}/numbers.jsonl line 1"),
    ],
)
def test_unreadable_local_files_are_named_in_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    proc = entry(on(tmp_path / "run", "data=local", f"data.files=[{tmp_path / name}]"), tmp_path)
    one_error_line(proc, message.format(dir=tmp_path))


# -- 10. checkpoints damaged where the manifest cannot tell -------------------------------------------


def _rewrite_state(ckpt: Path, edit) -> None:
    """Damage state.json, then write a manifest that matches it (a writer bug, not bit rot)."""
    doc = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps(edit(doc)))
    _write_manifest(ckpt, checksum=True)


def _unloadable_tensor(ckpt: Path) -> None:
    """Overwrite the middle of one tensor's serialized record (the bytes torch.load reads for
    it), keeping every size; then a manifest that matches."""
    from snoo_train.checkpoint import SafeFileSystemReader

    metadata = SafeFileSystemReader(ckpt).read_metadata()
    index, info = next((i, s) for i, s in metadata.storage_data.items() if i.fqn.startswith("model/"))
    path = ckpt / info.relative_path
    data = bytearray(path.read_bytes())
    start = info.offset + 8
    data[start : start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    _write_manifest(ckpt, checksum=True)


DAMAGE = {
    "state.json without meta": lambda c: _rewrite_state(c, lambda d: {k: v for k, v in d.items() if k != "meta"}),
    "state.json world_size 'two'": lambda c: _rewrite_state(c, lambda d: {**d, "world_size": "two"}),
    "state.json is a list": lambda c: _rewrite_state(c, lambda d: [d]),
    "a tensor torch will not load": _unloadable_tensor,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(run_copy, damage, caplog):
    DAMAGE[damage](run_copy / "checkpoints" / CKPT12)
    trainer = Trainer(make_config(run_copy), init_distributed("cpu"))
    try:
        assert trainer.resumed_from.endswith(CKPT6) and trainer.step == 6
        assert "skipping checkpoint" in caplog.text and CKPT12 in caplog.text
    finally:
        trainer.checkpointer.close()
        trainer.metrics.close()


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_named_explicitly_is_one_line(run_copy, damage):
    ckpt = run_copy / "checkpoints" / CKPT12
    DAMAGE[damage](ckpt)
    before = saved_state(run_copy)
    line = one_error_line(entry(on(run_copy, f"trainer.resume={ckpt}"), run_copy.parent), CKPT12)
    assert "weights_only" not in line
    assert saved_state(run_copy) == before


def test_random_bytes_in_latest_are_ignored(run_copy):
    (run_copy / "checkpoints" / "latest").write_bytes(os.urandom(64))
    proc = entry(on(run_copy, "trainer.max_steps=14"), run_copy.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "ignoring" in log and f"resumed at step 12 from {run_copy}/checkpoints/{CKPT12}" in log


def test_a_latest_pointing_outside_the_checkpoint_dir_is_not_followed(run_copy):
    (run_copy / "checkpoints" / "latest").write_text("../../../etc\n")
    trainer = Trainer(make_config(run_copy), init_distributed("cpu"))
    try:
        assert trainer.resumed_from.endswith(CKPT12)
    finally:
        trainer.checkpointer.close()
        trainer.metrics.close()


# -- 11. export into a place that holds something -------------------------------------------------------


def export(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snoo_train.export", *args], cwd=cwd, env=entry_env(), capture_output=True, text=True, timeout=120
    )


def test_export_refuses_a_non_empty_directory_and_overwrites_only_on_request(finished_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    (out / "tokenizer.json").write_text("an old tokenizer")
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(out)
    one_error_line(export([str(finished_run), str(out)], tmp_path), f"{out} is not empty", "--overwrite")
    assert snapshot(out) == before

    proc = export([str(finished_run), str(out), "--overwrite"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["TOKENIZER.txt", "config.json", "generation_config.json", "model.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_text() == "the user's own file"  # not ours: kept
    assert "byte-level" in proc.stderr.lower() and "Byte-level tokens" in (out / "TOKENIZER.txt").read_text()


def test_export_to_a_file_is_one_line(finished_run, tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"keep me")
    one_error_line(export([str(finished_run), str(target)], tmp_path), "is a file, not a directory")
    assert target.read_bytes() == b"keep me"


# -- 12. values the model cannot take ---------------------------------------------------------------------


def test_a_vocabulary_smaller_than_the_tokenizers_is_one_line(tmp_path):
    one_error_line(entry(on(tmp_path / "run", "model.vocab_size=10"), tmp_path), "model.vocab_size=10 is smaller than the tokenizer's vocabulary (257")


# -- under torchrun ------------------------------------------------------------------------------------


def test_a_refusal_under_torchrun_ends_every_rank_with_one_message(run_copy):
    before = saved_state(run_copy)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "snoo_train.train",
         *on(run_copy, "trainer.resume=none")],
        cwd=run_copy.parent, env=entry_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1 and "holds an earlier run" in proc.stderr
    assert saved_state(run_copy) == before
