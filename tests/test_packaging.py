"""The wheel trains: built from the package's own files, installed into a scratch virtualenv (not
editable, not the checkout), then run from a directory that holds no configs.

The scratch venv borrows the test environment's installed dependencies through a .pth file, so
the test installs only our wheel (seconds), while `snoo_train` itself can come only from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "snoo_train" / "configs"
TINY_RUN = [
    "model=llama_tiny",
    "trainer=quick",
    "trainer.max_steps=3",
    "trainer.batch_size=4",
    "trainer.eval_interval=3",
    "trainer.eval_batches=1",
    "data.seq_len=32",
    "data.max_documents=50",
    "checkpoint.interval=0",
]


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    # No PYTHONPATH: nothing may reach the checkout's sources.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env={**clean, **env}
    )
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the files a source distribution holds, so the build leaves
    nothing in the checkout, and install it (no dependencies) into a fresh virtualenv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO / "snoo_train", src / "snoo_train", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src)], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("snoo_train-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    (venv_site,) = venv.glob("lib/python*/site-packages")
    # The test environment's dependencies (torch, hydra, ...), after the venv's own site-packages.
    (venv_site / "_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q", str(wheel)], cwd=tmp)
    return venv


def test_wheel_ships_every_config(wheel_venv):
    (wheel,) = wheel_venv.parent.glob("dist/snoo_train-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    want = {f"snoo_train/configs/{p.relative_to(CONFIGS)}" for p in CONFIGS.rglob("*.yaml")}
    assert want and shipped == want


def test_installed_wheel_trains_from_another_directory(wheel_venv, tmp_path):
    python = wheel_venv / "bin" / "python"
    where = run([str(python), "-c", "import snoo_train; print(snoo_train.__file__)"], cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(wheel_venv), where.stdout  # not the checkout

    # The module entry and the console script, from a directory with no configs/ in it.
    run([str(python), "-m", "snoo_train.train", *TINY_RUN, "hydra.run.dir=run_module"], cwd=tmp_path)
    run([str(wheel_venv / "bin" / "snoo-train"), *TINY_RUN, "hydra.run.dir=run_script"], cwd=tmp_path)
    for name in ("run_module", "run_script"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["steps"] == 3, summary


@pytest.mark.parametrize("name", ["my_model", "llama_tiny"])
def test_user_config_dir_adds_and_overrides_presets(wheel_venv, tmp_path, name):
    # A user's own config directory: a new preset beside the shipped ones, or one that replaces
    # a shipped preset of the same name.
    user = tmp_path / "my_configs" / "model"
    user.mkdir(parents=True)
    preset = (CONFIGS / "groups" / "model" / "llama_tiny.yaml").read_text()
    assert "num_layers: 2" in preset
    (user / f"{name}.yaml").write_text(
        preset.replace("name: llama_tiny", "name: mine").replace("num_layers: 2", "num_layers: 1")
    )
    args = [a for a in TINY_RUN if not a.startswith("model=")] + [f"model={name}", "hydra.run.dir=run"]
    run([str(wheel_venv / "bin" / "snoo-train"), "--config-dir", "my_configs", *args], cwd=tmp_path)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: mine" in saved and "num_layers: 1" in saved
