"""`python -m snoo_train.analysis.plot` on hand-made runs with known crossings, and on a real 2-job Hydra
multirun sweep logged to offline wandb (the sweep's runs share a group; each wandb run holds
the metrics of its metrics.jsonl and the resolved config)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from snoo_train.analysis import plot
from snoo_train.analysis.runs import find_run_dirs, load_runs

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(path: Path, optim: dict, val: dict[int, float], tokens_per_step: int = 100) -> Path:
    """A run directory as the trainer writes it: metrics.jsonl and config.yaml."""
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for step, loss in val.items():
            tokens = step * tokens_per_step
            record = {"step": step, "loss": loss + 0.1, "tokens": tokens, "flops": 6.0 * tokens,
                      "grad_norm": 1.0 / step, "val_loss": loss}
            f.write(json.dumps(record) + "\n")
    config = {"model": {"name": "llama_tiny"}, "optim": optim, "run_dir": str(path)}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


@pytest.fixture()
def two_runs(tmp_path) -> tuple[Path, Path]:
    # Baseline ends at 2.0 (step 100). SNOO: 2.4 at step 60, 1.9 at step 85 -> reaches 2.0 at
    # step 60 + 25 * 0.4 / 0.5 = 80: speedup 100 / 80 = 1.25 in steps, tokens and FLOPs alike.
    base = make_run(tmp_path / "sweep" / "0", {"name": "adamw", "lr": 0.003, "outer": "none"},
                    {20: 3.0, 60: 2.5, 100: 2.0})
    snoo = make_run(tmp_path / "sweep" / "1", {"name": "snoo_adamw", "lr": 0.002, "outer": "snoo"},
                    {20: 3.1, 60: 2.4, 85: 1.9, 100: 1.8})
    return base, snoo


def speedup_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        if line.startswith(("optim=", "lr=")):
            cells = line.split()
            rows[cells[0]] = cells
    return rows


def test_plot_marks_the_crossing_and_prints_the_speedup(two_runs, tmp_path, capsys):
    out = tmp_path / "out.png"
    plot.main([str(tmp_path / "sweep"), "-o", str(out)])
    assert out.read_bytes()[:8] == PNG_MAGIC
    stdout = capsys.readouterr().out
    assert "baseline: optim=adamw lr=0.003" in stdout
    rows = speedup_rows(stdout)
    snoo_row = rows["optim=snoo_adamw"]
    assert snoo_row[-3:] == ["1.25x", "1.25x", "1.25x"]  # steps, tokens, FLOPs
    assert rows["optim=adamw"][-3:] == ["1.00x", "1.00x", "1.00x"]


def test_plot_against_another_baseline_and_not_reached(two_runs, tmp_path, capsys):
    base, snoo = two_runs
    plot.main([str(base), str(snoo), "--baseline", str(snoo), "--x", "steps", "-o",
               str(tmp_path / "o.png")])
    rows = speedup_rows(capsys.readouterr().out)
    # The adamw run never gets down to SNOO's final 1.8.
    assert rows["optim=adamw"][-2:] == ["not", "reached"]


def test_plot_any_logged_metric(two_runs, tmp_path, capsys):
    out = tmp_path / "gn.png"
    plot.main([str(tmp_path / "sweep"), "--metric", "grad_norm", "-o", str(out)])
    assert out.read_bytes()[:8] == PNG_MAGIC
    stdout = capsys.readouterr().out
    assert "final grad_norm 0.01" in stdout  # 1 / step 100; no speedup for a non-loss series
    with pytest.raises(SystemExit, match="no run logged 'nope'.*grad_norm"):
        plot.main([str(tmp_path / "sweep"), "--metric", "nope", "-o", str(out)])


def test_plot_a_list_valued_series_one_line_per_component(tmp_path, capsys):
    # An MoE run logs each layer's expert load as a list (one fraction per expert).
    run = make_run(tmp_path / "moe", {"name": "adamw"}, {10: 3.0, 20: 2.5})
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 30, "moe/layer0/load": [0.5, 0.3, 0.2]}) + "\n")
        f.write(json.dumps({"step": 40, "moe/layer0/load": [0.25, 0.25, 0.5]}) + "\n")
    out = tmp_path / "load.png"
    plot.main([str(run), "--metric", "moe/layer0/load", "--x", "steps", "-o", str(out)])
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "final moe/layer0/load [0.25, 0.25, 0.5]" in capsys.readouterr().out


def test_sweep_directory_lists_jobs_in_numeric_order(tmp_path):
    for n in (10, 2, 1):
        make_run(tmp_path / "s" / str(n), {"name": "adamw", "lr": 0.001 * n}, {10: 1.0})
    assert [p.name for p in find_run_dirs([tmp_path / "s"])] == ["1", "2", "10"]
    assert [r.label for r in load_runs([tmp_path / "s"])] == ["lr=0.001", "lr=0.002", "lr=0.01"]
    with pytest.raises(FileNotFoundError):
        find_run_dirs([tmp_path / "missing"])


# -- a real sweep --------------------------------------------------------------------------------


def read_wandb_records(path: Path) -> list:
    """The records of a wandb .wandb file: a LevelDB-style log (7-byte file header, 32 KiB
    blocks of chunks: crc32 u32, length u16, type u8 (1 full, 2 first, 3 middle, 4 last))
    of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history_and_run(run_dir: Path) -> tuple[list[dict], object]:
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history, run = [], None
    for record in read_wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                            for i in record.history.item})
        elif kind == "run":
            run = record.run
    return history, run


@pytest.mark.slow
def test_multirun_sweep_with_offline_wandb_then_plot(tmp_path):
    sweep = tmp_path / "sweep"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WANDB_MODE", None)
    cmd = [
        sys.executable, "-m", "snoo_train.train", "-m", "optim=adamw,snoo_adamw",
        "model=llama_tiny", "trainer=quick", "trainer.max_steps=20", "data.seq_len=64",
        "data.max_documents=200", "logging.wandb.mode=offline", f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    for job, optim in ((0, "adamw"), (1, "snoo_adamw")):
        run_dir = sweep / str(job)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 5, 10, 15, 20]
        assert f"name: {optim}" in (run_dir / "config.yaml").read_text()

        history, run = wandb_history_and_run(run_dir)
        # Every JSONL record is a wandb history row with the same values.
        assert len(history) == len(records)
        for row, record in zip(history, records):
            assert row["_step"] == record["step"]
            for key, value in record.items():
                if key != "step":
                    assert row[key] == pytest.approx(value), key
        # The resolved config, and the sweep as the group.
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        assert config["optim"]["name"] == optim and config["run_dir"] == str(run_dir)
        assert config["trainer"]["max_steps"] == 20
        assert run.run_group == str(sweep)
        assert run.display_name.startswith(f"{job} ") and f"optim={optim}" in run.display_name

    out = tmp_path / "sweep.png"
    proc = subprocess.run([sys.executable, "-m", "snoo_train.analysis.plot", str(sweep), "-o", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "baseline: optim=adamw" in proc.stdout
    rows = speedup_rows(proc.stdout)
    assert set(rows) == {"optim=adamw", "optim=snoo_adamw"}
