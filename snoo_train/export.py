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
from snoo_train.data.errors import DataError

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
    from snoo_train.optim.build import build_optimizer

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


class ExportError(RuntimeError):
    """The output directory cannot take the export as asked."""


# What an export writes: the only files `--overwrite` removes from an existing directory, so
# that no earlier model's shards or tokenizer stay beside the new model. Anything else is left.
OWNED_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "TOKENIZER.txt",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
)
OWNED_PATTERNS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")
BYTE_TOKENIZER_NOTE = (
    "Byte-level tokens: token id = byte value (0-255), 256 = end of document. There is no\n"
    "Hugging Face tokenizer for them: encode text as UTF-8 bytes (snoo_train/data/tokenizer.py,\n"
    "ByteTokenizer).\n"
)


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory unless `overwrite`; then clear what we own."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file, not a directory")
    if not out_dir.exists():
        return
    entries = sorted(p.name for p in out_dir.iterdir())
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise ExportError(
            f"{out_dir} is not empty ({shown}); pass --overwrite to replace an earlier export "
            "there (only the model and tokenizer files an export writes are removed), or choose "
            "a new directory"
        )
    owned = {out_dir / name for name in OWNED_FILES}
    for pattern in OWNED_PATTERNS:
        owned.update(out_dir.glob(pattern))
    for p in owned:
        if p.is_file() or p.is_symlink():
            p.unlink()


def export(
    path: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    weights: str = "eval",
    overwrite: bool = False,
) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():  # before the slow part
        raise ExportError(f"{out_dir} is a file, not a directory")
    model, cfg = load_model(path, weights=weights)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    # The tokenizer the run trained with, loaded before anything is written (it may be missing).
    from snoo_train.data.build import training_tokenizer_name

    tokenizer, tokenizer_name = None, training_tokenizer_name(cfg.data)
    if tokenizer_name != "byte":
        from snoo_train.data.tokenizer import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(tokenizer_name)
    prepare_out_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
        log.info("tokenizer: %s", tokenizer_name)
    else:
        (out_dir / "TOKENIZER.txt").write_text(BYTE_TOKENIZER_NOTE)
        log.info("tokenizer: byte-level, none to write (see TOKENIZER.txt)")
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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="export into a non-empty directory, replacing the model and tokenizer files there",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export(
            args.checkpoint, args.out_dir, dtype=args.dtype, weights=args.weights, overwrite=args.overwrite
        )
    except (CheckpointError, ExportError, DataError, FileNotFoundError) as e:  # the last: a tokenizer directory
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        print(f"error: cannot write {e.filename or args.out_dir}: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    print(f"exported to {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
