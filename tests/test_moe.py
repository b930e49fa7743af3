"""MoE (family=moe, Mixtral classes): build, active-parameter FLOPs, the load-balancing term
against a reference written here, and training through the entry point: one process vs
torchrun with 2 ranks, metrics-file fields, the balancing coefficient, SNOO(Muon)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralForCausalLM

from snoo_train.config import ConfigError, validate_config
from snoo_train.models import PRESETS, RouterStats, build_model, count_parameters, flops_per_token
from snoo_train.trainer import causal_lm_loss
from tests.conftest import QUICK, read_records, train
from tests.records import assert_records_match

VOCAB = 257
TINY = PRESETS["moe_tiny"]
MOE_QUICK = [a for a in QUICK if not a.startswith(("model=", "trainer.max_steps"))] + [
    "model=moe_tiny",
    "trainer.max_steps=10",
    "trainer.eval_interval=10",
]
MOE_FIELDS = {"moe/aux_loss", "moe/max_over_mean"} | {
    f"moe/layer{i}/{k}" for i in range(TINY.num_layers) for k in ("load", "max_over_mean")
}


def ref_balancing_loss(
    router_logits: list[torch.Tensor], num_experts: int, top_k: int
) -> torch.Tensor:
    """Switch Transformer: E * sum_e f_e * P_e over all layers' tokens together, f_e the fraction
    of top-k assignments to expert e, P_e its mean router probability."""
    logits = torch.cat(router_logits).float()
    probs = logits.softmax(dim=-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(dim=1).float()
    return num_experts * (chosen.mean(dim=0) * probs.mean(dim=0)).sum()


def test_build_presets_and_active_flops():
    model = build_model(TINY, VOCAB, seed=0)
    assert isinstance(model, MixtralForCausalLM)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 2 * 64, 64) and experts.down_proj.shape == (4, 64, 64)
    assert model.config._experts_implementation == "grouped_mm"  # widths are multiples of 8
    odd = dataclasses.replace(TINY, moe_intermediate_size=36 + 2)
    assert build_model(odd, VOCAB, seed=0, device="meta").config._experts_implementation == "eager"
    big = build_model(PRESETS["moe_1b"], 50257, seed=0, device="meta")
    assert 0.95e9 <= count_parameters(big) <= 1.1e9

    # Active parameters per token: attention + router + top-k of the experts, by hand.
    h, i, e, k, layers, seq = 64, 64, 4, 2, 2, 32
    attention = h * 16 * (2 * 4 + 2 * 2)
    per_layer = attention + k * 3 * h * i + h * e + 2 * h
    expected = 6.0 * (layers * per_layer + h + h * 320) + 12.0 * layers * h * seq
    assert flops_per_token(TINY, VOCAB, seq) == pytest.approx(expected)


def test_moe_config_validation():
    from snoo_train.config import Config

    cfg = Config()
    cfg.model = dataclasses.replace(TINY)
    validate_config(cfg)
    for key, value, match in [
        ("num_experts", 1, "model.num_experts"),
        ("num_experts_per_tok", 5, "model.num_experts_per_tok"),
        ("router_aux_loss_coef", -1.0, "model.router_aux_loss_coef"),
        ("experts_implementation", "fast", "model.experts_implementation"),
    ]:
        cfg.model = dataclasses.replace(TINY, **{key: value})
        with pytest.raises(ConfigError, match=match):
            validate_config(cfg)


def test_balancing_coefficient_adds_exactly_its_term():
    model = build_model(TINY, VOCAB, seed=0)
    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, VOCAB, (4, 33), generator=g)
    batch = {"input_ids": window[:, :-1], "labels": window[:, 1:]}
    coef = 0.37  # large, so that a wrong factor could not hide in the tolerance
    stats = RouterStats(TINY.num_experts, TINY.num_experts_per_tok, coef)
    with_term = causal_lm_loss(model, batch, router=stats)
    without = causal_lm_loss(model, batch, router=RouterStats(4, 2, 0.0))
    plain = causal_lm_loss(model, batch)

    outputs = model(input_ids=batch["input_ids"], output_router_logits=True)
    aux = ref_balancing_loss(outputs.router_logits, 4, 2)
    assert torch.equal(without, plain)
    assert (with_term - without).item() == pytest.approx(coef * aux.item(), rel=1e-5)

    record = stats.metrics(lambda values: values)
    assert record["moe/aux_loss"] == pytest.approx(aux.item(), rel=1e-5)
    for layer, logits in enumerate(outputs.router_logits):
        counts = torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=4).double()
        fractions = counts / counts.sum()
        assert record[f"moe/layer{layer}/load"] == pytest.approx(fractions.tolist(), abs=1e-6)
        assert record[f"moe/layer{layer}/max_over_mean"] == pytest.approx(
            (fractions.max() / fractions.mean()).item()
        )
    assert stats.metrics(lambda values: values) == {}  # reset after reading


# -- through the entry point ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory) -> dict[str, Path]:
    """moe_tiny with SNOO(Muon) on one process and on 2 ranks, and a 1-step run without the
    balancing term. grad_accum keeps micro-batches of 2 sequences on both sides, so the
    balancing loss (not linear in the batch) is taken over the same token groups."""
    runs = {}
    for key, nproc, extra in [
        ("ws1", 1, ["trainer.grad_accum=4"]),
        ("ws2", 2, ["trainer.grad_accum=2"]),
        (
            "coef0",
            1,
            ["trainer.grad_accum=4", "model.router_aux_loss_coef=0", "trainer.max_steps=1"],
        ),
    ]:
        cwd = tmp_path_factory.mktemp(key)
        runs[key] = cwd / "run"
        args = MOE_QUICK + ["optim=snoo_muon", "optim.k=5", f"hydra.run.dir={runs[key]}"]
        train(args + extra, cwd=cwd, nproc=nproc)
    return runs


@pytest.mark.slow
def test_snoo_muon_trains_moe_and_records_expert_load(moe_runs):
    records = read_records(moe_runs["ws1"])
    assert [r["step"] for r in records] == [1, 5, 10]
    for r in records:
        assert MOE_FIELDS <= r.keys(), r.keys()
        for layer in range(TINY.num_layers):
            load = r[f"moe/layer{layer}/load"]
            assert len(load) == TINY.num_experts and sum(load) == pytest.approx(1.0, abs=1e-5)
            assert r[f"moe/layer{layer}/max_over_mean"] == pytest.approx(
                max(load) * len(load), rel=1e-4
            )
        assert (
            math.isfinite(r["moe/aux_loss"]) and r["moe/aux_loss"] >= 1.0
        )  # >= 1, = 1 when balanced
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    # SNOO(Muon): outer steps at 5 and 10.
    assert [r["step"] for r in records if "snoo/pseudo_grad_norm" in r] == [5, 10]
    assert "val_loss" in records[-1]


@pytest.mark.slow
def test_two_ranks_match_one_process(moe_runs):
    got, want = read_records(moe_runs["ws2"]), read_records(moe_runs["ws1"])
    keys = ("loss", "grad_norm", "val_loss", "moe/aux_loss", "snoo/pseudo_grad_norm")
    assert_records_match(got, want, keys, rel=1e-3)
    assert_records_match(got, want, ["moe/layer0/load"], abs=1e-3)
    assert all("moe/layer0/load" in r for r in got)


@pytest.mark.slow
def test_coefficient_zero_removes_exactly_the_balancing_term(moe_runs):
    # Same weights and data at step 1: the losses differ by coef x the recorded balancing loss.
    first, zero = read_records(moe_runs["ws1"])[0], read_records(moe_runs["coef0"])[0]
    assert first["step"] == zero["step"] == 1
    assert zero["moe/aux_loss"] == pytest.approx(first["moe/aux_loss"], rel=1e-6)
    coef = TINY.router_aux_loss_coef
    assert first["loss"] - zero["loss"] == pytest.approx(coef * first["moe/aux_loss"], rel=1e-4)
