"""Pipeline parallelism on real gloo process groups (world size 4), against one process.

One spawn of 4 ranks trains every case through the real Trainer; the tests compare what it
wrote with single-process runs of the same configs made here (llama_tiny, untied embeddings):

* PP 2 x FSDP 2 and PP 2 x TP 2 with SNOO(AdamW) and SNOO(Muon): the same losses, gradient
  norms, weight norms and validation losses, step by step through two outer steps;
* the interleaved schedules (two stages per rank, two layers per stage): Interleaved1F1B and
  ZBVZeroBubble, whose split backward computes the weights' gradients in a pass of its own;
* every other optimizer of the family on PP 2 x FSDP 2 (GPipe under one of them);
* Mixtral: each stage adds its own layers' balancing loss, so the loss follows one process
  closely rather than exactly (the loss of a product over all layers is not a sum of stages);
  expert parallelism inside the stages (EP 2) equals FSDP inside them;
* DiLoCo's replicas around pipelines: 2 replicas x PP 2 equal 2 replicas x FSDP 2;
* on every rank, the optimizer state keeps each parameter's mesh and placements, and step()
  issues no collective (DiLoCo: only its all-reduce over the replicas, at outer steps).

Checkpoints across layouts and the non-finite agreement are in test_pipeline_checkpoint.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snoo_train.config import ConfigError
from snoo_train.models.pipeline import split_layers, stages_of_rank
from tests.conftest import make_config, read_records, run_trainer
from tests.dist_utils import build_layout, fit_layout, run_distributed, state_like_params
from tests.records import assert_records_match
from tests.test_diloco import CollectiveRecorder

WS = 4
UNTIED = ["model.tie_embeddings=false"]  # a pipeline holds the embedding and the head apart
PP, TP = ["parallel.pp=2"], ["parallel.tp=2"]
SHORT = ["trainer.max_steps=6"]  # one outer step (k=5) and the final one on the partial window
EIGHT = ["model.num_layers=8"]  # 2 ranks x 2 stages x 2 layers
CASES = {
    "fsdp_snoo_adamw": PP,
    "fsdp_snoo_muon": PP + ["optim=snoo_muon"],
    "tp_snoo_adamw": PP + TP,
    "tp_snoo_muon": PP + TP + ["optim=snoo_muon"],
    "interleaved_1f1b": PP + EIGHT + SHORT + ["parallel.pp_schedule=Interleaved1F1B"],
    "zbv_zero_bubble": PP + EIGHT + SHORT + ["parallel.pp_schedule=ZBVZeroBubble"],
    "gpipe_lookahead": PP + SHORT + ["parallel.pp_schedule=GPipe", "optim=lookahead_adamw"],
    "gpa": PP + SHORT + ["optim=gpa_adamw"],
    "ema_nesterov": PP + SHORT + ["optim=ema_nesterov_adamw"],
    "schedule_free": PP + SHORT + ["optim=schedule_free_adamw"],
    "muon": PP + SHORT + ["optim=muon"],
    "checkpointed": PP + SHORT + ["trainer.activation_checkpointing=true"],
    "moe": PP + SHORT + ["model=moe_tiny"],
}
# DiLoCo, k=3: outer steps 3 and 6; the reference is the same replicas without the pipeline.
DILOCO = ["parallel.replicas=2", "optim.k=3"] + SHORT
# Layouts compared with another layout of the same run (not with one process).
PAIRED = {"diloco_fsdp": DILOCO, "diloco_pp": DILOCO + PP, "moe_ep": CASES["moe"] + ["parallel.ep=2"]}
EXACT = ["loss", "grad_norm", "weight_norm", "val_loss", "snoo/pseudo_grad_norm"]


def _recorded_fit(run_dir: str, overrides: list[str]) -> dict:
    """fit_layout, with every optimizer.step() under a collective recorder; what this rank held."""
    trainer = build_layout(run_dir, UNTIED + overrides)
    step, ops = trainer.optimizer.step, []

    def recorded(*args, **kwargs):
        with CollectiveRecorder() as recorder:
            out = step(*args, **kwargs)
        ops.extend(recorder.ops)
        return out

    trainer.optimizer.step = recorded
    trainer.fit()
    return {
        "stages": list(trainer.stage_indices),
        "params": sorted(n for n, _ in trainer.model.named_parameters()),
        "state_like_params": state_like_params(trainer.optimizer, trainer.model.parameters()),
        "step_collectives": sorted({(name, tuple(ranks or ())) for name, ranks in ops}),
    }


def _all_cases(rank: int, world_size: int, out: str) -> None:
    held = {name: _recorded_fit(f"{out}/{name}", overrides) for name, overrides in CASES.items()}
    for name, overrides in PAIRED.items():
        fit_layout(f"{out}/{name}", UNTIED + overrides)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(held, f)


@pytest.fixture(scope="module")
def pp_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pp")
    run_distributed(_all_cases, WS, str(out))
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pp_ref")
    runs = {}
    for name, overrides in CASES.items():
        runs[name] = root / name
        run_trainer(runs[name], UNTIED + [o for o in overrides if not o.startswith("parallel.")])
    return runs


def _held(pp_runs: Path, rank: int) -> dict:
    return json.loads((pp_runs / f"rank{rank}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c != "moe"])
def test_pipeline_matches_one_process(pp_runs, one_process, case):
    got, want = read_records(pp_runs / case), read_records(one_process[case])
    steps = 6 if "trainer.max_steps=6" in CASES[case] else 12
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    keys = [k for k in EXACT if any(k in r for r in want)]
    assert {"loss", "grad_norm", "weight_norm", "val_loss"} <= set(keys)
    assert_records_match(got, want, keys, rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_moe_pipeline_follows_one_process(pp_runs, one_process):
    got, want = read_records(pp_runs / "moe"), read_records(one_process["moe"])
    # Each stage's balancing loss is transformers' formula over its own layers, weighted by
    # their share: equal to the whole model's for balanced routers, close otherwise.
    assert_records_match(got, want, ["loss", "val_loss", "weight_norm"], rel=1e-3)
    assert_records_match(got, want, ["grad_norm"], rel=2e-2)
    assert_records_match(got, want, ["moe/aux_loss"], rel=5e-2)  # seen: 2.4e-2
    # The expert loads of both layers (one per stage) reach the log: equal to one process's at
    # step 1 (same weights, same tokens); the routers then train under a different balancing
    # gradient (per stage), and drift apart (seen: 0.2 by step 6).
    logged = [(a, b) for a, b in zip(got, want) if "moe/layer0/load" in b]
    assert [a["step"] for a, _ in logged] == [r["step"] for r in want if "moe/layer0/load" in r] and logged
    for a, b in logged:
        for key in ("moe/layer0/load", "moe/layer1/load"):
            assert sum(a[key]) == pytest.approx(1.0, abs=1e-5), (a["step"], key)
            if a["step"] == 1:
                assert a[key] == pytest.approx(b[key], abs=1e-6), key


@pytest.mark.slow
def test_expert_parallel_stages_equal_fsdp_stages(pp_runs):
    got, want = read_records(pp_runs / "moe_ep"), read_records(pp_runs / "moe")
    assert_records_match(got, want, ["loss", "grad_norm", "weight_norm", "val_loss", "moe/aux_loss"], rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_diloco_replicas_around_pipelines_equal_replicas_without(pp_runs):
    got, want = read_records(pp_runs / "diloco_pp"), read_records(pp_runs / "diloco_fsdp")
    keys = [k for k in EXACT if any(k in r for r in want)]
    assert "snoo/pseudo_grad_norm" in keys
    assert_records_match(got, want, keys, rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_each_rank_holds_its_stages_and_the_optimizer_state_follows_the_parameters(pp_runs):
    for rank in range(WS):
        held = _held(pp_runs, rank)
        pp_rank = rank // 2  # mesh (pp, shard): ranks 0, 1 hold stage 0
        assert held["fsdp_snoo_adamw"]["stages"] == [pp_rank]
        assert held["interleaved_1f1b"]["stages"] == [pp_rank, pp_rank + 2]
        assert held["zbv_zero_bubble"]["stages"] == [pp_rank, 3 - pp_rank]  # the V: rank 0 has first and last
        first = "model.embed_tokens.weight" in held["fsdp_snoo_adamw"]["params"]
        last = "lm_head.weight" in held["fsdp_snoo_adamw"]["params"]
        assert (first, last) == (pp_rank == 0, pp_rank == 1)
        layers = {n.split(".")[2] for n in held["zbv_zero_bubble"]["params"] if n.startswith("model.layers.")}
        assert layers == ({"0", "1", "6", "7"} if pp_rank == 0 else {"2", "3", "4", "5"})
        stage_ranks = {2 * pp_rank, 2 * pp_rank + 1}
        for case, h in held.items():
            assert h["state_like_params"], (rank, case)
            if "muon" in case:  # Muon gathers each matrix within its stage's shard group, never across stages
                assert h["step_collectives"] and all(set(r) <= stage_ranks for _, r in h["step_collectives"]), case
            else:
                assert h["step_collectives"] == [], (rank, case, h["step_collectives"])


def test_split_layers_and_stage_placement():
    assert split_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert split_layers(5, 2, [3, 2]) == [[0, 1, 2], [3, 4]]
    assert split_layers(3, 2, [0, 3]) == [[], [0, 1, 2]]
    # Loop placement (1F1B, interleaved): stage s on rank s mod P; V placement for ZBV.
    assert [stages_of_rank(r, 4, 2, "Interleaved1F1B") for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [stages_of_rank(r, 4, 2, "ZBVZeroBubble") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert stages_of_rank(1, 2, 1, "1F1B") == [1]


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.pp=2"], 4, "parallel.pp=2 needs model.tie_embeddings=false"),
        (UNTIED + ["parallel.pp=3"], 4, r"parallel.pp=3 must divide world"),
        (UNTIED + ["parallel.pp=2", "model.num_layers=3"], 4, r"2 stages must divide model.num_layers=3"),
        (UNTIED + ["parallel.pp=2", "parallel.pp_layers_per_stage=[2,2]"], 4, r"parallel.pp_layers_per_stage=\[2, 2\]"),
        (UNTIED + ["parallel.pp=2", "parallel.pp_microbatches=3"], 4, r"parallel.pp_microbatches=3 must divide"),
        (UNTIED + ["parallel.pp=2", "parallel.pp_microbatches=1"], 2, r"must be at least parallel.pp=2"),
        (UNTIED + ["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_layers_per_stage=[1,1]"], 2,
         r"parallel.pp_schedule=Interleaved1F1B runs two or more stages per rank"),
        (UNTIED + ["parallel.pp=2", "parallel.pp_schedule=ZB"], 2, r"parallel.pp_schedule"),
        (UNTIED + ["parallel.pp=2", "trainer.grad_accum=2"], 2, r"trainer.grad_accum=2 with parallel.pp=2"),
        (UNTIED + ["parallel.pp_microbatches=4"], 2, r"need parallel.pp > 1"),
    ],
)  # fmt: skip
def test_pipeline_sizes_that_do_not_fit_name_the_key(tmp_path, overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, overrides, world_size=world)
