"""snoo_train.models: presets, deterministic (meta) builds, FSDP2 sharding, AC, compile, FLOPs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaForCausalLM

from snoo_train.config import ModelConfig
from snoo_train.models import (
    PRESETS,
    apply_activation_checkpointing,
    apply_compile,
    build_model,
    count_parameters,
    flops_per_token,
    llama_config,
    materialize,
    parallelize,
)
from tests.dist_utils import run_distributed

BYTE_VOCAB = 257  # 256 bytes + end-of-document
CONFIG_DIR = Path(__file__).resolve().parents[1] / "snoo_train" / "configs" / "groups" / "model"
TINY = PRESETS["llama_tiny"]


def _batch(batch: int, seq: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, BYTE_VOCAB, (batch, seq + 1), generator=g)
    return window[:, :-1], window[:, 1:]


def _loss(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Labels are already shifted (the data pipeline's contract), so no HF `labels=` argument.
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def _canonical(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def _loss_and_grads(model, inputs, labels) -> tuple[float, dict[str, torch.Tensor]]:
    loss = _loss(model, inputs, labels)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[_canonical(name)] = grad.detach().clone()
    return loss.item(), grads


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _expected_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    head_dim = cfg.hidden_size // cfg.num_heads
    return 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


# --- presets and configs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, vocab, low, high",
    [
        ("llama_tiny", BYTE_VOCAB, 50_000, 250_000),
        ("llama_small", BYTE_VOCAB, 1_000_000, 3_000_000),
        ("llama_125m", 50_257, 110e6, 140e6),
        ("llama_1b", 50_257, 0.95e9, 1.25e9),
    ],
)
def test_preset_parameter_ranges(name, vocab, low, high):
    cfg = PRESETS[name]
    device = "cpu" if vocab == BYTE_VOCAB else "meta"  # big presets: shapes only
    model = build_model(cfg, vocab, seed=0, device=device)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vocab_size % 64 == 0 and 0 <= model.config.vocab_size - vocab < 64
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert low <= count_parameters(model) <= high


def test_byte_vocab_is_padded_to_320():
    model = build_model(TINY, BYTE_VOCAB, seed=0)
    assert model.model.embed_tokens.weight.shape == (320, TINY.hidden_size)
    assert model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 320)


def test_yaml_configs_mirror_presets():
    files = {p.stem: p for p in CONFIG_DIR.glob("*.yaml")}
    assert set(files) == set(PRESETS)
    for name, path in files.items():
        values = OmegaConf.to_container(OmegaConf.load(path))
        assert set(values) == {f.name for f in dataclasses.fields(ModelConfig)}, path
        assert ModelConfig(**values) == PRESETS[name], path


# --- initialization ------------------------------------------------------------------------


def test_build_is_deterministic_for_a_seed():
    a, b = build_model(TINY, BYTE_VOCAB, seed=3), build_model(TINY, BYTE_VOCAB, seed=3)
    other = build_model(TINY, BYTE_VOCAB, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), other.parameters()):
        assert pa.dtype == torch.float32 and pa.device.type == "cpu"
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name
    # Independent of the global RNG: the init draws from its own seeded generators.
    torch.manual_seed(123)
    c = build_model(TINY, BYTE_VOCAB, seed=3)
    assert all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_init_statistics():
    cfg = dataclasses.replace(TINY, hidden_size=128, intermediate_size=512, num_layers=8)
    model = build_model(cfg, BYTE_VOCAB, seed=0)
    layer = model.model.layers[0]
    assert torch.all(layer.input_layernorm.weight == 1) and torch.all(model.model.norm.weight == 1)
    std = cfg.init_std
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(std, rel=0.05)
    assert layer.mlp.up_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    residual_std = std / (2 * cfg.num_layers) ** 0.5
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    # Different layers get different draws.
    assert not torch.equal(layer.mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


def test_meta_build_materializes_like_a_cpu_build():
    reference = build_model(TINY, BYTE_VOCAB, seed=5)
    model = build_model(TINY, BYTE_VOCAB, seed=5, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.is_meta
    materialize(model, device="cpu", seed=5)

    assert model.lm_head.weight is model.model.embed_tokens.weight
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    # Rotary frequencies: an independent formula and transformers' own CPU construction.
    hf_model = LlamaForCausalLM(llama_config(TINY, BYTE_VOCAB))
    rotary = model.model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq, _expected_inv_freq(TINY), rtol=1e-6, atol=0)
    torch.testing.assert_close(rotary.inv_freq, hf_model.model.rotary_emb.inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(
        rotary.original_inv_freq, hf_model.model.rotary_emb.original_inv_freq, rtol=0, atol=0
    )

    inputs, labels = _batch(2, 32)
    logits = model(input_ids=inputs).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference(input_ids=inputs).logits, rtol=0, atol=0)


def test_the_config_knows_every_registered_family():
    from snoo_train.config import MODEL_FAMILIES
    from snoo_train.models import FAMILIES

    assert tuple(FAMILIES) == MODEL_FAMILIES


def test_vocab_size_override_and_errors():
    cfg = dataclasses.replace(TINY, vocab_size=1000)
    assert build_model(cfg, BYTE_VOCAB, seed=0, device="meta").config.vocab_size == 1024
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(dataclasses.replace(TINY, vocab_size=100), BYTE_VOCAB, seed=0, device="meta")
    with pytest.raises(ValueError, match="family"):
        build_model(dataclasses.replace(TINY, family="mixtral"), BYTE_VOCAB, seed=0, device="meta")


# --- FLOPs and parameter counts ----------------------------------------------------------


def test_flops_per_token_hand_computed():
    # llama_tiny, byte vocab padded to 320, hidden 64, 2 layers, 4 heads of 16, 2 kv heads.
    attention = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v, o
    mlp = 3 * 64 * 172
    per_layer = attention + mlp + 2 * 64  # + two norms
    matmul_params = 2 * per_layer + 64 + 64 * 320  # + final norm + (tied) head
    assert matmul_params == 111_424
    expected = 6 * matmul_params + 12 * 2 * 64 * 256
    assert flops_per_token(TINY, BYTE_VOCAB, 256) == expected == 1_061_760

    model = build_model(TINY, BYTE_VOCAB, seed=0)
    assert count_parameters(model) == matmul_params  # tied: the head is the embedding
    assert count_parameters(model, exclude_embeddings=True) == matmul_params - 64 * 320


def test_flops_per_token_matches_a_flop_counter():
    cfg = dataclasses.replace(TINY, tie_embeddings=False)
    model = build_model(cfg, BYTE_VOCAB, seed=0)
    model.config._attn_implementation = "eager"  # matmuls the counter can see
    batch, seq = 2, 48
    inputs, labels = _batch(batch, seq)
    with FlopCounterMode(display=False) as counter:
        _loss(model, inputs, labels).backward()
    norm_params = 2 * cfg.num_layers * cfg.hidden_size + cfg.hidden_size  # elementwise, uncounted
    expected = (flops_per_token(cfg, BYTE_VOCAB, seq) - 6 * norm_params) * batch * seq
    assert counter.get_total_flops() == expected


# --- activation checkpointing and compile ------------------------------------------------


def _saved_tensor_count(model, inputs, labels) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, inputs, labels)
    return count


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = dataclasses.replace(TINY, num_layers=3)
    inputs, labels = _batch(2, 32)
    reference = build_model(cfg, BYTE_VOCAB, seed=0)
    model = build_model(cfg, BYTE_VOCAB, seed=0)
    apply_activation_checkpointing(model)

    assert all(isinstance(layer, CheckpointWrapper) for layer in model.model.layers)
    assert (
        _saved_tensor_count(model, inputs, labels)
        < _saved_tensor_count(reference, inputs, labels) / 2
    )
    # state_dict keys are unchanged by the wrapper (checkpoints stay interchangeable).
    assert model.state_dict().keys() == reference.state_dict().keys()

    ref_loss, ref_grads = _loss_and_grads(reference, inputs, labels)
    loss, grads = _loss_and_grads(model, inputs, labels)
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-6, msg=name)


def test_compile_per_layer_traces_without_graph_breaks():
    inputs, labels = _batch(2, 16)
    reference = build_model(TINY, BYTE_VOCAB, seed=0)
    model = build_model(TINY, BYTE_VOCAB, seed=0)
    apply_activation_checkpointing(model)
    apply_compile(model, backend="aot_eager")  # fullgraph=True: a graph break would raise
    ref_loss, ref_grads = _loss_and_grads(reference, inputs, labels)
    loss, grads = _loss_and_grads(model, inputs, labels)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-6, msg=name)


def test_mixed_precision_without_a_mesh_is_refused():
    model = build_model(TINY, BYTE_VOCAB, seed=0)
    with pytest.raises(ValueError, match="mesh"):
        parallelize(model, mesh=None, param_dtype=torch.bfloat16)


# --- FSDP2 at world size 2 ---------------------------------------------------------------


def _check_sharding(model, world_size: int) -> None:
    assert isinstance(model, FSDPModule)
    assert all(isinstance(layer, FSDPModule) for layer in model.model.layers)
    # Each layer is its own group: its parameters belong to it, not to the root's group.
    layer_params = {id(p) for layer in model.model.layers for p in layer.parameters()}
    root_params = [p for p in model.parameters() if id(p) not in layer_params]
    assert {id(p) for p in root_params} == {
        id(model.model.embed_tokens.weight),
        id(model.model.norm.weight),
    }
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rank = dist.get_rank()
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor), name
        assert p.placements == (Shard(0),), name
        rows = -(-p.shape[0] // world_size)  # torch.chunk: ceil-sized chunks, the last one short
        expected = max(0, min((rank + 1) * rows, p.shape[0]) - rank * rows)
        assert p.to_local().shape == (expected, *p.shape[1:]), name


def _fsdp_matches_single_process(rank: int, world_size: int, cfg: ModelConfig) -> None:
    batch, seq = 4, 24
    inputs, labels = _batch(batch, seq, seed=7)
    reference = build_model(cfg, BYTE_VOCAB, seed=11)
    ref_loss, ref_grads = _loss_and_grads(reference, inputs, labels)
    ref_params = {name: p.detach() for name, p in reference.named_parameters()}
    mine = slice(rank * batch // world_size, (rank + 1) * batch // world_size)
    mesh = init_device_mesh("cpu", (world_size,))

    # (1) CPU build, then sharded; (2) meta build, sharded with checkpointing, then materialized.
    built = parallelize(build_model(cfg, BYTE_VOCAB, seed=11), mesh=mesh)
    meta = parallelize(
        build_model(cfg, BYTE_VOCAB, seed=11, device="meta"),
        mesh=mesh,
        activation_checkpointing=True,
    )
    materialize(meta, device="cpu", seed=11)
    for model in (built, meta):
        _check_sharding(model, world_size)
        for name, p in model.named_parameters():
            assert torch.equal(p.full_tensor(), ref_params[_canonical(name)]), name
        rotary = model.model.rotary_emb
        torch.testing.assert_close(
            rotary.inv_freq, reference.model.rotary_emb.inv_freq, rtol=0, atol=0
        )

        loss, grads = _loss_and_grads(model, inputs[mine], labels[mine])
        mean_loss = torch.tensor(loss)
        dist.all_reduce(mean_loss)
        assert abs(mean_loss.item() / world_size - ref_loss) < 1e-5
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_fully_shard_world_size_2_matches_single_process():
    # An odd intermediate size gives uneven shards (FSDP pads the last rank's).
    cfg = dataclasses.replace(TINY, intermediate_size=171, num_layers=3)
    run_distributed(_fsdp_matches_single_process, 2, cfg)
