"""Warm start from a Hugging Face checkpoint (`model.from_pretrained=PATH_OR_HUB_ID`).

The model's shape comes from the checkpoint's config.json (`pretrained_model_config`), and its
safetensors are read straight into the (possibly sharded) parameters (`load_pretrained`): each
rank reads, per tensor, only the box of rows and columns that covers its own shard
(`safe_open(...).get_slice`), so no rank ever holds the full model.

Why not DCP's HuggingFaceStorageReader: transformers 5 saves Mixtral's experts in the original
per-expert layout (`block_sparse_moe.experts.{e}.w1/w2/w3`) while the model holds them fused
(`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]); the reader cannot fuse.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from snoo_train.config import ConfigError, ModelConfig
from snoo_train.models.shard_init import local_indices

log = logging.getLogger("snoo_train")

FAMILY_OF_MODEL_TYPE = {"llama": "llama", "mixtral": "moe"}
# ModelConfig key <- config.json field (both families); Mixtral adds its experts' fields.
_FIELDS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "max_seq_len": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
    "vocab_size": "vocab_size",
}
_MOE_FIELDS = {
    "num_experts": "num_local_experts",
    "num_experts_per_tok": "num_experts_per_tok",
    "moe_intermediate_size": "intermediate_size",
    "router_aux_loss_coef": "router_aux_loss_coef",
}


# Any of these beside config.json: the checkpoint carries a tokenizer AutoTokenizer can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_pretrained(name_or_path: str) -> Path:
    """The local directory of `model.from_pretrained`: a directory as given, or a hub id from
    the hub cache, else from the hub when it answers (fails in seconds without a network)."""
    from snoo_train.data.hub import hub_offline, hub_unreachable

    key = f"model.from_pretrained={name_or_path!r}"
    path = Path(os.path.expanduser(name_or_path))
    if name_or_path.startswith(("/", ".", "~")) or path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: no config.json in that directory")
        return path
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES, "special_tokens_map.json", "merges.txt"]
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache: try the hub below
        pass
    if hub_offline():
        raise ConfigError(f"{key}: not in the HF cache and HF_HUB_OFFLINE is set")
    if unreachable := hub_unreachable():
        raise ConfigError(f"{key}: not in the HF cache, not a directory, and the hub {unreachable}")
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - one line naming the key
        raise ConfigError(f"{key}: not found on the hub nor locally ({str(e).splitlines()[0][:200]})") from e


def _checked_hf_config(hf: dict[str, Any], key: str) -> str:
    # Refuse what our builders would silently build differently.
    model_type = hf.get("model_type")
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise ConfigError(f"{key}: model_type {model_type!r} is not supported (llama or mixtral)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(hf.get("attention_bias")),
        "mlp_bias": bool(hf.get("mlp_bias")),
        "rope_parameters": rope.get("rope_type", rope.get("type", "default")) != "default",
        "head_dim": hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]),
        "sliding_window": hf.get("sliding_window") is not None,
    }
    for field, bad in unsupported.items():
        if bad:
            raise ConfigError(f"{key}: config.json's {field}={hf.get(field)!r} is not supported")
    return FAMILY_OF_MODEL_TYPE[model_type]


def pretrained_model_config(cfg: ModelConfig, reference: ModelConfig) -> ModelConfig:
    """`cfg` with every field config.json covers taken from the checkpoint.

    `reference` is the preset `cfg` was composed from: a field of `cfg` that differs from it was
    set explicitly, and must then equal the checkpoint's value (ConfigError naming the key).
    Fields config.json does not cover keep ours.
    """
    key = f"model.from_pretrained={cfg.from_pretrained!r}"
    hf = json.loads((resolve_pretrained(cfg.from_pretrained) / "config.json").read_text())
    values: dict[str, Any] = {"family": _checked_hf_config(hf, key)}
    fields = {**_FIELDS, **(_MOE_FIELDS if values["family"] == "moe" else {})}
    values.update({ours: hf[theirs] for ours, theirs in fields.items() if theirs in hf})
    values.setdefault("num_kv_heads", hf["num_attention_heads"])
    values["tie_embeddings"] = bool(hf.get("tie_word_embeddings", True))
    rope = hf.get("rope_parameters") or {}
    if "rope_theta" in rope or "rope_theta" in hf:
        values["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta")))
    for name, value in values.items():
        ours = getattr(cfg, name)
        if ours != getattr(reference, name) and ours != value:
            raise ConfigError(
                f"model.{name}={ours!r} contradicts {key} (config.json: {value!r}); drop the override"
            )
    return dataclasses.replace(cfg, **values)


class _Checkpoint:
    """The safetensors files of a directory, by tensor name. Each read opens its file anew: the
    pages a read maps are released with it, so a rank's resident memory stays near its shard."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
        else:
            single = directory / "model.safetensors"
            if not single.is_file():
                raise ConfigError(f"model.from_pretrained: no model.safetensors in {directory}")
            with safe_open(single, "pt") as f:
                files = {name: "model.safetensors" for name in f.keys()}
        self.directory, self.files, self._safe_open = directory, files, safe_open

    def check(self, needed: dict[str, torch.Size]) -> None:
        """Every file opens (its header parses and its data is as long as the header says) and
        holds each needed tensor with its shape: headers only, no tensor is read."""
        by_file: dict[str, list[str]] = {}
        for name in needed:
            if name not in self.files:
                raise ConfigError(f"model.from_pretrained: tensor {name} is missing from {self.directory}")
            by_file.setdefault(self.files[name], []).append(name)
        for file, names in sorted(by_file.items()):
            with self._safe_open(self.directory / file, "pt") as f:
                for name in names:
                    _check_shape(name, f.get_slice(name).get_shape(), needed[name])

    def read(self, name: str, shape: torch.Size, box: tuple[slice, ...]) -> torch.Tensor:
        """The `box` of tensor `name`, after checking its shape is `shape`."""
        with self._safe_open(self.directory / self.files[name], "pt") as f:
            part = f.get_slice(name)
            _check_shape(name, part.get_shape(), shape)
            return part[box].clone()


def _check_shape(name: str, theirs: Any, ours: torch.Size) -> None:
    if tuple(theirs) != tuple(ours):
        raise ConfigError(
            f"model.from_pretrained: tensor {name} is {list(theirs)} in the checkpoint, "
            f"{list(ours)} in the model built from its config"
        )


def _checkpoint_name(name: str, files: dict[str, str]) -> str:
    """The checkpoint's name for parameter `name` (canonical): itself, or Mixtral's original
    (`block_sparse_moe` for transformers' `mlp`) when the checkpoint does not hold it."""
    if name in files or ".mlp." not in name:
        return name
    return name.replace(".mlp.", ".block_sparse_moe.")


def _needed(name: str, shape: torch.Size, files: dict[str, str]) -> dict[str, torch.Size]:
    """The checkpoint tensors parameter `name` (canonical) is read from, with their shapes:
    itself, or under Mixtral's original names (per-expert w1/w3 fused into gate_up, w2 down)."""
    original = _checkpoint_name(name, files)
    if ".block_sparse_moe.experts." not in original:
        return {original if original in files else name: shape}
    prefix = original.removesuffix("gate_up_proj").removesuffix("down_proj")
    if name.endswith("down_proj"):
        return {f"{prefix}{e}.w2.weight": shape[1:] for e in range(shape[0])}
    half = torch.Size([shape[1] // 2, shape[2]])
    return {f"{prefix}{e}.{w}.weight": half for e in range(shape[0]) for w in ("w1", "w3")}


def _read(ckpt: _Checkpoint, name: str, shape: torch.Size, index: list[torch.Tensor]) -> torch.Tensor:
    """The elements at `index` (global indices per dim) of checkpoint tensor `name`: reads the
    box from each dimension's first to last index, then keeps the indexed ones."""
    if name not in ckpt.files:
        raise ConfigError(f"model.from_pretrained: tensor {name} is missing from {ckpt.directory}")
    box = ckpt.read(name, shape, tuple(slice(int(i.min()), int(i.max()) + 1) for i in index))
    for dim, i in enumerate(index):
        if i.numel() != box.shape[dim] or bool((i.diff() != 1).any()):  # not a plain range
            box = box.index_select(dim, i - i.min())
    return box


def _read_experts(ckpt: _Checkpoint, name: str, shape: torch.Size, index: list[torch.Tensor]) -> torch.Tensor:
    # Fused [E, 2I, H] gate_up (w1 then w3 per expert) or [E, H, I] down (w2), from per-expert tensors.
    prefix = name.removesuffix("gate_up_proj").removesuffix("down_proj")
    rows, cols = index[1], index[2]
    experts = []
    for e in index[0].tolist():
        if name.endswith("down_proj"):
            experts.append(_read(ckpt, f"{prefix}{e}.w2.weight", shape[1:], [rows, cols]))
            continue
        half = shape[1] // 2
        out = torch.empty(rows.numel(), cols.numel())
        for w, mask, offset in (("w1", rows < half, 0), ("w3", rows >= half, half)):
            if mask.any():
                out[mask] = _read(ckpt, f"{prefix}{e}.{w}.weight", torch.Size([half, shape[2]]), [rows[mask] - offset, cols])
        experts.append(out)
    return torch.stack(experts)


@torch.no_grad()
def load_pretrained(model: nn.Module, directory: Path, canonical: Callable[[str], str]) -> None:
    """Copy the checkpoint's tensors into `model`'s materialized parameters (plain or DTensor,
    any placement): each rank reads only its own shard's box. A tied head is not read (it is
    the embedding); buffers keep their values (the routing bias starts at zero). `canonical`
    strips the wrappers' prefixes from parameter names.

    Reads under agreement: every rank first checks that each file it needs opens and holds the
    needed tensors (headers only), and a failure while reading is caught; both are then agreed
    (dist.agree_on_failure, one gather each): a shard missing or corrupt on one node is the same
    ConfigError on every rank, not one rank's error and the others' collective timeout."""
    from snoo_train.dist import agree_on_failure

    params = [(canonical(name), param) for name, param in model.named_parameters()]
    ckpt, failure = None, None
    try:
        ckpt = _Checkpoint(directory)
        ckpt.check({k: v for name, p in params for k, v in _needed(name, p.shape, ckpt.files).items()})
    except Exception as e:  # noqa: BLE001 - any unreadable file: agreed below, then raised everywhere
        failure = _unreadable(e, directory)
    agree_on_failure(failure)
    try:
        for name, param in params:
            _load_param(ckpt, name, param)
    except Exception as e:  # noqa: BLE001 - as above: no rank leaves the others waiting
        failure = _unreadable(e, directory)
    agree_on_failure(failure)


def _unreadable(error: Exception, directory: Path) -> ConfigError:
    if isinstance(error, ConfigError):
        return error
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return ConfigError(f"model.from_pretrained: cannot read the checkpoint in {directory}: {detail}")


def _load_param(ckpt: _Checkpoint, name: str, param: torch.Tensor) -> None:
    index = local_indices(param)
    if index is None or any(i.numel() == 0 for i in index):
        return
    local = param.to_local() if isinstance(param, DTensor) else param
    name = _checkpoint_name(name, ckpt.files)
    read = _read_experts if ".block_sparse_moe.experts." in name else _read
    values = read(ckpt, name, param.shape, index)
    local.copy_(values.reshape(local.shape).to(local.dtype))


def choose_tokenizer(cfg: Any) -> None:
    """Set data.tokenizer=null to the run's own tokenizer, with one log line saying which and
    why: `model.from_pretrained` when its directory (or hub snapshot) holds tokenizer files, else
    the source's usual one. Token stores keep null (the store's). A value set already wins, so
    this is idempotent, and the run's config (and its checkpoints) record the tokenizer taken."""
    from snoo_train.data.build import fallback_tokenizer
    from snoo_train.dist import env_rank

    d, pretrained = cfg.data, cfg.model.from_pretrained
    if d.tokenizer is not None or d.source == "prepared":
        return
    if pretrained and any((resolve_pretrained(pretrained) / f).is_file() for f in TOKENIZER_FILES):
        d.tokenizer, why = pretrained, "model.from_pretrained holds a tokenizer"
    else:
        d.tokenizer = fallback_tokenizer(d)
        why = f"model.from_pretrained={pretrained!r} holds no tokenizer files" if pretrained else "no model.from_pretrained"
        why += f"; the default for data.source={d.source}"
    if env_rank() == 0:
        log.info("data.tokenizer=%s (%s; set data.tokenizer to choose another)", d.tokenizer, why)


def apply_pretrained(cfg: Any, world_size: int) -> None:
    """validate_config, after taking the model's shape from `model.from_pretrained`'s
    config.json into `cfg.model` (so TP and EP divisibility are checked against the checkpoint's
    shape, not the preset's), and data.tokenizer chosen (choose_tokenizer). Idempotent: the entry point and the Trainer both call it."""
    from snoo_train.config import validate_config
    from snoo_train.models.presets import PRESETS

    if cfg.model.from_pretrained:
        reference = PRESETS.get(cfg.model.name, ModelConfig())
        cfg.model = pretrained_model_config(cfg.model, reference)
    choose_tokenizer(cfg)
    validate_config(cfg, world_size=world_size)
