"""Quantized outer sync with error feedback (issue 23 part 3; snoo_train/optim/outer_quant.py).

Each codec is checked against its formula written here (absmax scale per 128-value block,
round-to-nearest codes, int4 two per byte). One spawn of 4 gloo ranks then runs SNOO on
2 replicas x 2 shards and on 4 replicas x 1, for every codec with and without error feedback,
against a hand computation from every replica's pseudo-gradients (each rank recomputes them
all from seeds), checks that every replica holds bitwise the same slow weights, that a
non-finite replica drops the outer step with the residuals untouched, that error feedback keeps
the sum of applied updates next to the unquantized sum, and, through Trainer.fit, that a run
resumed from a checkpoint with non-zero residuals repeats the uninterrupted run's losses bitwise,
and that a checkpoint without residuals loads with them at zero.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile

from snoo_train.config import ConfigError
from snoo_train.optim.outer_quant import BLOCK, CODECS, decode, encode, message_bytes, start_average
from snoo_train.optim.snoo import SNOO
from tests.conftest import make_config
from tests.dist_utils import fit_layout, run_distributed
from tests.test_host_sync import host_reads

WS = 4
QMAX = {"fp8": 448.0, "int8": 127.0, "int4": 7.0}  # the largest code magnitude, by definition
BITS = {"bf16": 16, "fp8": 8, "int8": 8, "int4": 4}
SHAPES = [(5, 40), (70,)]  # 200 and 70 values: whole and partial blocks
K, ETA, MU = 2, 0.7, 0.5
OUTER_STEPS = 3


# -- the formula, written out -------------------------------------------------------------------


def quantize_ref(codec: str, x: torch.Tensor) -> torch.Tensor:
    """deQ(Q(x)) for flat fp32 x, block by block: scale = max|x| / qmax, code = the nearest
    representable x / scale, value = code x scale (bf16: the nearest bf16)."""
    if codec == "bf16":
        return x.bfloat16().float()
    out = torch.empty_like(x)
    for start in range(0, x.numel(), BLOCK):
        block = x[start : start + BLOCK]
        scale = block.abs().max() / QMAX[codec]
        if scale == 0:
            out[start : start + BLOCK] = 0.0
            continue
        y = block / scale
        if codec == "fp8":
            code = y.to(torch.float8_e4m3fn).float()
        else:
            code = y.round().clamp(-QMAX[codec], QMAX[codec])
        out[start : start + BLOCK] = code * scale
    return out


def padded_ref(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    return torch.cat([flat, flat.new_zeros(-flat.numel() % BLOCK)])


def _blocks_of_many_scales(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    magnitudes = torch.tensor([1e-4, 1.0, 300.0, 0.0]).repeat_interleave(BLOCK).repeat(-(-n // (4 * BLOCK)))[:n]
    return torch.randn(n, generator=g) * magnitudes


@pytest.mark.parametrize("codec", list(CODECS))
def test_codec_matches_its_formula_and_error_bound(codec):
    n = 8 * BLOCK
    x = _blocks_of_many_scales(n, seed=1)
    message = torch.zeros(message_bytes(codec, n), dtype=torch.uint8)
    assert bool(encode(codec, x, message))
    got = decode(codec, message, n)
    want = quantize_ref(codec, x)
    assert torch.equal(got, want)
    # The round trip's error bound, block by block: half a code step for the integers, half a
    # mantissa step (3 bits fp8, 8 bits bf16) relative, or half the smallest fp8 subnormal step.
    for start in range(0, n, BLOCK):
        b, e = x[start : start + BLOCK], (got - x)[start : start + BLOCK].abs()
        amax = b.abs().max()
        if codec == "bf16":
            bound = b.abs() * 2.0**-8
        elif codec == "fp8":
            scale = amax / 448.0
            bound = torch.maximum(b.abs() * 2.0**-4, scale * 2.0**-10)
        else:
            bound = torch.full_like(b, float(amax / QMAX[codec] / 2))
        assert (e <= bound * (1 + 1e-6)).all(), (codec, start)
    assert (got[3 * BLOCK : 4 * BLOCK] == 0).all()  # a zero block stays zero (scale 0, no 0 / 0)


def test_message_sizes_and_int4_packing():
    n = 4 * BLOCK
    for codec, bits in BITS.items():
        scales = 0 if codec == "bf16" else 4 * (n // BLOCK)
        assert message_bytes(codec, n) == 4 * math.ceil((scales + n * bits // 8 + 1) / 4)
    # Codes -7..7 at scale 1 (the block's max is 7): byte i holds code 2i + 8 low, 2i+1 + 8 high.
    codes = torch.arange(n) % 15 - 7
    message = torch.zeros(message_bytes("int4", n), dtype=torch.uint8)
    encode("int4", codes.float(), message)
    assert (message[: 4 * (n // BLOCK)].view(torch.float32) == 1.0).all()
    packed = message[16 : 16 + n // 2].tolist()
    assert packed == [(int(codes[2 * i]) + 8) | ((int(codes[2 * i + 1]) + 8) << 4) for i in range(n // 2)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("codec", list(CODECS))
def test_a_non_finite_value_clears_the_local_flag(codec, bad):
    x = torch.randn(2 * BLOCK)
    x[BLOCK + 3] = bad
    message = torch.zeros(message_bytes(codec, x.numel()), dtype=torch.uint8)
    assert not bool(encode(codec, x, message))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"outer_quant": "int2", "replicate_group": object()}, "outer_quant must be"),
        ({"outer_quant": "int8"}, "needs a replicate_group"),
        ({"error_feedback": True}, "error_feedback needs outer_quant"),
        ({"outer_quant": "int8", "replicate_group": object(), "reduce_dtype": torch.bfloat16}, "pass one"),
    ],
)
def test_snoo_refuses_quantization_it_cannot_do(kwargs, match):
    inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match=match):
        SNOO(inner, **kwargs)


@pytest.mark.parametrize(
    "overrides, world_size, match",
    [
        (["optim.outer_quant=int3"], 2, r"optim\.outer_quant"),
        (["optim.outer_quant=int8"], 1, r"optim\.outer_quant=int8 .*parallel\.replicas=1"),
        (["parallel.replicas=2", "optim.error_feedback=true"], 2, r"optim\.error_feedback=true needs"),
        (["parallel.replicas=2", "optim.outer_quant=int8", "optim.outer_reduce_dtype=bf16"], 2,
         r"optim\.outer_reduce_dtype=bf16 and optim\.outer_quant=int8"),
    ],
)  # fmt: skip
def test_config_refuses_with_the_key(tmp_path, overrides, world_size, match):
    with pytest.raises(ConfigError, match=match):
        make_config(tmp_path, overrides, world_size=world_size)


def test_config_accepts_quantized_diloco(tmp_path):
    cfg = make_config(tmp_path, ["parallel.replicas=2", "optim.outer_quant=int4", "optim.error_feedback=true"],
                      world_size=4)  # fmt: skip
    assert cfg.optim.outer_quant == "int4" and cfg.optim.error_feedback is True


# -- the distributed runs: one spawn ------------------------------------------------------------


def _delta(replica: int, shard: int, step: int, shape: tuple, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * replica + 100 * shard + 10 * step + k)
    n = math.prod(shape)
    return (torch.randn(n, generator=g) * torch.logspace(-3, 0, n)).view(shape)


def _start(shard: int, shape: tuple, k: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(7 + 100 * shard + k))


def _reference(codec: str, ef: bool, replicas: int, shard: int, steps: int) -> dict:
    """Every replica's pseudo-gradients recomputed from the seeds, quantized by the formula,
    averaged in replica order; the slow weights moved by torch's SGD (Nesterov) with that grad."""
    w = [torch.nn.Parameter(_start(shard, s, k)) for k, s in enumerate(SHAPES)]
    sgd = torch.optim.SGD(w, lr=ETA, momentum=MU, nesterov=True)
    residual = {r: [torch.zeros(s) for s in SHAPES] for r in range(replicas)}
    history = []
    for outer in range(steps):
        avg = [torch.zeros(s) for s in SHAPES]
        for r in range(replicas):
            for k, shape in enumerate(SHAPES):
                fast = w[k].detach().clone()
                for inner in range(K):
                    fast = fast + _delta(r, shard, outer * K + inner, shape, k)
                x = (w[k].detach() - fast) + residual[r][k]
                q = quantize_ref(codec, padded_ref(x))[: x.numel()].view(shape)
                if ef:
                    residual[r][k] = x - q
                avg[k] += q
        for k, p in enumerate(w):
            p.grad = avg[k] / replicas
        sgd.step()
        history.append([p.detach().clone() for p in w])
    return {"slow": history, "residual": residual}


def _train_snoo(group, replica: int, shard: int, codec: str, ef: bool, steps: int, poison: dict | None = None):
    """SNOO(SGD lr=1) whose inner steps add the seeded deltas; `poison`: {outer index: ("nan" |
    "guard", replica)} makes that replica non-finite, or guard it False, at that outer step."""
    params = [torch.nn.Parameter(_start(shard, s, k)) for k, s in enumerate(SHAPES)]
    opt = SNOO(torch.optim.SGD(params, lr=1.0), k=K, lr=ETA, momentum=MU, replicate_group=group,
               outer_quant=codec, error_feedback=ef)  # fmt: skip
    seen = []
    for outer in range(steps):
        kind, bad = (poison or {}).get(outer, (None, None))
        before = {key: [opt.state[p][key].clone() for p in params] for key in ("snoo_slow", "snoo_residual")
                  if params[0] in opt.state and key in opt.state[params[0]]}  # fmt: skip
        for inner in range(K):
            for k, p in enumerate(params):
                p.grad = -_delta(replica, shard, outer * K + inner, SHAPES[k], k)
                if kind == "nan" and replica == bad and inner == K - 1:
                    p.grad[0] = float("nan")
            if kind == "guard" and inner == K - 1:
                opt.guard_outer_step(torch.tensor(replica != bad))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                opt.step()
        seen.append({
            "host_reads": host_reads(prof),  # of the outer step (the window's last step)
            "slow": [opt.state[p]["snoo_slow"].clone() for p in params],
            "residual": [opt.state[p]["snoo_residual"].clone() for p in params] if ef else None,
            "ok": None if opt.outer_step_ok is None else bool(opt.outer_step_ok),
            "before": before,
        })  # fmt: skip
    return seen


def _replicas_agree(group, tensors: list[torch.Tensor]) -> bool:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, flat, group=group)
    return all(torch.equal(g.view(torch.int32), flat.view(torch.int32)) for g in gathered)


def _snoo_checks(rank: int, world_size: int) -> dict:
    out = {}
    for replicas in (2, 4):
        mesh = init_device_mesh("cpu", (replicas, world_size // replicas), mesh_dim_names=("replicate", "shard"))
        group = mesh.get_group("replicate")
        replica, shard = mesh.get_local_rank("replicate"), mesh.get_local_rank("shard")
        for codec in CODECS:
            for ef in (False, True):
                seen = _train_snoo(group, replica, shard, codec, ef, OUTER_STEPS)
                ref = _reference(codec, ef, replicas, shard, OUTER_STEPS)
                errors = [max(float((a - b).abs().max()) for a, b in zip(s["slow"], r))
                          for s, r in zip(seen, ref["slow"])]  # fmt: skip
                res_err = max(float((a - b).abs().max()) for a, b in zip(seen[-1]["residual"], ref["residual"][replica])) \
                    if ef else 0.0  # fmt: skip
                out[f"{replicas}x{codec}x{ef}"] = {
                    "slow_err": max(errors),
                    "residual_err": res_err,
                    "residual_nonzero": ef and any(bool((e != 0).any()) for e in seen[-1]["residual"]),
                    "agree": all(_replicas_agree(group, s["slow"]) for s in seen),
                    "ok": [s["ok"] for s in seen],
                    "host_reads": sum(s["host_reads"] for s in seen),
                }
        # A NaN on the last replica at outer step 1, a guard False on replica 0 at outer step 2:
        # both dropped everywhere, slow weights and residuals bitwise as they were.
        seen = _train_snoo(group, replica, shard, "int8", True, 3, poison={1: ("nan", replicas - 1), 2: ("guard", 0)})
        out[f"{replicas}xdrop"] = {
            "ok": [s["ok"] for s in seen],
            "kept": [all(torch.equal(a, b) for key in ("snoo_slow", "snoo_residual")
                         for a, b in zip(s["before"][key], s[key.removeprefix("snoo_")]))
                     for s in seen[1:]],
            "agree": all(_replicas_agree(group, s["slow"]) for s in seen),  # residuals are each replica's own
        }  # fmt: skip
    return out


def _drift(rank: int, world_size: int, steps: int = 20) -> dict:
    """The same pseudo-gradient sent `steps` times in int4 on 4 replicas: the gap between the sum
    of applied averages and the unquantized sum, after 1 and after `steps` outer steps."""
    group = dist.group.WORLD
    s = [_blocks_of_many_scales(3 * BLOCK, seed=rank)[: 3 * BLOCK - 5]]
    all_s = [_blocks_of_many_scales(3 * BLOCK, seed=r)[: 3 * BLOCK - 5] for r in range(world_size)]
    true_avg = sum(all_s) / world_size
    out = {}
    for ef in (False, True):
        residual = [torch.zeros_like(s[0])] if ef else None
        applied = torch.zeros_like(s[0])
        gaps = []
        for _ in range(steps):
            avg, ok = start_average(s, "int4", group, residuals=residual, async_op=True).wait()
            applied += avg[0]
            gaps.append(float((applied - true_avg * (len(gaps) + 1)).abs().max()))
        out[ef] = {"gaps": gaps, "ok": bool(ok)}
        if ef:  # sum of applied = steps x mean s - mean residual (a telescoping sum)
            mean_e = residual[0].clone()
            dist.all_reduce(mean_e, group=group)
            identity = applied + mean_e / world_size - true_avg * steps
            out["identity_err"] = float(identity.abs().max())
            out["scale"] = float(true_avg.abs().max())
            # A residual is at most half a code step of its block; int4's step is amax / 7, and
            # s + e may exceed s by that half step: amax(s) / 7 bounds the half step with room.
            out["half_step_bound"] = max(float(x.abs().max()) for x in all_s) / 7
    return out


QUANT = ["parallel.replicas=2", "optim.k=2", "trainer.max_steps=8", "trainer.eval_interval=0",
         "trainer.lr_schedule=constant", "optim.outer_quant=int8", "checkpoint.keep_latest=0"]  # fmt: skip


def _residuals(trainer) -> list[torch.Tensor]:
    state = trainer.optimizer.state
    return [state[p]["snoo_residual"] for p in trainer.model.parameters() if "snoo_residual" in state[p]]


def _trainer_runs(rank: int, out: Path) -> dict:
    """Through Trainer.fit on 2 replicas x 2 shards: int8 with error feedback uninterrupted (a),
    resumed at step 3 (b: a checkpoint one step past an outer step, residuals non-zero); without
    error feedback to step 4 (c), and resumed from its step 3 with error feedback on (d)."""
    ef = ["optim.error_feedback=true"]
    a = fit_layout(f"{out}/a", QUANT + ef + ["checkpoint.interval=3"])
    res = _residuals(a)
    b = fit_layout(f"{out}/b", QUANT + ef + [f"trainer.resume={out}/a/checkpoints/step_00000003"])
    c = fit_layout(f"{out}/c", QUANT + ["trainer.max_steps=4", "checkpoint.interval=3"])
    d = fit_layout(f"{out}/d", QUANT + ef + ["trainer.max_steps=4", f"trainer.resume={out}/c/checkpoints/step_00000003"])
    slow = {name: torch.cat([t.optimizer.state[p]["snoo_slow"].to_local().reshape(-1) for p in t.model.parameters()])
            for name, t in (("a", a), ("b", b), ("c", c), ("d", d))}  # fmt: skip
    group = a.dist.replicate_group
    return {
        "residual_dtensor": all(isinstance(e, DTensor) and e.placements == p.placements
                                for e, p in zip(res, a.model.parameters())),  # fmt: skip
        "residual_count": len(res),
        "residual_nonzero": any(bool((e.to_local() != 0).any()) for e in res),
        "a_b_slow_equal": torch.equal(slow["a"], slow["b"]),
        "c_d_slow_equal": torch.equal(slow["c"], slow["d"]),
        "d_residual_nonzero": any(bool((e.to_local() != 0).any()) for e in _residuals(d)),
        "replicas_agree": _replicas_agree(group, [slow["a"]]),
    }


def _all(rank: int, world_size: int, out: str) -> None:
    result = {"snoo": _snoo_checks(rank, world_size), "drift": _drift(rank, world_size)}
    result["trainer"] = _trainer_runs(rank, Path(out))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("outer_quant")
    run_distributed(_all, WS, str(out))
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WS)]


def test_quantized_average_equals_the_hand_computation(runs):
    _, ranks = runs
    for result in ranks:
        for name, case in result["snoo"].items():
            if name.endswith("drop"):
                continue
            assert case["host_reads"] == 0, name  # the outer step never waits for the device
            assert case["slow_err"] <= 1e-6, name
            assert case["residual_err"] <= 1e-6, name
            assert case["ok"] == [True] * OUTER_STEPS, name
            assert case["residual_nonzero"] == name.endswith("True"), name


def test_every_replica_holds_bitwise_the_same_slow_weights(runs):
    _, ranks = runs
    for result in ranks:
        assert all(case["agree"] for case in result["snoo"].values())
        assert result["trainer"]["replicas_agree"]


def test_a_non_finite_replica_drops_the_step_and_keeps_the_residuals(runs):
    _, ranks = runs
    for result in ranks:
        for replicas in (2, 4):
            case = result["snoo"][f"{replicas}xdrop"]
            assert case["ok"] == [True, False, False]
            assert case["kept"] == [True, True]


def test_error_feedback_keeps_the_applied_sum_next_to_the_unquantized_sum(runs):
    _, ranks = runs
    for result in ranks:
        drift = result["drift"]
        without, with_ef = drift["false"]["gaps"], drift["true"]["gaps"]
        # Without: the same rounding every step, so the gap grows linearly. With: it stays
        # within one step's quantization error (the residual), by the telescoping identity.
        assert without[-1] >= 0.9 * len(without) * without[0] > 0
        assert max(with_ef) <= drift["half_step_bound"]
        assert with_ef[-1] * 5 < without[-1]
        assert drift["identity_err"] <= 1e-5 * drift["scale"] * len(with_ef)


def test_resume_with_residuals_repeats_the_uninterrupted_run(runs):
    out, ranks = runs
    for result in ranks:
        t = result["trainer"]
        assert t["residual_dtensor"] and t["residual_count"] > 0 and t["residual_nonzero"]
        assert t["a_b_slow_equal"]
    a = [json.loads(line) for line in (out / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (out / "b" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in a if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in b if "loss" in r}
    assert sorted(resumed) == [4, 5, 6, 7, 8]
    assert all(resumed[s] == losses[s] for s in resumed)


def test_a_checkpoint_without_residuals_resumes_with_zero_residuals(runs):
    # d's first outer step (step 4) from a zero residual sends exactly what c sent: the same
    # slow weights, bitwise; and it leaves a residual.
    _, ranks = runs
    for result in ranks:
        assert result["trainer"]["c_d_slow_equal"] and result["trainer"]["d_residual_nonzero"]
