"""Every YAML in snoo_train/configs/ composes against the typed schema; bad keys, types and values fail fast."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch.distributed as dist

from snoo_train.config import Config, ConfigError, validate_config
from snoo_train.configs import (
    reject_unknown_keys,  # importing it registers the `base_config` schema
)
from snoo_train.train import run
from tests.conftest import compose_config, run_entry, typed

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "snoo_train" / "configs"  # config.yaml; the groups are in groups/
GROUPS = ("model", "optim", "data", "trainer", "logging", "parallel")


def group_options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((CONFIGS / "groups" / g).glob("*.yaml"))]


def test_every_group_has_options():
    options = group_options()
    for group in GROUPS:
        assert any(g == group for g, _ in options), f"configs/groups/{group}/ has no YAML"
    assert ("optim", "adamw") in options and ("optim", "snoo_adamw") in options


@pytest.mark.parametrize("group,option", group_options())
def test_every_option_composes_into_the_schema(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "local"):
        overrides.append("data.files=[corpus.txt]")  # local has no files on purpose
    if (group, option) == ("data", "prepared"):
        overrides.append("data.path=tokens/corpus")  # nor does prepared a store
    cfg = typed(overrides)
    assert isinstance(cfg, Config)
    validate_config(cfg)


def test_defaults_validate_and_pick_the_make_train_setup():
    cfg = typed()
    validate_config(cfg)
    assert cfg.model.name == "llama_small"
    assert cfg.data.source == "stdlib"
    assert cfg.optim.name == "snoo_adamw" and cfg.optim.outer == "snoo"
    assert cfg.logging.wandb.mode == "disabled"


def test_model_yaml_names_match_file_names():
    paths = sorted((CONFIGS / "groups" / "model").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        assert typed([f"model={path.stem}"]).model.name == path.stem


def test_hydra_run_dir_defaults():
    hydra_cfg = compose_config(hydra=True).hydra
    assert hydra_cfg.run.dir.startswith("runs/")
    assert hydra_cfg.sweep.dir.startswith("multirun/")
    assert hydra_cfg.job.chdir is False


def test_adamw_has_no_outer_step_and_snoo_does():
    assert typed(["optim=adamw"]).optim.outer == "none"
    snoo = typed(["optim=snoo_adamw", "optim.k=7"]).optim
    assert (snoo.outer, snoo.k) == ("snoo", 7)
    # SNOO amplifies the pseudo-gradient, so its inner lr starts below the AdamW baseline.
    assert snoo.lr < typed(["optim=adamw"]).optim.lr


def test_user_facing_keys_override():
    cfg = typed(
        [
            "trainer.max_steps=7",
            "trainer.batch_size=32",
            "trainer.grad_accum=2",
            "trainer.log_interval=3",
            "trainer.eval_interval=5",
            "trainer.seed=4",
            "data.seq_len=128",
            "optim.lr=1e-3",
            "optim.k=10",
            "optim.outer_lr=0.5",
            "optim.outer_momentum=0.9",
            "optim.nesterov=false",
        ]
    )
    t, o = cfg.trainer, cfg.optim
    assert (t.max_steps, t.batch_size, t.grad_accum, t.log_interval, t.eval_interval, t.seed) == (
        7,
        32,
        2,
        3,
        5,
        4,
    )
    assert cfg.data.seq_len == 128
    assert (o.lr, o.k, o.outer_lr, o.outer_momentum, o.nesterov) == (1e-3, 10, 0.5, 0.9, False)


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.max_step=5", "trainer.max_step"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("optim.nesterov=maybe", "optim.nesterov"),
        ("data.max_documents=many", "data.max_documents"),
    ],
)
def test_bad_key_or_type_fails_at_composition(override, key):
    with pytest.raises(Exception) as info:
        typed([override])
    assert key in str(info.value)


def test_added_keys_are_rejected():
    # `+key=value` gets past Hydra's struct check; the entry point refuses it.
    with pytest.raises(ConfigError, match=r"trainer\.max_step\b"):
        reject_unknown_keys(compose_config(["+trainer.max_step=5"]))
    reject_unknown_keys(compose_config())


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["optim.lr=-1"], "optim.lr"),
        (["optim.outer_momentum=1.0"], "optim.outer_momentum"),
        (["optim.k=0"], "optim.k"),
        (["optim.outer=lookahead"], "optim.outer"),
        (["trainer.lr_schedule=linear"], "trainer.lr_schedule"),
        (["trainer.max_steps=-1"], "trainer.max_steps"),
        (["trainer.max_steps=0", "trainer.profile.enabled=true"], "trainer.profile.enabled"),
        (["data.seq_len=4096"], "data.seq_len"),
        (["data.source=s3"], "data.source"),
        (["data=hf", "data.path=null"], "data.path"),
        (["data=local"], "data.files"),
        (["logging.wandb.mode=cloud"], "logging.wandb.mode"),
    ],
)
def test_validate_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(typed(overrides))


def test_batch_size_must_divide_over_ranks_and_micro_batches():
    cfg = typed(["trainer.batch_size=12", "trainer.grad_accum=2"])
    validate_config(cfg, world_size=2)
    with pytest.raises(ConfigError, match=r"trainer\.batch_size"):
        validate_config(cfg, world_size=4)


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.max_step=5", "trainer.max_step"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("optim.lr=-1", "optim.lr"),
    ],
)
def test_entry_point_fails_fast_naming_the_key(tmp_path, override, key):
    start = time.perf_counter()
    proc = run_entry([override], cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert key in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # No data, model or run directory was built: only start-up cost.
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("metrics.jsonl"))
    assert elapsed < 30, f"took {elapsed:.1f} s to reject a bad override"


def test_replicas_not_dividing_the_world_is_one_clear_error(tmp_path, monkeypatch):
    # What every rank of `torchrun --nproc_per_node=4 ... parallel.replicas=3` does: validate
    # before joining any process group; the entry point prints a ConfigError as one line
    # (`error: ...`, tested end to end in test_configs.py).
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = Config()
    cfg.parallel.replicas = 3
    with pytest.raises(ConfigError) as info:
        run(cfg, str(tmp_path / "run"))
    message = str(info.value)
    assert message.startswith("parallel.replicas=3") and "world size 4" in message and "\n" not in message
    assert not dist.is_initialized() and not (tmp_path / "run").exists()
