"""Multi-replica DiLoCo (parallel.replicas > 1) on real gloo process groups, 2 replicas x 2 shards.

One spawn of 4 ranks trains every variant and saves what each rank saw; the tests below compare
those results with references computed here, in one process, from DESIGN.md section 2: R plain
models, each with its own AdamW on its replica's rows, whose pseudo-gradients are averaged by
hand before the Nesterov outer update.
"""

from __future__ import annotations

import copy
import os
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from snoo_train.config import Config, ConfigError, OptimConfig, validate_config
from snoo_train.dist import init_distributed
from snoo_train.models import PRESETS, build_model, materialize, parallelize
from snoo_train.optim import SNOO
from snoo_train.optim.build import build_optimizer, weight_decay_groups
from snoo_train.trainer import clip_grad_norm
from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]
VOCAB = 257
R, S = 2, 2  # replicas x shards per replica
K, STEPS, GLOBAL_BATCH, SEQ = 3, 7, 8, 16  # two outer steps, then stop in the middle of a cycle
LR, ETA, MU, CLIP = 1e-2, 0.7, 0.6, 1.0
ROWS_PER_RANK = GLOBAL_BATCH // (R * S)


def global_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]


def eval_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def inner_adamw(model) -> torch.optim.AdamW:
    # The trainer's two groups (decay / no decay): the outer step must still be ONE all-reduce.
    return torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=LR)


# -- collectives and the process group each one uses --------------------------------------------


def _group_ranks(func, args, kwargs) -> tuple[int, ...] | None:
    for a in [*args, *(kwargs or {}).values()]:
        if isinstance(a, torch.ScriptObject):  # eager c10d ops carry the ProcessGroup boxed
            try:
                return tuple(dist.get_process_group_ranks(dist.ProcessGroup.unbox(a)))
            except Exception:  # a boxed ReduceOp
                continue
        if isinstance(a, str) and func.namespace == "_c10d_functional":  # DTensor's: by name
            try:
                pg = dist.distributed_c10d._resolve_process_group(a)
            except Exception:
                continue
            return tuple(dist.get_process_group_ranks(pg))
    return None


class CollectiveRecorder(TorchDispatchMode):
    """Every c10d op (eager `dist.*`, FSDP2's and DTensor's functional ones) with the ranks of
    its process group."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...] | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            # Let DTensor run first (with this mode still active) and desugar into the
            # collectives it needs, e.g. the all-reduce of a norm: torch's CommDebugMode does so.
            return NotImplemented
        if func.namespace in ("c10d", "_c10d_functional") and func.overloadpacket.__name__ not in (
            "wait_tensor", "_wrap_tensor_autograd"
        ):
            self.ops.append((func.overloadpacket.__name__, _group_ranks(func, args, kwargs)))
        return func(*args, **(kwargs or {}))


# -- the distributed run -------------------------------------------------------------------------


def _reshard(model) -> None:
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _train_variant(rank: int, mesh, *, diloco: bool, snoo_kwargs: dict | None, record: bool = False,
                   resume_at: int | None = None) -> dict:  # fmt: skip
    """Train STEPS steps on this rank's rows; return what the tests compare."""
    model = build_model(PRESETS["llama_tiny"], VOCAB, seed=0, device="meta")
    parallelize(model, mesh=mesh, diloco=diloco)
    materialize(model, device="cpu", seed=0)
    opt = SNOO(inner_adamw(model), k=K, lr=ETA, momentum=MU, **snoo_kwargs) if snoo_kwargs is not None \
        else inner_adamw(model)  # fmt: skip
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)  # the loader's global slicing
    batches = global_batches()
    out: dict = {"losses": [], "ops": [], "grad_norms": []}
    saved = None
    step = 0
    while step < STEPS:
        step += 1
        ids = batches[step - 1][rows]
        phases: dict[str, list] = {}
        recorder = CollectiveRecorder() if record else None
        with recorder or nullcontext():
            loss = loss_of(model, ids)
            loss.backward()
        if record:
            phases["fwd_bwd"] = recorder.ops
            recorder = CollectiveRecorder()
        with recorder or nullcontext():
            out["grad_norms"].append(float(clip_grad_norm(model.parameters(), CLIP)))
        if record:
            phases["clip"] = recorder.ops
            recorder = CollectiveRecorder()
        with recorder or nullcontext():
            opt.step()
        if record:
            phases["step"] = recorder.ops
            phases["outer"] = bool(getattr(opt, "outer_step_taken", False))
            out["ops"].append(phases)
        opt.zero_grad()
        out["losses"].append(loss.item())
        if resume_at is not None and step == resume_at and saved is None:
            # Mid-cycle snapshot: weights and optimizer state; train on, then rewind to here.
            saved = (step, [p.to_local().detach().clone() for p in model.parameters()],
                     copy.deepcopy(opt.state_dict()), list(out["losses"]))  # fmt: skip
        if resume_at is not None and step == STEPS and "first_pass" not in out:
            out["first_pass"] = {n: _full(p) for n, p in model.named_parameters()}
            step, local_params, state_dict, out["losses"] = saved
            with torch.no_grad():
                for p, saved_p in zip(model.parameters(), local_params):
                    p.to_local().copy_(saved_p)
            opt.load_state_dict(state_dict)

    out["params"] = {n: _full(p) for n, p in model.named_parameters()}
    if isinstance(opt, SNOO):
        out["slow"] = {n: _full(opt.state[p]["snoo_slow"]) for n, p in model.named_parameters()}
        out["momentum"] = {n: _full(opt.state[p]["snoo_momentum"]) for n, p in model.named_parameters()}
        out["metrics"] = opt.outer_metrics()
        p0 = next(model.parameters())
        slow0 = opt.state[p0]["snoo_slow"]
        out["state_layout"] = {
            "dtensor": isinstance(slow0, DTensor),
            "same_mesh": isinstance(slow0, DTensor) and slow0.device_mesh == p0.device_mesh
            and slow0.placements == p0.placements,
            "device": str(slow0.to_local().device if isinstance(slow0, DTensor) else slow0.device),
            "aliases_param": slow0.to_local().data_ptr() == p0.to_local().data_ptr(),
        }  # fmt: skip
        # Evaluation at the slow weights, mid-cycle (fast weights differ between replicas).
        model.eval()
        _reshard(model)
        with torch.no_grad(), opt.eval_parameters():
            out["eval_loss"] = loss_of(model, eval_batch()).item()
            out["eval_params"] = {n: _full(p) for n, p in model.named_parameters()}
        _reshard(model)
    out["placements"] = [str(p.placements) for p in model.parameters()][:1]
    out["mesh_ranks"] = next(model.parameters()).device_mesh.mesh.flatten().tolist()
    return out


def _all_variants(rank: int, world_size: int, out_dir: str) -> None:
    info = init_distributed("cpu", replicas=R)
    assert info.mesh.mesh_dim_names == ("replicate", "shard") and info.mesh.shape == (R, S)
    assert info.replica == rank // S
    assert dist.get_process_group_ranks(info.replicate_group) == [rank % S + S * r for r in range(R)]
    assert info.shard_mesh.mesh.tolist() == [info.replica * S + s for s in range(S)]
    group = info.replicate_group
    results = {
        "fp32": _train_variant(rank, info.mesh, diloco=True, snoo_kwargs={"replicate_group": group},
                               record=True),
        "bf16": _train_variant(rank, info.mesh, diloco=True,
                               snoo_kwargs={"replicate_group": group, "reduce_dtype": torch.bfloat16}),
        "cpu_state": _train_variant(rank, info.mesh, diloco=True,
                                    snoo_kwargs={"replicate_group": group, "state_device": "cpu"},
                                    resume_at=4),
        # HSDP (parallel.replicas=2, optim.outer=none): plain AdamW with gradients averaged
        # across the replicas every step.
        "hsdp_adamw": _train_variant(rank, info.mesh, diloco=False, snoo_kwargs=None, record=True),
    }  # fmt: skip
    # One replica: a (1, 4) mesh whose replicate group has one rank, against SNOO on a 1-D mesh.
    one = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("replicate", "shard"))
    results["one_replica"] = _train_variant(
        rank, one, diloco=True, snoo_kwargs={"replicate_group": one.get_group("replicate")}, record=True
    )
    flat = init_device_mesh("cpu", (world_size,), mesh_dim_names=("shard",))
    results["snoo"] = _train_variant(rank, flat, diloco=False, snoo_kwargs={})
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("diloco")
    run_distributed(_all_variants, R * S, str(out_dir))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(R * S)]


# -- the single-process references ---------------------------------------------------------------


def _clipped_step(model, opt, ids, grad_norms: list | None = None) -> float:
    loss = loss_of(model, ids)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    if grad_norms is not None:
        grad_norms.append(norm.item())
    opt.step()
    opt.zero_grad()
    return loss.item()


def reference_diloco() -> dict:
    """R plain models, each with its own AdamW on its replica's rows; every K steps the
    pseudo-gradients w - p_r are averaged by hand and the Nesterov update of DESIGN.md applied."""
    models = [build_model(PRESETS["llama_tiny"], VOCAB, seed=0) for _ in range(R)]
    opts = [inner_adamw(m) for m in models]
    names = [n for n, _ in models[0].named_parameters()]
    slow = [p.detach().clone() for p in models[0].parameters()]
    buf = [torch.zeros_like(w) for w in slow]
    losses = [[] for _ in range(R)]
    grad_norms = [[] for _ in range(R)]
    last_s: list[torch.Tensor] = []
    per_replica = GLOBAL_BATCH // R
    for t, ids in enumerate(global_batches(), start=1):
        for r in range(R):
            rows = ids[r * per_replica:(r + 1) * per_replica]
            losses[r].append(_clipped_step(models[r], opts[r], rows, grad_norms[r]))
        if t % K == 0:
            with torch.no_grad():
                params = [list(m.parameters()) for m in models]
                last_s = []
                for i, (w, b) in enumerate(zip(slow, buf)):
                    s = sum(w - params[r][i] for r in range(R)) / R
                    b.mul_(MU).add_(s)
                    w.sub_(ETA * (s + MU * b))
                    for r in range(R):
                        params[r][i].copy_(w)
                    last_s.append(s)
    with torch.no_grad():
        evaluator = build_model(PRESETS["llama_tiny"], VOCAB, seed=0)
        for p, w in zip(evaluator.parameters(), slow):
            p.copy_(w)
        eval_loss = loss_of(evaluator.eval(), eval_batch()).item()
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "params": [dict(zip(names, (p.detach() for p in m.parameters()))) for m in models],
        "slow": dict(zip(names, slow)),
        "momentum": dict(zip(names, buf)),
        "metrics": {
            "snoo/pseudo_grad_norm": torch.cat([s.flatten() for s in last_s]).norm().item(),
            "snoo/slow_weight_norm": torch.cat([w.flatten() for w in slow]).norm().item(),
        },
        "eval_loss": eval_loss,
    }


def reference_adamw() -> dict:
    model = build_model(PRESETS["llama_tiny"], VOCAB, seed=0)
    opt = inner_adamw(model)
    losses = [_clipped_step(model, opt, ids) for ids in global_batches()]
    return {"losses": losses, "params": {n: p.detach() for n, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def ref() -> dict:
    return reference_diloco()


def replica_losses(runs: list[dict], variant: str, replica: int) -> list[float]:
    """A replica's loss per step: the mean of its shards' losses (equal rows per shard)."""
    shards = [runs[replica * S + s][variant]["losses"] for s in range(S)]
    return [sum(v) / S for v in zip(*shards)]


# Sharded vs single-process AdamW: almost every element agrees within 1e-6, but an element with
# a near-zero gradient has Adam's m / sqrt(v) made of rounding noise and can move ~1e-5 (seen:
# 1.25e-5 in one of 111k). Mistakes are far larger: mid-cycle the two replicas differ by ~2e-2.
ATOL = 3e-5


def assert_params(got: dict, want: dict, tol: float = ATOL, what: str = "") -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5 if tol else 0, atol=tol, msg=f"{what} {name}")


# -- the tests -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_diloco_matches_hand_averaged_replicas(runs, ref):
    for rank, run in enumerate(runs):
        replica = rank // S
        out = run["fp32"]
        assert out["mesh_ranks"] == [replica * S + s for s in range(S)]  # sharded within the replica
        assert out["placements"] == ["(Shard(dim=0),)"]
        assert_params(out["params"], ref["params"][replica], what=f"rank {rank} fast")
        assert_params(out["slow"], ref["slow"], what=f"rank {rank} slow")
        assert_params(out["momentum"], ref["momentum"], what=f"rank {rank} momentum")
        for key, value in ref["metrics"].items():
            assert out["metrics"][key] == pytest.approx(value, rel=1e-5), key
    for replica in range(R):
        assert replica_losses(runs, "fp32", replica) == pytest.approx(ref["losses"][replica], abs=1e-5)
    # Gradient clipping is replica-local: each replica clips with its own gradients' norm.
    for rank, run in enumerate(runs):
        assert run["fp32"]["grad_norms"] == pytest.approx(ref["grad_norms"][rank // S], rel=1e-5)
    assert ref["grad_norms"][0] != pytest.approx(ref["grad_norms"][1], rel=1e-3)
    # Mid-cycle the replicas' fast weights have drifted apart (they really train independently).
    diff = max((ref["params"][0][n] - ref["params"][1][n]).abs().max().item() for n in ref["slow"])
    assert diff > 100 * ATOL


@pytest.mark.slow
def test_evaluation_at_slow_weights_is_identical_on_every_replica(runs, ref):
    eval_losses = [run["fp32"]["eval_loss"] for run in runs]
    assert len(set(eval_losses)) == 1, eval_losses  # bitwise: the same slow weights everywhere
    assert eval_losses[0] == pytest.approx(ref["eval_loss"], abs=1e-5)
    for run in runs:
        assert_params(run["fp32"]["eval_params"], ref["slow"], what="eval")
        assert_params(run["fp32"]["eval_params"], runs[0]["fp32"]["eval_params"], tol=0, what="eval")


@pytest.mark.slow
def test_replicas_talk_only_at_outer_steps_in_one_all_reduce(runs):
    for rank, run in enumerate(runs):
        replica_ranks = tuple(rank // S * S + s for s in range(S))
        replicate_ranks = tuple(rank % S + S * r for r in range(R))
        steps = run["fp32"]["ops"]
        assert [s["outer"] for s in steps] == [t % K == 0 for t in range(1, STEPS + 1)]
        for t, phases in enumerate(steps, start=1):
            # Forward/backward (FSDP's all-gathers, reduce-scatters) and clipping's norm: inside
            # the replica only.
            assert phases["fwd_bwd"], "the recorder saw no FSDP collective"
            assert {g for _, g in phases["fwd_bwd"]} == {replica_ranks}, (t, phases["fwd_bwd"])
            assert [g for _, g in phases["clip"]] == [replica_ranks], (t, phases["clip"])
            if phases["outer"]:
                assert phases["step"] == [("allreduce_", replicate_ranks)], (t, phases["step"])
            else:
                assert phases["step"] == [], (t, phases["step"])


@pytest.mark.slow
def test_one_replica_is_exactly_snoo(runs):
    for run in runs:
        one, snoo = run["one_replica"], run["snoo"]
        assert one["losses"] == snoo["losses"]
        assert_params(one["params"], snoo["params"], tol=0)
        assert_params(one["slow"], snoo["slow"], tol=0)
        assert all(phases["step"] == [] for phases in one["ops"])  # no collective at all


@pytest.mark.slow
def test_bf16_all_reduce_is_close_to_fp32(runs, ref):
    for run in runs:
        bf16, fp32 = run["bf16"], run["fp32"]
        # s rounded to bf16 (8 bits of mantissa) moves w by eta * (1 + mu) * |s| * 2^-8 at most
        assert_params(bf16["slow"], fp32["slow"], tol=2e-3, what="bf16 slow")
        assert bf16["losses"] == pytest.approx(fp32["losses"], abs=1e-3)
    diff = max((runs[0]["bf16"]["slow"][n] - runs[0]["fp32"]["slow"][n]).abs().max().item() for n in ref["slow"])
    assert diff > 0, "the bf16 all-reduce rounded nothing: was it used?"


@pytest.mark.slow
def test_cpu_state_matches_and_resumes_from_a_state_dict(runs):
    for run in runs:
        cpu, fp32 = run["cpu_state"], run["fp32"]
        assert cpu["state_layout"] == {"dtensor": True, "same_mesh": True, "device": "cpu", "aliases_param": False}
        # Trained to the end, rewound to step 4 from state_dict(), trained to the end again.
        assert_params(cpu["first_pass"], cpu["params"], tol=0, what="resumed")
        assert cpu["losses"] == fp32["losses"]
        assert_params(cpu["params"], fp32["params"], tol=0)
        assert_params(cpu["slow"], fp32["slow"], tol=0)


@pytest.mark.slow
def test_hsdp_with_adamw_equals_one_process_on_the_global_batch(runs):
    want = reference_adamw()
    for rank, run in enumerate(runs):
        out = run["hsdp_adamw"]
        assert out["placements"] == ["(Replicate(), Shard(dim=0))"]
        assert_params(out["params"], want["params"], what=f"rank {rank} hsdp")
        # Every step: gradients cross replicas (HSDP), unlike DiLoCo.
        assert all(
            any(g == tuple(range(rank % S, R * S, S)) for _, g in phases["fwd_bwd"]) for phases in out["ops"]
        )
    mean = [sum(v) / (R * S) for v in zip(*(run["hsdp_adamw"]["losses"] for run in runs))]
    assert mean == pytest.approx(want["losses"], abs=1e-5)


# -- single process: options, config -------------------------------------------------------------


def test_cpu_state_round_trips_through_state_dict_single_process():
    model = build_model(PRESETS["llama_tiny"], VOCAB, seed=0)
    opt = SNOO(inner_adamw(model), k=2, state_device="cpu")
    ids = eval_batch()
    loss_of(model, ids).backward()
    opt.step()
    p = next(model.parameters())
    slow = opt.state[p]["snoo_slow"]
    assert slow.device.type == "cpu" and slow.data_ptr() != p.data_ptr()
    sd = copy.deepcopy(opt.state_dict())
    assert "snoo_slow" in sd["state"][0] and "snoo_momentum" in sd["state"][0]
    opt2 = SNOO(inner_adamw(model), k=2, state_device="cpu")
    opt2.load_state_dict(sd)
    torch.testing.assert_close(opt2.state[p]["snoo_slow"], slow, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"reduce_dtype": torch.int8}, "reduce_dtype"), ({"reduce_dtype": "bf16"}, "reduce_dtype"),
     ({"state_device": "meta"}, "state_device")],
)  # fmt: skip
def test_invalid_options_name_the_argument(kwargs, name):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        SNOO(torch.optim.AdamW(model.parameters()), **kwargs)


def test_build_optimizer_passes_the_options():
    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(outer="snoo", outer_reduce_dtype="bf16", outer_state_device="cpu")
    opt = build_optimizer(model, cfg, replicate_group=None)
    assert isinstance(opt, SNOO) and opt.reduce_dtype == torch.bfloat16
    assert opt.state_device == torch.device("cpu") and opt.replicate_group is None


@pytest.mark.parametrize(
    "changes, world_size, match",
    [
        ({"replicas": 3}, 4, r"parallel\.replicas=3 .*world size 4"),
        ({"replicas": 0}, 4, r"parallel\.replicas=0"),
        ({"replicas": 2}, 1, r"parallel\.replicas=2 .*world size 1"),
        ({"outer_reduce_dtype": "fp16"}, 1, r"optim\.outer_reduce_dtype"),
        ({"outer_state_device": "gpu"}, 1, r"optim\.outer_state_device"),
    ],
)
def test_config_validation_names_the_key(changes, world_size, match):
    cfg = Config()
    cfg.trainer.batch_size = 16
    for key, value in changes.items():
        setattr(cfg.parallel if key == "replicas" else cfg.optim, key, value)
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg, world_size=world_size)


def test_config_accepts_diloco_and_hsdp():
    for outer in ("snoo", "none"):
        cfg = Config()
        cfg.optim.outer, cfg.parallel.replicas = outer, 2
        validate_config(cfg, world_size=4)


# -- end to end ----------------------------------------------------------------------------------
# The end-to-end torchrun run of 2 replicas x 2 shards (and its exact resume) is
# tests/test_checkpoint.py::test_diloco_two_replicas_resume_exactly_and_export; a replica count
# that does not divide the world is tested at the entry point (tests/test_configs.py).
