"""Export a checkpoint as a Hugging Face model directory.

    python -m snoo_train.export RUN_OR_CHECKPOINT OUT_DIR [--dtype bf16] [--weights params]

RUN_OR_CHECKPOINT is a run directory (its newest loadable checkpoint is used), a checkpoint
directory (`<run>/checkpoints`) or one checkpoint (`.../step_00000200`). OUT_DIR receives
`config.json`, `generation_config.json` and `model.safetensors` (plus the tokenizer when the
run used a Hugging Face one), loadable with `AutoModelForCausalLM.from_pretrained(OUT_DIR)`.

The weights written are the optimizer's evaluation sequence, the ones the run's validation
loss was measured at: SNOO's slow weights (GPA's and Schedule-Free's x), not the fast weights
the inner optimizer was last moving. `--weights params` writes the raw parameters instead.

Runs in one process on CPU whatever world size wrote the checkpoint: DCP reassembles the
shards. The run's config travels inside the checkpoint, so no data or Hydra set-up is needed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from snoo_train.checkpoint import (
    CheckpointError,
    load_state,
    read_state,
    replica_keys,
    resolve_checkpoint,
)
from snoo_train.config import Config, is_diloco

log = logging.getLogger("snoo_train.export")


def config_from_checkpoint(meta: dict[str, Any], path: Path) -> Config:
    if "config" not in meta:
        raise CheckpointError(f"{path}: the checkpoint does not record its run's config")
    merged = OmegaConf.merge(OmegaConf.structured(Config), meta["config"])
    return OmegaConf.to_object(merged)


def load_model(path: str | Path, *, weights: str = "eval") -> tuple[torch.nn.Module, Config]:
    """The checkpoint's model on CPU with the chosen weights in its parameters:
    `eval` (the optimizer's evaluation sequence: SNOO's slow weights) or `params`."""
    # Imported here: `python -m snoo_train.export --help` should not pay for transformers.
    from snoo_train.models import build_model, materialize
    from snoo_train.train import build_optimizer

    path = resolve_checkpoint(path)
    meta = read_state(path)["meta"]
    cfg = config_from_checkpoint(meta, path)
    vocab_size = meta["model"]["vocab_size"]
    model = build_model(cfg.model, vocab_size, seed=cfg.trainer.seed, device="meta")
    materialize(model, device="cpu", seed=cfg.trainer.seed)
    optimizer = build_optimizer(model, cfg.optim)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    tree: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    # Any world size and replica count: the tensors are resharded to this single process.
    # DiLoCo checkpoints keep each replica's state apart; the slow weights are the same in all.
    load_state(path, tree, rename=replica_keys(0) if is_diloco(cfg) else None)
    set_state_dict(model, optimizer, model_state_dict=tree["model"], optim_state_dict=tree["optim"])
    swap = getattr(optimizer, "eval_parameters", None) if weights == "eval" else None
    if swap is not None:
        # Copy the evaluation weights into the parameters for good: the optimizer is dropped.
        with swap():
            final = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(final)
    model.eval()
    return model, cfg


def export(path: str | Path, out_dir: str | Path, *, dtype: str = "fp32", weights: str = "eval") -> Path:
    model, cfg = load_model(path, weights=weights)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if cfg.data.tokenizer != "byte":
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(cfg.data.tokenizer).save_pretrained(out_dir)
    else:
        (out_dir / "TOKENIZER.txt").write_text(
            "Byte-level tokens: token id = byte value (0-255), 256 = end of document.\n"
            "See snoo_train/data/tokenizer.py (ByteTokenizer).\n"
        )
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m snoo_train.export",
        description="Write a checkpoint's evaluation weights as a Hugging Face model directory.",
    )
    parser.add_argument("checkpoint", help="run directory, checkpoints directory or one checkpoint")
    parser.add_argument("out_dir", help="output directory (config.json + model.safetensors)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--weights",
        choices=("eval", "params"),
        default="eval",
        help="eval: the optimizer's evaluation sequence (SNOO's slow weights); params: raw parameters",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export(args.checkpoint, args.out_dir, dtype=args.dtype, weights=args.weights)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"exported to {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
