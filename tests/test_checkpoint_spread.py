"""Checkpoint integrity spread over the ranks, and failures that are not damage (issue 20, parts 3
and 4).

* Each rank checksums the bytes it writes while writing them; the manifest rank 0 merges must
  match the files on disk, checked here against zlib over the bytes read back (the reference).
* Only proven damage (a size or CRC32 mismatch, a missing or unparsable file) lets a resume fall
  back. An I/O error or out of memory while reading the newest checkpoint stops the run with one
  line naming the checkpoint and the cause, and every file that existed before is byte-identical
  after: nothing is rewound, nothing is replaced.
* At world size 2 the same holds when only one rank fails, and a background (async) save that
  fails on one rank stops every rank with the same message, `latest` untouched.
"""

from __future__ import annotations

import errno
import json
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from snoo_train.checkpoint import (
    LATEST,
    MANIFEST_FILE,
    Checkpointer,
    CheckpointError,
    CheckpointUnreadable,
    CorruptCheckpoint,
    SafeFileSystemReader,
    classify,
    deal_files,
    read_manifest,
)
from snoo_train.dist import init_distributed
from snoo_train.trainer import Trainer
from tests.conftest import TINY, entry_env, make_config
from tests.dist_utils import run_distributed

CKPT6, CKPT12 = "step_00000006", "step_00000012"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every byte of every file under root, except saves that never completed."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".incomplete" not in str(p)
    }


def manifest_matches_disk(ckpt: Path) -> None:
    """The manifest lists every file of the checkpoint with its true size and CRC32."""
    files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    on_disk = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.name != MANIFEST_FILE}
    assert set(files) == set(on_disk)
    for name, data in on_disk.items():
        assert files[name] == {"bytes": len(data), "crc32": zlib.crc32(data)}, name


def test_the_manifest_holds_what_was_written_without_reading_it_back(tmp_path, monkeypatch):
    import snoo_train.checkpoint as checkpoint

    def no_rereading(path, *a, **k):
        raise AssertionError(f"{path} was read back after the save")

    monkeypatch.setattr(checkpoint, "_crc32", no_rereading)
    tree = {"model": {"w": torch.randn(64, 32), "b": torch.randn(7)}, "trainer": {"step": 3}}
    Checkpointer(tmp_path).save(3, tree, {"tag": "t"})
    monkeypatch.undo()
    manifest_matches_disk(tmp_path / "step_00000003")

    sync = Checkpointer(tmp_path / "async", async_save=True)
    sync.save(4, tree, {})
    sync.close()
    manifest_matches_disk(tmp_path / "async" / "step_00000004")


def test_files_are_dealt_out_evenly_and_the_same_on_every_rank():
    files = {f"__{r}_0.distcp": {"bytes": 1000 + r} for r in range(4)}
    files |= {".metadata": {"bytes": 30}, "state.json": {"bytes": 20}}
    shares = deal_files(files, 4)
    assert sorted(n for share in shares for n in share) == sorted(files)  # each file once
    loads = [sum(e["bytes"] for e in share.values()) for share in shares]
    assert max(loads) <= 1003 + 30 and min(loads) >= 1000
    assert deal_files(files, 4) == shares
    assert deal_files(files, 1) == [files]


# -- failures while reading are not damage (one process) -------------------------------------------


@pytest.mark.parametrize(
    "error, kind",
    [
        (CorruptCheckpoint("x: a.distcp is corrupt (CRC32 mismatch)"), "damage"),
        (FileNotFoundError(errno.ENOENT, "No such file", "x/__0_0.distcp"), "damage"),
        (pickle.UnpicklingError("invalid load key"), "damage"),
        (EOFError("Ran out of input"), "damage"),
        (CheckpointError("the checkpoint was written for a different model"), "unfit"),
        (OSError(errno.EIO, "Input/output error", "x/__0_0.distcp"), "failure"),
        (TimeoutError(errno.ETIMEDOUT, "Connection timed out"), "failure"),
        (PermissionError(errno.EACCES, "Permission denied", "x/.metadata"), "failure"),
        (MemoryError(), "failure"),
        (torch.OutOfMemoryError("CUDA out of memory"), "failure"),
        (RuntimeError("gloo: connection closed by peer"), "failure"),
    ],
)
def test_only_proven_damage_is_damage(error, kind):
    assert classify(error)[0] == kind
    # DCP hands over every rank's failure wrapped: the first failing rank's decides.
    wrapped = CheckpointException("read", {1: (error, None)})
    assert classify(wrapped)[0] == kind


def _eio(self, *args, **kwargs):
    raise OSError(errno.EIO, "Input/output error", str(self.path))


def test_an_io_error_reading_the_newest_checkpoint_stops_and_rewinds_nothing(run_copy):
    """Before: the EIO made resume=auto fall back to step 6, retrain, and replace step 12."""
    before = snapshot(run_copy)
    runner = run_copy.parent / "eio_runner.py"
    runner.write_text(
        "import errno, sys\n"
        "from snoo_train.checkpoint import SafeFileSystemReader\n"
        "def read_data(self, plan, planner):\n"
        "    raise OSError(errno.EIO, 'Input/output error', str(self.path))\n"
        "SafeFileSystemReader.read_data = read_data\n"
        "from snoo_train.train import main\n"
        "sys.argv[0] = 'snoo_train.train'\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, str(runner), *TINY, f"hydra.run.dir={run_copy}", "trainer.max_steps=18"],
        cwd=run_copy.parent, env=entry_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert f"cannot read checkpoint {run_copy}/checkpoints/{CKPT12}" in line and "Input/output error" in line
    assert "skipping" not in proc.stderr
    after = snapshot(run_copy)
    assert {k: v for k, v in after.items() if k in before} == before  # every earlier file, byte for byte
    assert not any(k.startswith("checkpoints/step_") and k not in before for k in after)


def test_out_of_memory_while_loading_stops_and_rewinds_nothing(run_copy, monkeypatch):
    before = snapshot(run_copy)

    def out_of_memory(self, plan, planner):
        raise MemoryError()

    monkeypatch.setattr(SafeFileSystemReader, "read_data", out_of_memory)
    with pytest.raises(CheckpointUnreadable, match=rf"cannot read checkpoint \S*{CKPT12}: out of memory"):
        Trainer(make_config(run_copy), init_distributed("cpu"))
    assert snapshot(run_copy) == before


def test_damage_still_falls_back_and_names_it(run_copy, caplog):
    data = next((run_copy / "checkpoints" / CKPT12).glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(bytes(raw))
    trainer = Trainer(make_config(run_copy), init_distributed("cpu"))
    try:
        assert trainer.resumed_from.endswith(CKPT6)
        assert f"{CKPT12}: {data.name} is corrupt (CRC32 mismatch)" in caplog.text
    finally:
        trainer.checkpointer.close()
        trainer.metrics.close()


# -- two ranks: one rank's failure is every rank's ---------------------------------------------------


def _two_rank_scenarios(rank: int, world_size: int, root: str) -> None:
    import snoo_train.checkpoint as checkpoint

    run_dir = Path(root) / "run"
    ckpts = run_dir / "checkpoints"

    def trainer(*overrides: str) -> Trainer:
        cfg = make_config(run_dir, ["checkpoint.interval=4", "checkpoint.keep_latest=0", *overrides], world_size=2)
        return Trainer(cfg, init_distributed("cpu"))

    def same_everywhere(message: str) -> str:
        messages = [None] * world_size
        dist.all_gather_object(messages, message)
        assert messages == [message] * world_size, messages
        return message

    def fails_everywhere(error: type[Exception], make, patch=None) -> str:
        """Every rank raises `error` with the same message; rank 1 alone has the fault."""
        original = {}
        if patch is not None and rank == 1:
            obj, name, fn = patch
            original = {"obj": obj, "name": name, "value": getattr(obj, name)}
            setattr(obj, name, fn)
        try:
            with pytest.raises(error) as info:
                make()
        finally:
            if original:
                setattr(original["obj"], original["name"], original["value"])
        dist.barrier()
        return same_everywhere(str(info.value))

    # A clean run with checkpoints at 4 and 8; the manifest rank 0 merged holds both ranks' files.
    t = trainer("trainer.max_steps=8")
    t.fit()
    if rank == 0:
        for name in ("step_00000004", "step_00000008"):
            manifest_matches_disk(ckpts / name)
            assert {"__0_0.distcp", "__1_0.distcp"} <= set(read_manifest(ckpts / name))
    dist.barrier()
    before = snapshot(run_dir / "checkpoints")

    # An async save whose write fails on rank 1 only: every rank stops at the next save (the
    # last step's) with the same message, and `latest` still names step 8.
    def failing_write(self, plan, planner):
        if "step_00000012" in str(self.path):
            raise OSError(errno.EIO, "Input/output error", str(self.path))
        return original_write(self, plan, planner)

    original_write = checkpoint.ChecksummingWriter.write_data
    message = fails_everywhere(
        CheckpointError, lambda: trainer("trainer.max_steps=16", "checkpoint.async_save=true").fit(),
        (checkpoint.ChecksummingWriter, "write_data", failing_write),
    )  # fmt: skip
    assert "cannot write checkpoint step_00000012" in message and "step_00000008 is intact" in message
    assert (ckpts / LATEST).read_text().strip() == "step_00000008"
    assert snapshot(run_dir / "checkpoints") == before
    dist.barrier()

    # Reading the newest checkpoint fails on rank 1 only (EIO, then out of memory while
    # verifying its share): every rank stops, naming the checkpoint, the cause and the rank.
    message = fails_everywhere(
        CheckpointUnreadable, lambda: trainer("trainer.max_steps=16"), (SafeFileSystemReader, "read_data", _eio)
    )
    assert f"cannot read checkpoint {ckpts}/step_00000008: OSError: Input/output error" in message
    assert "(rank 1)" in message

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    message = fails_everywhere(CheckpointUnreadable, lambda: trainer("trainer.max_steps=16"), (checkpoint, "_crc32", out_of_memory))
    assert "step_00000008: out of memory" in message and "(rank 1)" in message
    assert snapshot(run_dir / "checkpoints") == before

    # Damage in the share rank 1 verifies: every rank falls back to step 4 together.
    dist.barrier()
    if rank == 0:
        share = deal_files(read_manifest(ckpts / "step_00000008"), world_size)[1]
        name = max(share, key=lambda n: share[n]["bytes"])
        path = ckpts / "step_00000008" / name
        path.write_bytes(path.read_bytes()[:-1])
    dist.barrier()
    t = trainer("trainer.max_steps=16")
    assert same_everywhere(t.resumed_from).endswith("step_00000004") and t.step == 4
    t.checkpointer.close()
    t.metrics.close()


@pytest.mark.slow
def test_two_ranks_take_every_checkpoint_decision_together(tmp_path):
    run_distributed(_two_rank_scenarios, 2, str(tmp_path))
