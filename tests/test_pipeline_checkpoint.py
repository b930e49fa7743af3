"""Pipeline parallelism and checkpoints (issue 24), on real gloo process groups (world size 4),
against one process.

One spawn of 4 ranks trains a chain of layouts, each resuming the previous one's checkpoint:
PP 2 x FSDP 2 (the first stage holding only the embedding) -> FSDP 4 -> PP 2 x TP 2 -> PP 2 x
FSDP 2; its metrics (loss, LR, gradient and weight norms, SNOO's outer norms) must continue the
uninterrupted one-process run, its checkpoints must list every parameter in its param group, and
a pipelined checkpoint must export the same model as the one-process checkpoint of that step. A second spawn makes the loss non-finite on the last stage
only: every rank must stop with the same error, or skip the same steps, as one process does.
"""

from __future__ import annotations

import faulthandler
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from snoo_train.checkpoint import read_state
from snoo_train.trainer.state import merge_param_groups
from tests.conftest import poison_losses, read_records, run_trainer
from tests.dist_utils import fit_layout, run_distributed
from tests.records import assert_records_match

WS = 4
STEPS, K = 8, 3  # SNOO's outer steps at 3 and 6, and the final one on the partial window at 8
# Each leg stops at its own trainer.max_steps, which a decaying schedule reads: a constant one,
# warmed up over the whole run so that the LR still moves after every resume (a scheduler that
# resumed with another rank's param groups would leave some group's LR behind).
COMMON = [
    "model.tie_embeddings=false", "trainer.lr_schedule=constant", f"trainer.warmup_steps={STEPS}",
    f"optim.k={K}", "checkpoint.keep_latest=0",
]  # fmt: skip
# The first stage holds only the embedding: one param group (no weight decay) where the other
# stage and the whole model have two, so the saved groups must be merged by what they are.
PP_FSDP = ["parallel.pp=2", "parallel.pp_layers_per_stage=[0,2]"]
FSDP4, PP_TP = [], ["parallel.pp=2", "parallel.tp=2"]
# (run, layout, the step its checkpoint hands on): each leg resumes the previous leg's checkpoint
# and runs one step past its own, whose checkpoint at max_steps would hold SNOO's flush (an
# outer step on the partial window) that an unbroken run never takes. Steps 2, 4 and 5 are
# mid-cycle: the slow weights differ from the fast ones.
LEGS = [("pp_fsdp", PP_FSDP, 2), ("fsdp4", FSDP4, 4), ("pp_tp", PP_TP, 5), ("pp_fsdp_again", PP_FSDP, STEPS)]
COMPARED = ["loss", "lr", "grad_norm", "weight_norm", "val_loss"]
# Logged from the last outer step on; a resumed run has them again from its first outer step.
OUTER = ["snoo/pseudo_grad_norm", "snoo/slow_weight_norm"]


def test_param_groups_of_pipeline_stages_merge_by_what_they_are():
    """Plain math: the merged groups name every parameter once, each under its own stage's
    hyper-parameters, whatever position the group had on its stage."""
    decay, no_decay = {"lr": 1e-3, "weight_decay": 0.1}, {"lr": 1e-3, "weight_decay": 0.0}
    embedding_only = [{**no_decay, "params": ["embed"]}]
    last = [{**decay, "params": ["layer.w", "head"]}, {**no_decay, "params": ["layer.norm", "norm"]}]
    # Two ranks per stage (FSDP or TP) hold the same names.
    merged = merge_param_groups([embedding_only, embedding_only, last, last])
    assert merged == [
        {**no_decay, "params": ["embed", "layer.norm", "norm"]},
        {**decay, "params": ["layer.w", "head"]},
    ]
    # Groups with equal hyper-parameters on one stage stay apart, matched by their order.
    twins = [{**no_decay, "params": ["a"]}, {**no_decay, "params": ["b"]}]
    assert merge_param_groups([twins, [{**no_decay, "params": ["c"]}]]) == [
        {**no_decay, "params": ["a", "c"]}, {**no_decay, "params": ["b"]},
    ]  # fmt: skip


def _chain(rank: int, world_size: int, out: str) -> None:
    resume: list[str] = []
    for name, layout, handover in LEGS:
        end = handover if handover == STEPS else handover + 1
        fit_layout(f"{out}/{name}", COMMON + layout + resume + [
            f"trainer.max_steps={end}", f"checkpoint.interval={handover}",
        ])  # fmt: skip
        resume = [f"trainer.resume={out}/{name}/checkpoints/step_{handover:08d}"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pp_chain")
    run_distributed(_chain, WS, str(out))
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The uninterrupted run in one process, with checkpoints at 5 (mid-cycle) and 8 (final)."""
    run_dir = tmp_path_factory.mktemp("pp_one") / "run"
    run_trainer(run_dir, COMMON + [f"trainer.max_steps={STEPS}", "checkpoint.interval=5"])
    return run_dir


@pytest.mark.slow
def test_checkpoints_move_pp_fsdp_to_fsdp4_to_pp_tp_and_back(chain, one_process):
    """Each layout resumes the previous one's checkpoint and continues the one-process run."""
    want = {r["step"]: r for r in read_records(one_process)}
    got, first = [], 1
    for name, _, handover in LEGS:
        records = {r["step"]: r for r in read_records(chain / name)}
        assert min(records) == first, (name, sorted(records))  # resumed where the last leg saved
        got += [records[s] for s in range(first, handover + 1)]
        first = handover + 1
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["step"] for r in got if "val_loss" in r] == [6, STEPS]
    assert_records_match(got, [want[s] for s in range(1, STEPS + 1)], COMPARED, rel=1e-5, abs=1e-5)
    outer = [r for r in got if OUTER[0] in r]
    assert {3, 6} <= {r["step"] for r in outer}
    assert_records_match(outer, [want[r["step"]] for r in outer], OUTER, rel=1e-5, abs=1e-5)


def _saved_param_groups(ckpt: Path) -> dict[float, set[str]]:
    """A checkpoint's optimizer param groups: weight decay -> the parameter names."""
    groups: dict[int, dict] = {}
    for path, value in read_state(ckpt)["plain"]:
        if path[:2] == ["optim", "param_groups"]:
            groups.setdefault(path[2], {})[path[3]] = value
    return {g["weight_decay"]: set(g["params"]) for g in groups.values()}


@pytest.mark.slow
def test_a_pipelined_checkpoint_lists_every_parameter_in_its_group(chain, one_process):
    want = _saved_param_groups(one_process / "checkpoints" / "step_00000005")
    assert len(want) == 2 and "model.embed_tokens.weight" in want[0.0] and "lm_head.weight" in want[0.1]
    for name, _, handover in LEGS[:-1]:
        assert _saved_param_groups(chain / name / "checkpoints" / f"step_{handover:08d}") == want, name


@pytest.mark.slow
@pytest.mark.parametrize("leg, step", [("pp_tp", 5), ("pp_fsdp_again", STEPS)], ids=["pp_tp_mid_cycle", "pp_fsdp_final"])
def test_export_of_a_pipelined_checkpoint_equals_one_process(chain, one_process, tmp_path, leg, step):
    from snoo_train.export import main as export_main

    ckpt = f"checkpoints/step_{step:08d}"
    export_main([str(chain / leg / ckpt), str(tmp_path / "pp")])
    export_main([str(one_process / ckpt), str(tmp_path / "one")])
    assert sorted(p.name for p in (tmp_path / "pp").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    got, want = (load_file(tmp_path / side / "model.safetensors") for side in ("pp", "one"))
    assert got.keys() == want.keys() and "lm_head.weight" in want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


# -- a non-finite loss on the last stage only ------------------------------------------------------

BAD = 3  # an outer step: under skip SNOO's outer step is dropped with it
NONFINITE = COMMON + PP_FSDP + ["trainer.max_steps=5", "checkpoint.interval=0"]


def _nonfinite(rank: int, world_size: int, out: str) -> None:
    from snoo_train.dist import init_distributed
    from snoo_train.trainer import TrainingDiverged

    faulthandler.dump_traceback_later(240, exit=True)  # a rank left waiting fails, not hangs
    last_stage = init_distributed("cpu", pp=2).pp_rank == 1
    outcomes = {}
    for policy in ("stop", "skip"):
        with pytest.MonkeyPatch.context() as mp:
            if last_stage:  # the only ranks that compute the loss
                poison_losses(mp, {BAD})
            try:
                trainer = fit_layout(f"{out}/{policy}", NONFINITE + [f"trainer.nonfinite={policy}"])
                outcomes[policy] = ["done", trainer.step, trainer.policy.skipped_steps]
            except TrainingDiverged as e:
                outcomes[policy] = ["TrainingDiverged", str(e)]
    faulthandler.cancel_dump_traceback_later()
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(outcomes))


@pytest.fixture(scope="module")
def nonfinite(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("pp_nonfinite")
    run_distributed(_nonfinite, WS, str(out))
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WS)]


def _one_process_nonfinite(run_dir: Path, policy: str) -> list:
    from snoo_train.trainer import TrainingDiverged

    with pytest.MonkeyPatch.context() as mp:
        poison_losses(mp, {BAD})
        overrides = [o for o in NONFINITE if not o.startswith("parallel.")] + [f"trainer.nonfinite={policy}"]
        try:
            trainer = run_trainer(run_dir, overrides)
        except TrainingDiverged as e:
            return ["TrainingDiverged", str(e)]
    return ["done", trainer.step, trainer.policy.skipped_steps]


@pytest.mark.slow
def test_nonfinite_loss_on_the_last_stage_stops_every_rank_alike(nonfinite, tmp_path):
    _, outcomes = nonfinite
    want = _one_process_nonfinite(tmp_path / "one", "stop")
    assert want[0] == "TrainingDiverged" and f"at step {BAD}" in want[1]
    assert [o["stop"] for o in outcomes] == [want] * WS


@pytest.mark.slow
def test_nonfinite_loss_on_the_last_stage_is_skipped_by_every_rank_alike(nonfinite, tmp_path):
    out, outcomes = nonfinite
    want = _one_process_nonfinite(tmp_path / "one", "skip")
    assert want == ["done", 5, 1]
    assert [o["skip"] for o in outcomes] == [want] * WS
    got, ref = read_records(out / "skip"), read_records(tmp_path / "one")
    assert_records_match(got, ref, ["weight_norm", "skipped_steps"], rel=1e-5, abs=1e-5)
    # The skipped step logs no loss or gradient norm (JSON null), and the outer step due on it was
    # dropped with it: no outer norms until the final one at step 5, as in one process.
    for key in ("loss", "grad_norm"):
        assert [r["step"] for r in got if r[key] is None] == [BAD], key
    assert [r["step"] for r in got if r.get(OUTER[0]) is not None] == [r["step"] for r in ref if r.get(OUTER[0]) is not None] == [5]
    good = [[r for r in records if r["step"] in (1, 2, 4, 5)] for records in (got, ref)]
    assert_records_match(*good, ["loss", "grad_norm"], rel=1e-5, abs=1e-5)
    assert_records_match(good[0][-1:], good[1][-1:], OUTER, rel=1e-5, abs=1e-5)
