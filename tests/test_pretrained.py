"""Warm start from a Hugging Face checkpoint (model.from_pretrained) and the exact round trip:
save_pretrained -> from_pretrained -> checkpoint -> `python -m snoo_train.export` is the same
model, on one process and sharded. The reference is transformers' own model loaded from the
directory the test wrote, never our loader."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from snoo_train.config import ConfigError
from snoo_train.export import main as export_main
from tests.conftest import make_config, run_trainer
from tests.dist_utils import run_distributed

# Not a multiple of 64 (taken unpadded), even (split over 2 tp ranks), above the byte tokenizer's 257.
VOCAB = 262
SHAPE = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
)


def _save(model: torch.nn.Module, path: Path) -> Path:
    # Not the init's own statistics: every tensor, norms included, is a random draw.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    llama = LlamaForCausalLM(LlamaConfig(intermediate_size=96, tie_word_embeddings=True, **SHAPE))
    mixtral = MixtralForCausalLM(
        MixtralConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                      tie_word_embeddings=False, **SHAPE)
    )
    return {"llama": _save(llama, root / "llama"), "moe": _save(mixtral, root / "mixtral")}


def _overrides(hf: Path, family: str) -> list[str]:
    preset = "moe_tiny" if family == "moe" else "llama_tiny"
    return [f"model={preset}", f"model.from_pretrained={hf}", "data.seq_len=32", "checkpoint.interval=0"]


def _build_and_save(run_dir: str, overrides: list[str], world_size: int = 1) -> None:
    """What the entry point builds for `overrides` (trained 0 steps), saved as a checkpoint."""
    from snoo_train.dist import init_distributed
    from snoo_train.trainer import Trainer

    cfg = make_config(Path(run_dir), overrides, world_size=world_size)
    p = cfg.parallel
    trainer = Trainer(cfg, init_distributed("cpu", replicas=p.replicas, tp=p.tp, ep=p.ep))
    trainer.save_checkpoint(blocking=True)
    trainer.checkpointer.close()
    trainer.loader.close()
    trainer.metrics.close()


def _layouts_worker(rank: int, world_size: int, root: str, runs: dict[str, list[str]]) -> None:
    for name, overrides in runs.items():
        _build_and_save(str(Path(root, name, "run")), overrides, world_size=dist.get_world_size())
        dist.barrier()


def _assert_round_trip(hf: Path, run_dir: Path, out: Path) -> None:
    export_main([str(run_dir), str(out)])
    want, got = load_file(hf / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    reference = AutoModelForCausalLM.from_pretrained(hf).eval()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, want_logits = exported(ids).logits, reference(ids).logits
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)
    # The figures for the docs (pytest -s shows them).
    weights = max((got[n] - t).abs().max().item() for n, t in want.items())
    print(f"\nround trip {run_dir.parent.name}: max |weight diff| {weights:.1e}, max |logit diff| "
          f"{(logits - want_logits).abs().max().item():.1e}")


@pytest.mark.parametrize("family", ["llama", "moe"])
def test_round_trip_one_process(hf_dirs, tmp_path, family):
    _build_and_save(str(tmp_path / "run"), _overrides(hf_dirs[family], family))
    _assert_round_trip(hf_dirs[family], tmp_path / "run", tmp_path / "out")


# name -> (family, layout overrides), each saved by 4 ranks.
SHARDED = {
    "fsdp4": ("llama", []),
    "fsdp2_tp2": ("llama", ["parallel.tp=2"]),
    "ep2_fsdp2": ("moe", ["parallel.ep=2"]),
}


@pytest.fixture(scope="module")
def sharded_runs(hf_dirs, tmp_path_factory) -> Path:
    """Every SHARDED layout saved by one 4-rank group (one start-up instead of one per layout)."""
    root = tmp_path_factory.mktemp("sharded")
    runs = {name: _overrides(hf_dirs[family], family) + layout for name, (family, layout) in SHARDED.items()}
    run_distributed(_layouts_worker, 4, str(root), runs)
    return root


@pytest.mark.parametrize("layout", list(SHARDED))
def test_round_trip_sharded(hf_dirs, sharded_runs, tmp_path, layout):
    family = SHARDED[layout][0]
    _assert_round_trip(hf_dirs[family], sharded_runs / layout / "run", tmp_path / "out")


def test_config_comes_from_config_json(hf_dirs, tmp_path):
    cfg = make_config(tmp_path, _overrides(hf_dirs["moe"], "moe"))
    from snoo_train.models.pretrained import apply_pretrained

    apply_pretrained(cfg, 1)
    m = cfg.model
    assert (m.family, m.hidden_size, m.num_layers, m.num_experts, m.moe_intermediate_size) == ("moe", 64, 2, 4, 32)
    assert (m.vocab_size, m.tie_embeddings, m.max_seq_len) == (VOCAB, False, 128)


def test_contradicting_override_is_refused(hf_dirs, tmp_path):
    with pytest.raises(ConfigError, match="model.hidden_size=128 contradicts model.from_pretrained"):
        run_trainer(tmp_path, _overrides(hf_dirs["llama"], "llama") + ["model.hidden_size=128"])


def test_shape_mismatch_names_the_tensor(hf_dirs, tmp_path):
    from snoo_train.models.build import build_model, materialize
    from snoo_train.models.pretrained import apply_pretrained

    cfg = make_config(tmp_path, _overrides(hf_dirs["llama"], "llama"))
    apply_pretrained(cfg, 1)
    cfg.model.intermediate_size = 48  # as if config.json and the weights disagreed
    model = build_model(cfg.model, 257, seed=0, device="meta")
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.gate_proj.weight is \[96, 64\] in the checkpoint"):
        materialize(model, device="cpu", seed=0, pretrained=cfg.model.from_pretrained)


def test_tokenizer_larger_than_the_vocabulary_is_refused(hf_dirs, tmp_path):
    overrides = _overrides(hf_dirs["llama"], "llama")
    small = tmp_path / "small"
    LlamaForCausalLM(LlamaConfig(intermediate_size=96, **{**SHAPE, "vocab_size": 200})).save_pretrained(small)
    overrides[1] = f"model.from_pretrained={small}"
    with pytest.raises(ConfigError, match="the tokenizer has 257 ids but model.from_pretrained"):
        run_trainer(tmp_path / "run", overrides)


def test_missing_directory_and_offline_hub_fail_fast(tmp_path, monkeypatch):
    from snoo_train.models.pretrained import resolve_pretrained

    with pytest.raises(ConfigError, match="model.from_pretrained='/nonexistent/x': no config.json"):
        resolve_pretrained("/nonexistent/x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="not in the HF cache and HF_HUB_OFFLINE is set"):
        resolve_pretrained("no-such-org/no-such-model-xyz")


def test_snoo_slow_weights_start_at_the_loaded_weights(hf_dirs, tmp_path):
    """After one inner step SNOO's slow weights, taken at the first step before the inner
    update, are the checkpoint's tensors, bitwise, while the parameters have moved."""
    from snoo_train.dist import init_distributed
    from snoo_train.trainer import Trainer

    cfg = make_config(tmp_path, _overrides(hf_dirs["llama"], "llama"))
    trainer = Trainer(cfg, init_distributed("cpu"))
    trainer.train_step(1)
    trainer.loader.close()
    want = load_file(hf_dirs["llama"] / "model.safetensors")
    params = dict(trainer.model.named_parameters())
    assert set(params) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(trainer.optimizer.state[params[name]]["snoo_slow"], tensor, rtol=0, atol=0, msg=name)
        assert not torch.equal(params[name].detach(), tensor), name


def test_resume_ignores_from_pretrained(hf_dirs, tmp_path, caplog):
    """A warm-started run resumes from its own checkpoint, saying once that from_pretrained is ignored."""
    overrides = _overrides(hf_dirs["llama"], "llama")[:-1] + ["trainer.max_steps=1", "checkpoint.interval=1"]
    run_trainer(tmp_path, overrides)
    with caplog.at_level(logging.INFO, logger="snoo_train"):
        resumed = run_trainer(tmp_path, overrides[:-2] + ["trainer.max_steps=2", "checkpoint.interval=1"])
    assert resumed.resumed_from is not None and resumed.step == 2
    ignored = [r for r in caplog.records if "model.from_pretrained=" in r.getMessage() and "ignored" in r.getMessage()]
    assert len(ignored) == 1


def test_entry_point_takes_the_shape_before_validating(hf_dirs, tmp_path):
    """`python -m snoo_train.train model.from_pretrained=DIR`: the run trains the checkpoint's
    shape (recorded in its config.yaml), the preset's only where config.json is silent."""
    from omegaconf import OmegaConf

    from tests.conftest import TINY, run_entry

    args = [*TINY, *_overrides(hf_dirs["moe"], "moe"), "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"]
    done = run_entry(args, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    model = OmegaConf.load(tmp_path / "run" / "config.yaml").model
    assert (model.family, model.num_experts, model.vocab_size, model.from_pretrained) == (
        "moe", 4, VOCAB, str(hf_dirs["moe"]))
    assert model.experts_implementation == "auto"  # not in config.json: the preset's
