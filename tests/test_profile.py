"""trainer.profile (issue 14 part 7): a Chrome/Perfetto trace of the chosen steps on rank 0."""

from __future__ import annotations

import json

import pytest

from snoo_train.config import ConfigError
from snoo_train.dist import init_distributed
from snoo_train.trainer import Trainer
from tests.conftest import make_config

QUICK_RUN = ["trainer.max_steps=4", "trainer.eval_interval=0", "checkpoint.interval=0", "optim=adamw"]


def test_a_profiled_run_writes_a_trace_of_exactly_the_chosen_steps(tmp_path):
    run_dir = tmp_path / "run"
    profile = ["trainer.profile.enabled=true", "trainer.profile.start_step=2", "trainer.profile.num_steps=2"]
    Trainer(make_config(run_dir, QUICK_RUN + profile), init_distributed("cpu")).fit()

    (trace,) = (run_dir / "profile").iterdir()
    assert trace.name == "trace_steps_2-3_rank0.json"
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("step ")}
    assert steps == {"step 2", "step 3"}
    # The steps' own work is in the trace: the forward's matmuls and the optimizer's update.
    names = {e.get("name") for e in events}
    assert "aten::mm" in names or "aten::addmm" in names
    assert any(str(n).startswith("Optimizer.step#AdamW") for n in names)


def test_no_profile_unless_asked(tmp_path):
    Trainer(make_config(tmp_path / "run", QUICK_RUN), init_distributed("cpu")).fit()
    assert not (tmp_path / "run" / "profile").exists()


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.profile.start_step=0", "trainer.profile.start_step"),
        ("trainer.profile.num_steps=0", "trainer.profile.num_steps"),
    ],
)
def test_bad_profile_steps_are_refused(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        make_config(tmp_path / "run", ["trainer.profile.enabled=true", override])


def test_a_memory_snapshot_on_cpu_is_refused_naming_the_key(tmp_path):
    snapshot = ["trainer.profile.enabled=true", "trainer.profile.memory_snapshot=true"]
    with pytest.raises(ConfigError, match="trainer.profile.memory_snapshot=true records the CUDA allocator"):
        make_config(tmp_path / "run", [*snapshot, "trainer.device=cpu"])
    # trainer.device=auto on a machine without a GPU: refused when the trainer is built.
    cfg = make_config(tmp_path / "run", snapshot)
    with pytest.raises(ConfigError, match="trainer.profile.memory_snapshot=true .* this run is on cpu"):
        Trainer(cfg, init_distributed("cpu"))
    assert not (tmp_path / "run").exists()
