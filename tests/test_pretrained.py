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
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

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


TEXT = "def main(self, x):\n    return self.value + x  # an import of os\n"


def _save(model: torch.nn.Module, path: Path) -> Path:
    # Not the init's own statistics: every tensor, norms included, is a random draw.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    return path


def _save_tokenizer(path: Path, size: int):
    """A word-level tokenizer of `size` ids (below the checkpoint's vocabulary) saved beside the
    weights as save_pretrained would; returns the `tokenizers` object, the reference."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [f"w{i}" for i in range(size)] + TEXT.split()
    backend.train_from_iterator(words, trainers.WordLevelTrainer(vocab_size=size, special_tokens=["[UNK]", "[EOS]"]))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(path)
    return backend


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    llama = LlamaForCausalLM(LlamaConfig(intermediate_size=96, tie_word_embeddings=True, **SHAPE))
    mixtral = MixtralForCausalLM(
        MixtralConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                      tie_word_embeddings=False, **SHAPE)
    )
    dirs = {"llama": _save(llama, root / "llama"), "moe": _save(mixtral, root / "mixtral")}
    _save_tokenizer(dirs["llama"], 200)  # the llama runs train with it; the mixtral ones fall back to byte
    return dirs


def _overrides(hf: Path, family: str) -> list[str]:
    preset = "moe_tiny" if family == "moe" else "llama_tiny"
    return [f"model={preset}", f"model.from_pretrained={hf}", "data.seq_len=32", "checkpoint.interval=0"]


def _build_and_save(run_dir: str, overrides: list[str], world_size: int = 1, hf: Path | None = None) -> None:
    """What the entry point builds for `overrides` (trained 0 steps), saved as a checkpoint.
    With `hf`: then checks that this rank's replica holds the checkpoint's tensors, and, under
    SNOO, that its slow weights start there (taken at the first step, before the inner update)."""
    from snoo_train.dist import init_distributed
    from snoo_train.trainer import Trainer

    cfg = make_config(Path(run_dir), overrides, world_size=world_size)
    p = cfg.parallel
    trainer = Trainer(cfg, init_distributed("cpu", replicas=p.replicas, tp=p.tp, ep=p.ep))
    trainer.save_checkpoint(blocking=True)
    trainer.checkpointer.close()
    if hf is not None:
        _assert_starts_at(trainer, load_file(hf / "model.safetensors"))
    trainer.loader.close()
    trainer.metrics.close()


def _full(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # A DTensor's whole tensor, gathered within its mesh (one replica's shards under DiLoCo/HSDP).
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor) and isinstance(like, DTensor):
        t = DTensor.from_local(t, like.device_mesh, like.placements)
    return t.full_tensor() if isinstance(t, DTensor) else t


def _assert_starts_at(trainer, want: dict[str, torch.Tensor]) -> None:
    from snoo_train.models.build import _canonical_name

    params = {_canonical_name(n): p for n, p in trainer.model.named_parameters()}
    assert set(params) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(_full(params[name].detach(), params[name]), tensor, rtol=0, atol=0, msg=name)
    if not trainer.is_snoo:
        return
    trainer.train_step(1)
    for name, tensor in want.items():
        slow = trainer.optimizer.state[params[name]]["snoo_slow"]
        torch.testing.assert_close(_full(slow, params[name]), tensor, rtol=0, atol=0, msg=name)


def _layouts_worker(rank: int, world_size: int, root: str, runs: dict[str, tuple[list[str], str | None]]) -> None:
    # Every layout in one group of 4 ranks (each its own mesh over the same process group): starting
    # four ranks costs more than building a tiny model. With `hf`, each rank also checks that its
    # replica (and SNOO's slow weights) start at the checkpoint's tensors.
    for name, (overrides, hf) in runs.items():
        _build_and_save(str(Path(root, name, "run")), overrides, world_size=dist.get_world_size(), hf=Path(hf) if hf else None)
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
    if (hf / "tokenizer.json").is_file():  # the run took the checkpoint's tokenizer: the export carries it
        from tokenizers import Tokenizer

        exported_tokenizer = AutoTokenizer.from_pretrained(out)
        want_ids = Tokenizer.from_file(str(hf / "tokenizer.json")).encode(TEXT).ids
        assert exported_tokenizer(TEXT, add_special_tokens=False)["input_ids"] == want_ids
    # The figures for the docs (pytest -s shows them).
    weights = max((got[n] - t).abs().max().item() for n, t in want.items())
    print(f"\nround trip {run_dir.parent.name}: max |weight diff| {weights:.1e}, max |logit diff| "
          f"{(logits - want_logits).abs().max().item():.1e}")


@pytest.mark.parametrize("family", ["llama", "moe"])
def test_round_trip_one_process(hf_dirs, tmp_path, family):
    """Trained 0 steps: trainer.max_steps=0 loads, evaluates and saves the step-0 checkpoint."""
    run_trainer(tmp_path / "run", _overrides(hf_dirs[family], family)[:-1] + ["trainer.max_steps=0"])
    _assert_round_trip(hf_dirs[family], tmp_path / "run", tmp_path / "out")


# name -> (family, layout overrides, checked inside the ranks), each saved by the same 4 ranks: FSDP 4;
# HSDP 2 x 2 (replicas without an outer optimizer); DiLoCo, 2 replicas x 2 shards under SNOO (every
# replica, and its slow weights, start at the checkpoint's tensors); FSDP 2 x TP 2; EP 2 x FSDP 2.
SHARDED = {
    "fsdp4": ("llama", [], True),
    "hsdp2x2": ("llama", ["optim=adamw", "parallel.replicas=2"], True),
    "diloco2x2": ("llama", ["parallel.replicas=2"], True),
    "fsdp2_tp2": ("llama", ["parallel.tp=2"], False),
    "ep2_fsdp2": ("moe", ["parallel.ep=2"], False),
}


@pytest.fixture(scope="module")
def sharded_runs(hf_dirs, tmp_path_factory) -> Path:
    """Every SHARDED layout saved by one 4-rank group (one start-up instead of one per layout)."""
    root = tmp_path_factory.mktemp("sharded")
    runs = {
        name: (_overrides(hf_dirs[family], family) + layout, str(hf_dirs[family]) if inside else None)
        for name, (family, layout, inside) in SHARDED.items()
    }
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


def test_the_checkpoints_tokenizer_is_taken_by_default(hf_dirs, tmp_path, caplog):
    """data.tokenizer=null with a from_pretrained directory that holds a tokenizer: the run
    trains with it (its ids, its vocabulary) and records its choice; one line says so."""
    from tokenizers import Tokenizer

    from snoo_train.dist import init_distributed
    from snoo_train.models.pretrained import apply_pretrained
    from snoo_train.trainer import Trainer

    cfg = make_config(tmp_path, _overrides(hf_dirs["llama"], "llama"))
    assert cfg.data.tokenizer is None
    with caplog.at_level(logging.INFO, logger="snoo_train"):
        apply_pretrained(cfg, 1)
        trainer = Trainer(cfg, init_distributed("cpu"))  # chooses again: a no-op, no second line
    trainer.loader.close()
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data.tokenizer=")]
    assert chosen == [f"data.tokenizer={hf_dirs['llama']} (model.from_pretrained holds a tokenizer; "
                      "set data.tokenizer to choose another)"]
    assert cfg.data.tokenizer == str(hf_dirs["llama"])
    backend = Tokenizer.from_file(str(hf_dirs["llama"] / "tokenizer.json"))
    assert trainer.tokenizer.encode(TEXT) == backend.encode(TEXT).ids
    assert (trainer.tokenizer.vocab_size, trainer.vocab_size) == (200, VOCAB)
    assert int(trainer.train_set[0].max()) < 200  # the training windows are its ids


def test_an_explicit_tokenizer_wins(hf_dirs, tmp_path):
    from snoo_train.data import ByteTokenizer, resolve_tokenizer
    from snoo_train.models.pretrained import apply_pretrained

    cfg = make_config(tmp_path, _overrides(hf_dirs["llama"], "llama") + ["data.tokenizer=byte"])
    apply_pretrained(cfg, 1)
    assert cfg.data.tokenizer == "byte" and isinstance(resolve_tokenizer(cfg.data), ByteTokenizer)


def test_tokenizer_larger_than_the_vocabulary_is_refused(hf_dirs, tmp_path, caplog):
    """A directory without tokenizer files: the source's default (byte, 257 ids), said in one
    line; a checkpoint vocabulary of 200 is then too small: one ConfigError naming both."""
    overrides = _overrides(hf_dirs["llama"], "llama")
    small = tmp_path / "small"
    LlamaForCausalLM(LlamaConfig(intermediate_size=96, **{**SHAPE, "vocab_size": 200})).save_pretrained(small)
    overrides[1] = f"model.from_pretrained={small}"
    with caplog.at_level(logging.INFO, logger="snoo_train"), pytest.raises(
        ConfigError, match=f"the tokenizer has 257 ids but model.from_pretrained='{small}' has a vocabulary of 200"
    ):
        run_trainer(tmp_path / "run", overrides)
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data.tokenizer=")]
    assert chosen == [f"data.tokenizer=byte (model.from_pretrained='{small}' holds no tokenizer files; the default "
                      "for data.source=stdlib; set data.tokenizer to choose another)"]


def test_a_run_recorded_with_tokenizer_byte_resumes_under_the_null_default(tmp_path):
    """Runs made before data.tokenizer defaulted to null recorded `tokenizer: byte`; the null
    default resolves to byte, so the resume compares equal instead of refusing a data change."""
    run_trainer(tmp_path, ["data.tokenizer=byte", "trainer.max_steps=1", "checkpoint.interval=1"])
    resumed = run_trainer(tmp_path, ["trainer.max_steps=2", "checkpoint.interval=1"])
    assert resumed.resumed_from is not None and resumed.step == 2 and resumed.cfg.data.tokenizer == "byte"


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


def test_entry_point_converts_with_max_steps_0(hf_dirs, tmp_path):
    """`python -m snoo_train.train model.from_pretrained=DIR trainer.max_steps=0`: a conversion.
    The run takes the checkpoint's shape (recorded in its config.yaml; the preset's only where
    config.json is silent), evaluates it, saves the step-0 checkpoint, and exports the same
    model; the summary counts no step and divides by none."""
    import json

    from omegaconf import OmegaConf

    from tests.conftest import TINY, run_entry

    overrides = [*_overrides(hf_dirs["moe"], "moe")[:-1], "trainer.max_steps=0", f"hydra.run.dir={tmp_path / 'run'}"]
    done = run_entry([*TINY, *overrides], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    model = saved.model
    assert (model.family, model.num_experts, model.vocab_size, model.from_pretrained) == (
        "moe", 4, VOCAB, str(hf_dirs["moe"]))
    assert model.experts_implementation == "auto"  # not in config.json: the preset's
    assert saved.data.tokenizer == "byte"  # the mixtral directory holds no tokenizer: the recorded fallback
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["steps"], summary["steps_this_session"], summary["tokens"], summary["tokens_per_s"]) == (0, 0, 0, 0.0)
    assert summary["final_val_loss"] > 0 and summary["final_val_loss"] == summary["final_val_loss"]  # finite, not NaN
    _assert_round_trip(hf_dirs["moe"], tmp_path / "run", tmp_path / "out")


def _unreadable_worker(rank: int, world_size: int, hf: str, broken: str, run_dir: str) -> None:
    """Rank 1 alone cannot read the weights (a node's copy truncated or missing, or a read that
    fails after the check): both ranks must raise the same ConfigError, promptly. Then rank 1
    alone misses the tokenizer files."""
    import time

    from snoo_train.models import build, pretrained

    def rank1_reads(directory: Path):
        return lambda name: directory if rank == 1 else Path(hf)

    def failing_read(*args, **kwargs):
        raise OSError("Input/output error")

    cases = {
        "truncated": (build, "resolve_pretrained", rank1_reads(Path(broken) / "truncated")),
        "missing": (build, "resolve_pretrained", rank1_reads(Path(broken) / "missing")),
        "read fails": (pretrained._Checkpoint, "read", failing_read if rank == 1 else pretrained._Checkpoint.read),
    }
    want = {
        "truncated": f"model.from_pretrained: cannot read the checkpoint in {broken}/truncated: ",
        "missing": f"model.from_pretrained: no model.safetensors in {broken}/missing (on rank 1)",
        "read fails": f"model.from_pretrained: cannot read the checkpoint in {hf}: Input/output error (on rank 1)",
    }
    cfg = make_config(Path(run_dir), _overrides(Path(hf), "llama"), world_size=world_size)
    pretrained.apply_pretrained(cfg, world_size)
    for case, (owner, attr, value) in cases.items():
        # The Trainer's own load (materialize), on a plain model per rank: the agreement is the point.
        model = build.build_model(cfg.model, 200, seed=0, device="meta")
        start = time.perf_counter()
        with pytest.MonkeyPatch.context() as mp, pytest.raises(ConfigError) as raised:
            mp.setattr(owner, attr, value)
            build.materialize(model, device="cpu", seed=0, pretrained=cfg.model.from_pretrained)
        elapsed = time.perf_counter() - start
        messages: list = [None] * world_size
        dist.all_gather_object(messages, str(raised.value))
        assert messages[0] == messages[1] and messages[0].startswith(want[case]), (case, messages)
        assert messages[0].endswith("(on rank 1)") and raised.value.on_every_rank, case
        assert elapsed < 10, (case, elapsed)  # not a collective's timeout (minutes)
    _tokenizer_seen_on_rank_0_only(rank, Path(hf), Path(run_dir) / "tokenizer")


def _tokenizer_seen_on_rank_0_only(rank: int, hf: Path, run_dir: Path) -> None:
    """Each rank chooses data.tokenizer from the files it sees: rank 1 missing them (a node's
    copy without them) must not train on bytes beside rank 0's tokenizer; both refuse alike."""
    from snoo_train.dist import init_distributed
    from snoo_train.trainer import Trainer

    cfg = make_config(run_dir, _overrides(hf, "llama"), world_size=2)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(ConfigError) as raised:
        if rank == 1:
            mp.setattr("snoo_train.models.pretrained.TOKENIZER_FILES", ())
        Trainer(cfg, init_distributed("cpu"))
    assert str(raised.value).startswith(
        f"the tokenizer (data.tokenizer, fingerprint) differs between ranks: rank 0 ('{hf}', 'hf-"
    ) and "rank 1 ('byte', 'byte-utf8-eos256')" in str(raised.value) and raised.value.on_every_rank


def test_an_unreadable_checkpoint_on_one_rank_is_the_same_error_on_every_rank(hf_dirs, tmp_path):
    import hashlib
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(hf_dirs["llama"], broken / "truncated")
    weights = broken / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # the header intact, half the data
    shutil.copytree(hf_dirs["llama"], broken / "missing")
    (broken / "missing" / "model.safetensors").unlink()

    def digests() -> dict[str, str]:
        files = [f for root in (hf_dirs["llama"], broken) for f in sorted(root.rglob("*")) if f.is_file()]
        return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    before = digests()
    run_distributed(_unreadable_worker, 2, str(hf_dirs["llama"]), str(broken), str(tmp_path / "runs"))
    assert digests() == before
