"""The Hydra configs, shipped as package data: config.yaml here, the groups in groups/.

A package (not a bare directory) so that Hydra finds the groups as pkg://snoo_train.configs.groups
in a wheel install as well as in a checkout. Importing it registers the typed schema
(`base_config`, snoo_train.config.Config) that config.yaml merges every group into, so that
`initialize_config_dir(CONFIG_DIR)` + `compose("config")` works anywhere (benchmarks, tests).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from snoo_train.config import Config, ConfigError, PrepareJob, TokenizerJob

# An absolute path: Hydra resolves a relative one against the importing module, which differs
# between `python -m snoo_train.train` and the `snoo-train` console script.
CONFIG_DIR = str(Path(__file__).resolve().parent)

ConfigStore.instance().store(name="base_config", node=Config)


def _tokens_per_param_steps(tokens_per_param: float, *, _root_: DictConfig) -> int:
    """`trainer.max_steps: ${tokens_per_param_steps:20}`: the budget that gives every model of a
    sweep the same number of training tokens per non-embedding parameter (+experiment=scaling)."""
    from snoo_train.models.flops import steps_for_tokens_per_param

    model = OmegaConf.to_object(_root_.model)
    return steps_for_tokens_per_param(model, float(tokens_per_param), int(_root_.trainer.batch_size), int(_root_.data.seq_len))


if not OmegaConf.has_resolver("tokens_per_param_steps"):
    OmegaConf.register_new_resolver("tokens_per_param_steps", _tokens_per_param_steps)
# The data tools' schemas (prepare.yaml, train_tokenizer.yaml): the same data group, their own section.
ConfigStore.instance().store(name="base_prepare", node=PrepareJob)
ConfigStore.instance().store(name="base_train_tokenizer", node=TokenizerJob)


def reject_unknown_keys(dcfg: DictConfig, schema_class: type = Config) -> None:
    """Hydra lets `+trainer.max_step=5` add a key to a structured config; nothing would read
    it, so a typo would pass silently. Refuse every key the Config schema does not have."""

    def unknown(node: dict, schema: dict, prefix: str) -> list[str]:
        keys = []
        for key, value in node.items():
            if key not in schema:
                keys.append(f"{prefix}{key}")
            elif isinstance(value, dict) and isinstance(schema[key], dict):
                keys += unknown(value, schema[key], f"{prefix}{key}.")
        return keys

    schema = OmegaConf.to_container(OmegaConf.structured(schema_class))
    extra = unknown(OmegaConf.to_container(dcfg, resolve=False), schema, "")
    extra = [k for k in extra if k != "hydra"]
    if extra:
        raise ConfigError(f"unknown config key(s): {', '.join(extra)} (not in snoo_train.config.{schema_class.__name__})")


def accept_async_alias(args: list[str]) -> list[str]:
    """`async` is a Python keyword, so the config field is checkpoint.async_save; accept the
    short spelling `checkpoint.async=...` on the command line too."""
    return [re.sub(r"^(\+{0,2})checkpoint\.async=", r"\1checkpoint.async_save=", a) for a in args]


def compose_job(config_name: str, overrides: list[str], schema_class: type):
    """A data tool's config (prepare.yaml, train_tokenizer.yaml) from command-line overrides, as a
    typed object: the same groups and the same data keys as training, without a run directory.
    A bad override is a ConfigError (one line), not Hydra's traceback."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            dcfg = compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from err
    dcfg = OmegaConf.masked_copy(dcfg, [f.name for f in dataclasses.fields(schema_class)])
    reject_unknown_keys(dcfg, schema_class)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema_class), dcfg))


def job_help(doc: str, schema_class: type) -> str:
    """`--help` for a data tool: its module docstring, then every key it takes with its default."""
    defaults = OmegaConf.to_yaml(OmegaConf.structured(schema_class)).rstrip()
    return f"{doc.strip()}\n\nKeys (Hydra overrides, key=value; data=stdlib|local|hf picks a data preset):\n\n{defaults}\n"
