"""The Hydra configs, shipped as package data: config.yaml here, the groups in groups/.

A package (not a bare directory) so that Hydra finds the groups as pkg://snoo_train.configs.groups
in a wheel install as well as in a checkout. Importing it registers the typed schema
(`base_config`, snoo_train.config.Config) that config.yaml merges every group into, so that
`initialize_config_dir(CONFIG_DIR)` + `compose("config")` works anywhere (benchmarks, tests).
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from snoo_train.config import Config, ConfigError

# An absolute path: Hydra resolves a relative one against the importing module, which differs
# between `python -m snoo_train.train` and the `snoo-train` console script.
CONFIG_DIR = str(Path(__file__).resolve().parent)

ConfigStore.instance().store(name="base_config", node=Config)


def reject_unknown_keys(dcfg: DictConfig) -> None:
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

    schema = OmegaConf.to_container(OmegaConf.structured(Config))
    extra = unknown(OmegaConf.to_container(dcfg, resolve=False), schema, "")
    if extra:
        raise ConfigError(f"unknown config key(s): {', '.join(extra)} (not in snoo_train.config.Config)")


def accept_async_alias(args: list[str]) -> list[str]:
    """`async` is a Python keyword, so the config field is checkpoint.async_save; accept the
    short spelling `checkpoint.async=...` on the command line too."""
    return [re.sub(r"^(\+{0,2})checkpoint\.async=", r"\1checkpoint.async_save=", a) for a in args]
