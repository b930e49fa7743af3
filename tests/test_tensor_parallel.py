"""Tensor parallelism on real gloo process groups (world size 4), against one process.

One spawn of 4 ranks runs every distributed case through the real Trainer (and DiLoCo x TP
through the optimizer directly, the way tests/test_diloco.py does); the tests below compare
what it wrote with references computed here in one process:

* TP 2 x FSDP 2 with SNOO(AdamW) and SNOO(Muon): the same losses and gradient norms as one
  process, step by step through several outer steps;
* DiLoCo 2 replicas x TP 2: the same weights, slow weights and momentum as two hand-averaged
  replicas (tests/test_diloco.py: reference_diloco, DESIGN.md section 2);
* checkpoints across layouts: FSDP 4 -> FSDP 2 x TP 2 -> one process continues the
  uninterrupted single-process run;
* the mesh and the optimizer state's placements; config errors for sizes that do not divide.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, Shard

from snoo_train.config import ConfigError, mesh_dims, validate_config
from snoo_train.dist import init_distributed
from snoo_train.models import PRESETS, build_model, materialize, parallelize
from snoo_train.optim import SNOO
from snoo_train.trainer import Trainer, clip_grad_norm
from tests import test_diloco as diloco
from tests.conftest import read_records, run_trainer, typed
from tests.dist_utils import fit_layout, run_distributed, state_like_params
from tests.records import assert_records_match

WS = 4
TP = ["parallel.tp=2"]
# The equality runs: 12 steps, SNOO k=5 (outer steps at 5 and 10), logged every step.
CASES = {
    "tp_snoo_adamw": TP,  # logits sharded over the vocabulary: parallel.loss_parallel=true
    "tp_snoo_muon": TP + ["optim=snoo_muon"],
    "tp_gathered_logits": TP + ["parallel.loss_parallel=false"],
    # Tensor-parallel attention, the expert block on the whole sequence.
    "tp_moe": TP + ["model=moe_tiny"],
}
# The layout chain: FSDP 4 for 6 steps, FSDP 2 x TP 2 to step 9, then one process to step 12.
# A constant LR: each leg stops at its own trainer.max_steps, which a decaying schedule reads.
# Each leg runs one step past the checkpoint the next leg resumes: the checkpoint at max_steps
# holds the final outer step on the partial window (SNOO.flush), which an unbroken run never takes.
CHAIN_FIRST, CHAIN_SECOND = 6, 9
CHAIN = ["trainer.lr_schedule=constant"]


def _layout_of(trainer: Trainer) -> dict:
    """Mesh dimensions of the parameters and whether every SNOO state tensor shares its
    parameter's mesh and placements."""
    meshes, placements = set(), {}
    for name, p in trainer.model.named_parameters():
        meshes.add(p.device_mesh.mesh_dim_names)
        placements[name] = str(p.placements)
    same = state_like_params(trainer.optimizer, trainer.model.parameters())
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits
    sharded = isinstance(logits, DTensor) and logits.placements == (Shard(2),)
    return {"meshes": sorted(meshes), "placements": placements, "state_like_params": same, "sharded_logits": sharded}


def _diloco_tp(rank: int) -> dict:
    """DiLoCo with 2 replicas, each a TP 2 group: tests/test_diloco.py's loop with its batches,
    constants and optimizer, on the mesh the trainer builds for replicas=2 tp=2."""
    info = init_distributed("cpu", replicas=diloco.R, tp=2)
    model = build_model(PRESETS["llama_tiny"], diloco.VOCAB, seed=0, device="meta")
    parallelize(model, mesh=info.dp_mesh, diloco=True, tp_mesh=info.tp_mesh)
    materialize(model, device="cpu", seed=0)
    opt = SNOO(diloco.inner_adamw(model), k=diloco.K, lr=diloco.ETA, momentum=diloco.MU,
               replicate_group=info.replicate_group)  # fmt: skip
    rows = diloco.GLOBAL_BATCH // diloco.R
    losses = []
    for ids in diloco.global_batches():
        loss = diloco.loss_of(model, ids[info.dp_rank * rows:(info.dp_rank + 1) * rows])
        loss.backward()
        clip_grad_norm(model.parameters(), diloco.CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {
        "replica": info.replica,
        "losses": losses,
        "params": {n: diloco._full(p) for n, p in model.named_parameters()},
        "slow": {n: diloco._full(opt.state[p]["snoo_slow"]) for n, p in model.named_parameters()},
        "momentum": {n: diloco._full(opt.state[p]["snoo_momentum"]) for n, p in model.named_parameters()},
    }


def _checkpointed_compiled_tp(info) -> float:
    """TP 2 x FSDP 2 with activation checkpointing and compile (aot_eager: no C++ compiler
    needed) against the plain model: the largest difference of loss and gradients."""
    ref = build_model(PRESETS["llama_tiny"], diloco.VOCAB, seed=0)
    model = build_model(PRESETS["llama_tiny"], diloco.VOCAB, seed=0, device="meta")
    parallelize(model, mesh=info.dp_mesh, tp_mesh=info.tp_mesh, activation_checkpointing=True, compile=True,
                compile_backend="aot_eager")  # fmt: skip
    materialize(model, device="cpu", seed=0)
    ids = diloco.global_batches()[0]
    rows = len(ids) // info.dp_size
    want, got = diloco.loss_of(ref, ids), diloco.loss_of(model, ids[info.dp_rank * rows:(info.dp_rank + 1) * rows])
    want.backward()
    got.backward()
    got = got.detach().clone()
    torch.distributed.all_reduce(got)
    worst = abs(got.item() / info.world_size - want.item())
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        worst = max(worst, (diloco._full(p.grad) - grads[name]).abs().max().item())
    return worst


def _all_cases(rank: int, world_size: int, out: str) -> None:
    torch.manual_seed(0)
    info = init_distributed("cpu", tp=2)
    mesh = {"dims": info.mesh.mesh_dim_names, "shape": list(info.mesh.shape), "dp_rank": info.dp_rank,
            "tp_ranks": info.tp_mesh.mesh.tolist(), "shard_ranks": info.shard_mesh.mesh.tolist()}  # fmt: skip
    mesh["checkpointed_compiled_worst"] = _checkpointed_compiled_tp(info)
    layouts = {}
    for name, overrides in CASES.items():
        layouts[name] = _layout_of(fit_layout(f"{out}/{name}", overrides))
    fit_layout(f"{out}/chain_fsdp4", CHAIN + [f"trainer.max_steps={CHAIN_FIRST + 1}", f"checkpoint.interval={CHAIN_FIRST}"])
    fit_layout(f"{out}/chain_tp", CHAIN + TP + [
        f"trainer.resume={out}/chain_fsdp4/checkpoints/step_{CHAIN_FIRST:08d}",
        f"trainer.max_steps={CHAIN_SECOND + 1}", f"checkpoint.interval={CHAIN_SECOND}",
    ])  # fmt: skip
    torch.save(_diloco_tp(rank), f"{out}/diloco_tp_rank{rank}.pt")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"mesh": mesh, "layouts": layouts}, f)


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp")
    run_distributed(_all_cases, WS, str(out))
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, Path]:
    """The single-process runs of the same configs."""
    root = tmp_path_factory.mktemp("tp_ref")
    runs = {}
    # The chain's reference also saves at CHAIN_SECOND, to compare exports with.
    for name, overrides in {**CASES, "chain": CHAIN + [f"checkpoint.interval={CHAIN_SECOND}"]}.items():
        runs[name] = root / name
        run_trainer(runs[name], [o for o in overrides if not o.startswith("parallel.")])
    return runs


def _rank(tp_runs: Path, rank: int) -> dict:
    return json.loads((tp_runs / f"rank{rank}.json").read_text())


@pytest.mark.slow
def test_mesh_puts_tp_innermost_and_tp_ranks_share_a_batch(tp_runs):
    for rank in range(WS):
        mesh = _rank(tp_runs, rank)["mesh"]
        assert mesh["dims"] == ["shard", "tp"] and mesh["shape"] == [2, 2]
        assert mesh["dp_rank"] == rank // 2
        assert mesh["tp_ranks"] == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert mesh["shard_ranks"] == [rank % 2, rank % 2 + 2]


@pytest.mark.slow
def test_tp_with_checkpointing_and_compile_equals_the_plain_model(tp_runs):
    for rank in range(WS):
        assert _rank(tp_runs, rank)["mesh"]["checkpointed_compiled_worst"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_tp_x_fsdp_matches_one_process(tp_runs, one_process, case):
    got, want = read_records(tp_runs / case), read_records(one_process[case])
    assert [r["step"] for r in got] == list(range(1, 13))
    # MoE: the balancing loss is per data-parallel rank and a routing near-tie can flip with
    # rounding, so as for FSDP in tests/test_moe.py (tests/test_expert_parallel_training.py says why).
    if case == "tp_moe":
        assert_records_match(got, want, ["loss", "val_loss"], rel=1e-3)
        assert_records_match(got, want, ["grad_norm", "snoo/pseudo_grad_norm"], rel=1e-2)  # seen: 2e-3
        return
    assert_records_match(got, want, ["loss", "grad_norm", "val_loss", "snoo/pseudo_grad_norm"], rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_optimizer_state_keeps_the_tp_placements(tp_runs):
    for rank in range(WS):
        for case, layout in _rank(tp_runs, rank)["layouts"].items():
            # The experts of tp_moe are not split over tp: FSDP only, on the shard dimension.
            assert layout["meshes"] == ([["shard"]] if case == "tp_moe" else []) + [["shard", "tp"]], case
            assert layout["sharded_logits"] == (case != "tp_gathered_logits"), case
            assert layout["state_like_params"], case
            p = layout["placements"]
            # Column-parallel q (Shard(0) on tp, FSDP on the rows within it: strided), row-parallel
            # o (Shard(1) on tp), vocab-parallel tied embedding, sequence-parallel norm.
            assert "Shard(dim=0)" in p["model.layers.0.self_attn.q_proj.weight"].split(",")[-1], p
            assert p["model.layers.0.self_attn.o_proj.weight"].endswith("Shard(dim=1))"), p
            assert p["model.layers.0.input_layernorm.weight"].endswith("Replicate())"), p
            assert "lm_head.weight" not in p  # tied: one parameter
            if case == "tp_moe":
                assert p["model.layers.0.mlp.experts.gate_up_proj"] == "(Shard(dim=0),)", p


@pytest.mark.slow
def test_diloco_x_tp_matches_hand_averaged_replicas(tp_runs):
    ref = diloco.reference_diloco()
    for rank in range(WS):
        run = torch.load(tp_runs / f"diloco_tp_rank{rank}.pt", weights_only=False)
        replica = run["replica"]
        assert replica == rank // 2
        assert run["losses"] == pytest.approx(ref["losses"][replica], abs=1e-5)
        diloco.assert_params(run["params"], ref["params"][replica], what=f"rank {rank} fast")
        diloco.assert_params(run["slow"], ref["slow"], what=f"rank {rank} slow")
        diloco.assert_params(run["momentum"], ref["momentum"], what=f"rank {rank} momentum")


@pytest.mark.slow
def test_checkpoint_moves_fsdp4_to_tp2_to_one_process(tp_runs, one_process, tmp_path):
    """Each layout resumes the previous one's checkpoint and continues the uninterrupted run."""
    last = tmp_path / "chain_one"
    resume = f"trainer.resume={tp_runs}/chain_tp/checkpoints/step_{CHAIN_SECOND:08d}"
    run_trainer(last, CHAIN + [resume, "checkpoint.interval=0"])
    want = {r["step"]: r for r in read_records(one_process["chain"])}
    legs = [(tp_runs / "chain_fsdp4", 1, CHAIN_FIRST), (tp_runs / "chain_tp", CHAIN_FIRST + 1, CHAIN_SECOND), (last, CHAIN_SECOND + 1, 12)]
    chain = [r for run, first, end in legs for r in read_records(run) if first <= r["step"] <= end]
    assert sorted(r["step"] for r in chain if "loss" in r) == list(range(1, 13))
    assert_records_match([r for r in chain if "loss" in r], [want[s] for s in range(1, 13)],
                         ["loss", "grad_norm"], rel=1e-5, abs=1e-5)  # fmt: skip


@pytest.mark.slow
def test_export_from_a_tp_checkpoint_equals_export_from_one_process(tp_runs, one_process, tmp_path):
    from snoo_train.export import main as export_main

    step = f"checkpoints/step_{CHAIN_SECOND:08d}"
    export_main([str(tp_runs / "chain_tp" / step), str(tmp_path / "tp")])
    export_main([str(one_process["chain"] / step), str(tmp_path / "one")])
    got, want = (load_file(tmp_path / side / "model.safetensors") for side in ("tp", "one"))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


# -- config errors: before any process group, naming the key -------------------------------------


@pytest.mark.parametrize(
    ("overrides", "world_size", "message"),
    [
        (["parallel.tp=3"], 4, "parallel.tp=3 must divide the ranks of one replica"),
        (["parallel.tp=2", "parallel.replicas=2"], 2, "parallel.tp=2 must divide"),
        (["parallel.tp=8"], 8, "parallel.tp=8 must divide model.num_heads=4"),
        (["parallel.tp=4"], 4, "parallel.tp=4 must divide model.num_kv_heads=2"),
        (["parallel.tp=2", "model.intermediate_size=171"], 2, "model.intermediate_size=171"),
        (["parallel.tp=2", "trainer.batch_size=6", "trainer.grad_accum=2"], 4, "trainer.batch_size=6"),
        (["parallel.ep=2"], 2, "parallel.ep=2 needs a mixture-of-experts model"),
        (["model=moe_tiny", "parallel.ep=3"], 3, "parallel.ep=3 must divide model.num_experts=4"),
        (["model=moe_tiny", "parallel.ep=4"], 2, "parallel.ep=4 must divide the FSDP dimension"),
        (["model=moe_tiny", "parallel.ep=2", "parallel.tp=2"], 2, "parallel.ep=2 must divide the FSDP"),
        (["model=moe_tiny", "parallel.ep=2", "parallel.tp=2"], 4, "parallel.ep=2 with parallel.tp=2 is not supported"),
        (["model=moe_tiny", "parallel.ep=2", "parallel.replicas=2", "optim=adamw"], 4, "HSDP of expert-parallel"),
    ],
)
def test_sizes_that_do_not_divide_are_one_config_error(overrides, world_size, message):
    cfg = typed(["model=llama_tiny", "trainer.batch_size=8", *overrides])
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, world_size=world_size)
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_mesh_dims_name_every_dimension():
    assert mesh_dims(8, replicas=2, tp=2, ep=2) == {"replicate": 2, "shard": 2, "tp": 2}
    assert mesh_dims(4, ep=2) == {"shard": 4, "tp": 1}  # EP reads "tp" as the ranks sharing a batch
    assert mesh_dims(4) == {"shard": 4}
    assert mesh_dims(1) == {"shard": 1}


def test_tp_is_bitwise_invisible_on_one_rank():
    """tp=1 and world size 1: the model has no DTensor (the golden losses rely on it)."""
    model = parallelize(build_model(PRESETS["llama_tiny"], 257, seed=0), mesh=None, tp_mesh=None)
    assert not any(isinstance(p, DTensor) for p in model.parameters())
