"""Bad input a user tries at the entry point, beyond the config values of test_configs.py: a sweep
with one bad point, wandb online with no key or no network, a key the chosen optimizer never
reads. Each is reported in one line; a refused run leaves every file that existed before
byte-identical.
(Two prepares into one store: tests/test_store.py.)"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from snoo_train.config import ConfigError, ignored_optim_keys, validate_config
from snoo_train.metrics import check_wandb_online
from tests.conftest import REPO, TINY, entry_env, run_entry, run_trainer, typed
from tests.dist_utils import free_port
from tests.test_faults import one_error_line, snapshot

HYDRA_OWN = (".hydra", "train.log")  # what Hydra itself writes at every start of a run directory


def saved_files(run_dir: Path) -> dict[str, bytes]:
    """Every file of the run directory but Hydra's own (rewritten by Hydra before the run starts)."""
    return {k: v for k, v in snapshot(run_dir).items() if Path(k).relative_to(run_dir).parts[0] not in HYDRA_OWN}


# -- a sweep with one bad point -------------------------------------------------------------------


def test_a_sweep_reports_its_bad_point_runs_the_others_and_fails_at_the_end(tmp_path):
    quick = [
        "model=llama_tiny", "trainer=quick", "trainer.max_steps=2", "trainer.batch_size=2", "data.seq_len=32",
        "data.max_documents=20", "trainer.eval_interval=0", "trainer.eval_batches=1", "checkpoint.interval=0",
    ]  # fmt: skip
    proc = run_entry(["-m", "optim.lr=0.001,-1,0.002", *quick, "hydra.sweep.dir=sweep"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: sweep point #1 (optim.lr=-1): optim.lr=-1.0 must be > 0",
        "error: 1 of 3 sweep points failed: #1 (optim.lr=-1)",
    ], proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    for good in ("0", "2"):  # the points before and after the bad one both trained
        assert (sweep / good / "summary.json").is_file() and (sweep / good / "metrics.jsonl").stat().st_size > 0
    assert {p.name for p in (sweep / "1").iterdir()} <= set(HYDRA_OWN)  # nothing of a run


# -- wandb online that cannot work ----------------------------------------------------------------


def wandb_env(home: Path, **extra: str) -> dict[str, str]:
    """wandb online with no credentials anywhere (environment, ~/.netrc, its settings)."""
    env = {k: v for k, v in entry_env().items() if not k.startswith("WANDB_") and k != "NETRC"}
    return dict(env, HOME=str(home), WANDB_CONFIG_DIR=str(home / "wandb"), **extra)


def test_wandb_online_with_no_server_is_refused_in_seconds_before_anything_is_built(run_copy, monkeypatch):
    # A closed local port as the server (no network here, and never an external address).
    closed = f"http://127.0.0.1:{free_port()}"
    env = wandb_env(run_copy.parent / "home", WANDB_API_KEY="0" * 40, WANDB_BASE_URL=closed)
    before = saved_files(run_copy)
    start = time.perf_counter()
    proc = run_entry(TINY + [f"hydra.run.dir={run_copy}", "trainer.resume=auto", "logging.wandb.mode=online"], run_copy.parent, env=env)
    elapsed = time.perf_counter() - start
    one_error_line(proc, f"logging.wandb.mode=online cannot reach the W&B server {closed}", "Connection refused", "logging.wandb.mode=offline")
    assert saved_files(run_copy) == before  # nothing rewritten, nothing left behind (no metrics.jsonl, no wandb/)
    assert elapsed < 60, f"took {elapsed:.1f} s (interpreter and torch start-up included) to refuse"
    # And with no API key: refused before any network, naming where the key is looked for.
    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", env["HOME"])
    monkeypatch.setenv("WANDB_CONFIG_DIR", env["WANDB_CONFIG_DIR"])
    monkeypatch.setenv("WANDB_BASE_URL", closed)
    cfg = typed(["logging.wandb.mode=online"])
    with pytest.raises(ConfigError, match=r"^logging\.wandb\.mode=online needs a W&B API key .* run `wandb login`"):
        check_wandb_online(cfg.logging.wandb)
    check_wandb_online(typed(["logging.wandb.mode=offline"]).logging.wandb)  # needs neither


# -- keys the chosen optimizer never reads --------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim=adamw", "optim.k=0"], "optim.k=0 is ignored: it applies to optim.outer=snoo only, and optim=adamw uses optim.outer=none"),
        (["optim=muon", "optim.outer_lr=0.5"], "optim.outer_lr=0.5 is ignored: it applies to optim.outer=snoo only, and optim=muon uses optim.outer=none"),
        (["optim=snoo_adamw", "optim.muon_lr=0.01"], "optim.muon_lr=0.01 is ignored: it applies to optim.inner=muon only, and optim=snoo_adamw uses optim.inner=adamw"),
        (["optim=snoo_adamw", "optim.gpa_mu_x=0.9"], "optim.gpa_mu_x=0.9 is ignored: it applies to optim.outer=gpa only, and optim=snoo_adamw uses optim.outer=snoo"),
        (["optim=gpa_adamw", "optim.ema_beta=0.3"], "optim.ema_beta=0.3 is ignored: it applies to optim.outer=ema_nesterov only, and optim=gpa_adamw uses optim.outer=gpa"),
        (["optim=adamw", "optim.outer_state_device=cpu"], "optim.outer_state_device='cpu' is ignored: it applies to optim.outer=snoo only, and optim=adamw uses optim.outer=none"),
        (["optim=adamw", "optim.muon_categories=[matrix]"], "optim.muon_categories=['matrix'] is ignored: it applies to optim.inner=muon only, and optim=adamw uses optim.inner=adamw"),
    ],
)
def test_a_key_the_chosen_optimizer_never_reads_is_named(overrides, message):
    cfg = typed(overrides)
    validate_config(cfg)  # a warning, not a refusal: a sweep over optimizers shares its overrides
    assert ignored_optim_keys(cfg.optim) == [message]


def test_the_optimizers_own_keys_and_the_schema_defaults_are_not_named():
    # Each group sets its own keys; a key at its schema default is not a request.
    for name in sorted(p.stem for p in (REPO / "snoo_train" / "configs" / "groups" / "optim").glob("*.yaml")):
        assert ignored_optim_keys(typed([f"optim={name}"]).optim) == [], name
    for overrides in (["optim=snoo_muon", "optim.muon_lr=0.01", "optim.k=7"], ["optim=adamw", "optim.k=20"]):
        assert ignored_optim_keys(typed(overrides).optim) == [], overrides


def test_a_run_warns_once_about_an_ignored_optimizer_key(tmp_path, caplog):
    overrides = ["optim=adamw", "optim.k=0", "trainer.max_steps=2", "trainer.eval_interval=0", "checkpoint.interval=0"]
    with caplog.at_level(logging.WARNING, logger="snoo_train"):
        trainer = run_trainer(tmp_path / "run", overrides)
    warnings = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    assert warnings == ["warning: optim.k=0 is ignored: it applies to optim.outer=snoo only, and optim=adamw uses optim.outer=none"]
    assert trainer.step == 2  # the run itself goes on, as asked
