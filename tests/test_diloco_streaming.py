"""Streaming DiLoCo (issue 23 parts 1, 2 and its exact resume): optim.fragments and optim.sync_delay.

References are written here, from the rule in docs/parallelism.md: fragment i starts its sync
after the inner steps t with t % k == (i + 1) * k / F (mod k), with s = w - p averaged by hand
over the replicas at that step; sync_delay inner steps later the Nesterov update moves its slow
weights and every replica's fast weights of that fragment restart from them. A False flag from
any replica at the start step drops that update on every replica.

One spawn of 4 ranks (gloo) runs 2 replicas x 2 shards and 4 replicas x 1 shard, and a Trainer
run with a checkpoint taken while a sync is in flight, resumed from it.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from snoo_train.checkpoint import read_state
from snoo_train.config import ConfigError
from snoo_train.dist import init_distributed
from snoo_train.models import PRESETS, build_model, materialize, parallelize
from snoo_train.optim import SNOO
from snoo_train.optim.build import layer_fragments, weight_decay_groups
from snoo_train.resume import config_changes
from snoo_train.trainer import clip_grad_norm
from tests.conftest import make_config, run_trainer
from tests.dist_utils import fit_layout, run_distributed

VOCAB, SEQ, GLOBAL_BATCH = 257, 16, 8
K, F, STEPS = 4, 2, 11  # fragment 0 starts at 2, 6, 10; fragment 1 at 4, 8; flush after 11
LR, ETA, MU, CLIP = 1e-2, 0.7, 0.6, 1.0
DROP = (1, 6)  # (replica, step): that replica's flag is False at a start step
ATOL = 3e-5  # sharded vs single-process AdamW (tests/test_diloco.py explains the noise)


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def fragment_names(n: int) -> list[list[str]]:
    model = build_model(PRESETS["llama_tiny"], VOCAB, seed=0)
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names[id(p)] for p in fragment] for fragment in layer_fragments(model, n)]


# -- the reference: plain tensors in one process --------------------------------------------------


def reference(replicas: int, tau: int, drop: tuple[int, int] | None = None) -> dict:
    """`replicas` plain models with their own AdamW on their rows; the streaming schedule by hand."""
    models = [build_model(PRESETS["llama_tiny"], VOCAB, seed=0) for _ in range(replicas)]
    opts = [torch.optim.AdamW(weight_decay_groups(m, 0.1), lr=LR) for m in models]
    names = [n for n, _ in models[0].named_parameters()]
    fragment_of = {n: i for i, frag in enumerate(fragment_names(F)) for n in frag}
    slow = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    buf = {n: torch.zeros_like(w) for n, w in slow.items()}
    starts = {((i + 1) * K // F) % K: i for i in range(F)}
    losses, pending, done_at = [[] for _ in range(replicas)], None, {}
    rows = GLOBAL_BATCH // replicas

    def pseudo_grad(i: int) -> dict:
        params = [dict(m.named_parameters()) for m in models]
        return {n: sum(slow[n] - params[r][n] for r in range(replicas)) / replicas for n in names if fragment_of[n] == i}

    def apply(i: int, s: dict, ok: bool, t: int) -> None:
        for n, sn in s.items():
            if ok:
                buf[n].mul_(MU).add_(sn)
                slow[n].sub_(ETA * (sn + MU * buf[n]))
            for m in models:
                dict(m.named_parameters())[n].copy_(slow[n])
        done_at[i] = t

    for t, ids in enumerate(batches(), start=1):
        for r, (m, opt) in enumerate(zip(models, opts)):
            loss = loss_of(m, ids[r * rows:(r + 1) * rows])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
            opt.step()
            opt.zero_grad()
            losses[r].append(loss.item())
        with torch.no_grad():
            if pending is not None and t >= pending[1] + tau:
                apply(pending[0], pending[2], pending[3], t)
                pending = None
            if t % K in starts:
                pending = (starts[t % K], t, pseudo_grad(starts[t % K]), drop is None or drop[1] != t)
                if tau == 0:
                    apply(pending[0], pending[2], pending[3], t)
                    pending = None
    with torch.no_grad():  # flush: the sync in flight, then every fragment not restarted now
        if pending is not None:
            apply(pending[0], pending[2], pending[3], STEPS)
        for i in range(F):
            if done_at.get(i) != STEPS:
                apply(i, pseudo_grad(i), True, STEPS)
    return {"losses": losses, "slow": slow, "momentum": buf}


# -- the distributed runs (one spawn) -------------------------------------------------------------


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _train(rank: int, mesh, replica: int, tau: int, drop: tuple[int, int] | None) -> dict:
    model = build_model(PRESETS["llama_tiny"], VOCAB, seed=0, device="meta")
    parallelize(model, mesh=mesh, diloco=True)
    materialize(model, device="cpu", seed=0)
    opt = SNOO(torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=LR), k=K, lr=ETA, momentum=MU,
               replicate_group=mesh.get_group("replicate"), fragments=layer_fragments(model, F), sync_delay=tau)  # fmt: skip
    rows_per_rank = GLOBAL_BATCH // mesh.size()
    rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
    out: dict = {"losses": [], "slow_after": {}}
    for t, ids in enumerate(batches(), start=1):
        loss = loss_of(model, ids[rows])
        loss.backward()
        clip_grad_norm(model.parameters(), CLIP)
        opt.guard_outer_step(torch.tensor(drop is None or (replica, t) != drop))
        opt.step()
        opt.zero_grad()
        out["losses"].append(loss.item())
        if opt.outer_step_taken:  # this rank's shards of every slow weight, after each update
            out["slow_after"][t] = [opt.state[p]["snoo_slow"].to_local().clone() for p in model.parameters()]
    opt.flush()
    out["slow"] = {n: _full(opt.state[p]["snoo_slow"]) for n, p in model.named_parameters()}
    out["momentum"] = {n: _full(opt.state[p]["snoo_momentum"]) for n, p in model.named_parameters()}
    out["params"] = {n: _full(p) for n, p in model.named_parameters()}
    return out


RESUME = ["parallel.replicas=2", "optim.k=4", "optim.fragments=2", "optim.sync_delay=1", "trainer.max_steps=9",
          "trainer.eval_interval=0", "checkpoint.keep_latest=0"]  # fmt: skip


def _state_in_flight(rank: int, mesh, steps: int, save_at: int) -> dict:
    """Train with a state_dict() taken right after `save_at` (a sync in flight), then rewind the
    weights and optimizer to it and train on again: the two passes' losses must be equal."""
    model = build_model(PRESETS["llama_tiny"], VOCAB, seed=0, device="meta")
    parallelize(model, mesh=mesh, diloco=True)
    materialize(model, device="cpu", seed=0)
    opt = SNOO(torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=LR), k=K, lr=ETA, momentum=MU,
               replicate_group=mesh.get_group("replicate"), fragments=layer_fragments(model, F), sync_delay=1)  # fmt: skip
    rows = slice(rank * 2, rank * 2 + 2)

    def train(first: int, last: int) -> list[float]:
        out = []
        for t in range(first, last + 1):
            loss = loss_of(model, batches()[t - 1][rows])
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    train(1, save_at)
    params = [p.to_local().detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    first = train(save_at + 1, steps)
    with torch.no_grad():
        for p, v in zip(model.parameters(), params):
            p.to_local().copy_(v)
    opt.load_state_dict(state)
    return {"first": first, "second": train(save_at + 1, steps)}


def _everything(rank: int, world_size: int, out_dir: str) -> None:
    info = init_distributed("cpu", replicas=2)
    results = {
        "2x2_tau1": _train(rank, info.mesh, info.replica, 1, DROP),
        "2x2_tau0": _train(rank, info.mesh, info.replica, 0, None),
        "state_in_flight": _state_in_flight(rank, info.mesh, 9, 6),
    }
    four = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("replicate", "shard"))
    results["4x1_tau1"] = _train(rank, four, rank, 1, None)
    # A Trainer checkpoint after step 6 (fragment 0's sync started there, in flight) and a resume.
    full, resumed = Path(out_dir) / "full", Path(out_dir) / "resumed"
    fit_layout(str(full), RESUME + ["checkpoint.interval=6"])
    dist.barrier()
    fit_layout(str(resumed), RESUME + [f"trainer.resume={full}/checkpoints/step_00000006", "checkpoint.interval=0"])
    # The same with the quantized sync and error feedback: residuals updated while a sync is in flight.
    quant = ["optim.outer_quant=int8", "optim.error_feedback=true"]
    full_q, resumed_q = Path(out_dir) / "full_int8", Path(out_dir) / "resumed_int8"
    fit_layout(str(full_q), RESUME + quant + ["checkpoint.interval=6"])
    dist.barrier()
    fit_layout(str(resumed_q), RESUME + quant + [f"trainer.resume={full_q}/checkpoints/step_00000006", "checkpoint.interval=0"])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    out_dir = tmp_path_factory.mktemp("streaming")
    run_distributed(_everything, 4, str(out_dir))
    return out_dir, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(4)]


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=ATOL, msg=f"{what} {name}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, replicas, shards, tau, drop",
    [("2x2_tau1", 2, 2, 1, DROP), ("2x2_tau0", 2, 2, 0, None), ("4x1_tau1", 4, 1, 1, None)],
)
def test_fragments_and_delay_match_hand_averaged_replicas(runs, variant, replicas, shards, tau, drop):
    _, results = runs
    ref = reference(replicas, tau, drop)
    for r in range(replicas):
        shard_losses = [results[r * shards + s][variant]["losses"] for s in range(shards)]
        got = [sum(v) / shards for v in zip(*shard_losses)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref["losses"][r]), rtol=1e-5, atol=ATOL)
    for rank in range(replicas * shards):
        _assert_close(results[rank][variant]["slow"], ref["slow"], f"{variant} rank {rank} slow")
        _assert_close(results[rank][variant]["momentum"], ref["momentum"], f"{variant} rank {rank} momentum")
        _assert_close(results[rank][variant]["params"], ref["slow"], f"{variant} rank {rank} params after flush")


@pytest.mark.slow
@pytest.mark.parametrize("variant, shards", [("2x2_tau1", 2), ("2x2_tau0", 2), ("4x1_tau1", 1)])
def test_every_replica_holds_bitwise_equal_slow_weights_after_each_update(runs, variant, shards):
    _, results = runs
    tau = 0 if variant.endswith("tau0") else 1
    updates = [s + tau for s in (2, 4, 6, 8, 10) if s + tau <= STEPS]
    for rank, result in enumerate(results):
        after = result[variant]["slow_after"]
        assert sorted(after) == updates
        twin = results[rank % shards][variant]["slow_after"]  # replica 0's rank with the same shard
        for t in updates:
            assert all(torch.equal(a, b) for a, b in zip(after[t], twin[t])), (variant, rank, t)


@pytest.mark.slow
def test_a_state_taken_with_a_sync_in_flight_resumes_bitwise(runs):
    _, results = runs
    for result in results:
        got = result["state_in_flight"]
        assert len(got["first"]) == 3 and got["first"] == got["second"]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", ["", "_int8"])
def test_a_trainer_checkpoint_with_a_sync_in_flight_resumes_bitwise(runs, suffix):
    """Full precision, and int8 with error feedback (residuals non-zero, a quantized sync in flight)."""
    out_dir, _ = runs

    def losses(run: str) -> dict[int, float]:
        lines = (out_dir / run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines)}

    want, got = losses("full" + suffix), losses("resumed" + suffix)
    assert sorted(got) == [7, 8, 9] and all(got[s] == want[s] for s in got), (got, want)
    if suffix:  # the quantized sync trained another model than the full-precision one
        assert losses("full")[9] != want[9]


# -- one process ----------------------------------------------------------------------------------


def test_fragments_are_contiguous_layers_with_the_embedding_first_and_the_head_last():
    first, last = fragment_names(2)
    assert first[0].endswith("embed_tokens.weight") and all(".layers.1." not in n for n in first)
    assert any(".layers.0." in n for n in first) and all(".layers.0." not in n for n in last)
    assert last[-1].endswith("norm.weight") or last[-1].startswith("lm_head")
    with pytest.raises(ValueError, match="fragments=3 needs at least as many layers"):
        layer_fragments(build_model(PRESETS["llama_tiny"], VOCAB, seed=0), 3)


def test_one_fragment_without_delay_is_the_plain_path_bitwise():
    def run(**kwargs) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        opt = SNOO(torch.optim.AdamW(model.parameters(), lr=0.1), k=3, **kwargs)
        assert not opt.streaming
        for x in torch.randn(7, 5, 4, generator=torch.Generator().manual_seed(3)):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
        opt.flush()
        return [p.detach().clone() for p in model.parameters()]

    plain, streamed = run(), run(fragments=None, sync_delay=0)
    assert all(torch.equal(a, b) for a, b in zip(plain, streamed))


@pytest.mark.parametrize("tau, state_device", [(0, None), (1, None), (1, "cpu")])
def test_one_replica_follows_the_schedule_by_hand(tau, state_device):
    """Plain SNOO with 3 fragments of an MLP (k=6: starts after steps 2, 4, 6, ...), against the
    rule applied by hand with SGD: 12 steps, an evaluation at the slow weights and a flush, both
    with a sync in flight (tau=1), then 3 more steps on the same schedule."""
    k, n, eta, mu = 6, 3, 0.7, 0.5
    xs = torch.randn(15, 3, 4, generator=torch.Generator().manual_seed(0))

    def mlp() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)))

    model = mlp()
    fragments = [list(layer.parameters()) for layer in model]
    opt = SNOO(torch.optim.SGD(model.parameters(), lr=0.1), k=k, lr=eta, momentum=mu, fragments=fragments,
               sync_delay=tau, state_device=state_device)  # fmt: skip
    ref = mlp()
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    layers = [list(layer.parameters()) for layer in ref]
    slow = [[p.detach().clone() for p in layer] for layer in layers]
    buf = [[torch.zeros_like(p) for p in layer] for layer in layers]
    starts = {((i + 1) * k // n) % k: i for i in range(n)}
    pending, done = None, {}

    def apply(i: int, s: list, t: int) -> None:
        for p, w, b, si in zip(layers[i], slow[i], buf[i], s):
            b.mul_(mu).add_(si)
            w.sub_(eta * (si + mu * b))
            p.copy_(w)
        done[i] = t

    for t, x in enumerate(xs, start=1):
        for net, o in ((model, opt), (ref, sgd)):
            net(x).square().sum().backward()
            o.step()
            o.zero_grad()
        with torch.no_grad():
            if pending and t >= pending[1] + tau:
                apply(pending[0], pending[2], t)
                pending = None
            if t % k in starts:
                i = starts[t % k]
                pending = (i, t, [w - p for w, p in zip(slow[i], layers[i])])
                if tau == 0:
                    apply(i, pending[2], t)
                    pending = None
            if t == 12:  # fragment 2's sync in flight (tau=1): the evaluation sees its update
                with opt.eval_parameters():
                    got = [p.detach().clone() for p in model.parameters()]
                want = []
                for i in range(n):
                    for j, w in enumerate(slow[i]):
                        if pending and pending[0] == i:
                            si = pending[2][j]
                            w = w - eta * (si + mu * (mu * buf[i][j] + si))
                        want.append(w)
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            if t == 12:  # after the evaluation: the sync in flight lands, the others' partial windows close
                opt.flush()
                opt.flush()  # a no-op
                if pending:
                    apply(pending[0], pending[2], t)
                    pending = None
                for i in range(n):
                    if done.get(i) != t:
                        apply(i, [w - p for w, p in zip(slow[i], layers[i])], t)
    torch.testing.assert_close(list(model.parameters()), list(ref.parameters()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close([opt.state[p]["snoo_slow"] for p in model.parameters()],
                               [w for layer in slow for w in layer], rtol=1e-6, atol=1e-6)  # fmt: skip


def test_a_trainer_resume_with_a_sync_in_flight_is_bitwise_in_one_process(tmp_path):
    common = ["optim.k=4", "optim.fragments=2", "optim.sync_delay=1", "trainer.max_steps=9", "trainer.eval_interval=0"]
    full = run_trainer(tmp_path / "full", common + ["checkpoint.interval=6", "checkpoint.keep_latest=0"])
    resumed = run_trainer(tmp_path / "resumed", common + [f"trainer.resume={tmp_path}/full/checkpoints/step_00000006",
                                                          "checkpoint.interval=0"])  # fmt: skip

    def losses(run: str) -> dict[int, float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines)}

    want, got = losses("full"), losses("resumed")
    assert sorted(got) == [7, 8, 9] and all(got[s] == want[s] for s in got), (got, want)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(full.optimizer.state[p]["snoo_slow"], resumed.optimizer.state[q]["snoo_slow"])
    # The checkpoint was taken with fragment 0's sync in flight (started after step 6, due at 7).
    saved = read_state(tmp_path / "full/checkpoints/step_00000006")["plain"]
    assert [6, 0] == [v for p, v in saved if p[-1] in ("snoo_inflight_start", "snoo_inflight_fragment")][:2]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["optim.k=6", "optim.fragments=3"], "optim.fragments=3 exceeds model.num_layers=2"),
        (["optim.k=5", "optim.fragments=2"], "optim.fragments=2 must divide optim.k=5"),
        (["optim.k=4", "optim.fragments=2", "optim.sync_delay=2"], r"optim.sync_delay=2 must be < optim.k / optim.fragments = 2"),
        (["optim=adamw", "optim.fragments=2"], "optim.fragments=2 needs optim.outer=snoo"),
        (["optim=gpa_adamw", "optim.sync_delay=1"], "optim.sync_delay=1 needs optim.outer=snoo"),
        (["optim.fragments=0"], "optim.fragments=0 must be > 0"),
        (["optim.sync_delay=-1"], "optim.sync_delay=-1 must be >= 0"),
        (["optim.sync_delay=1", "trainer.nonfinite=skip"], "trainer.nonfinite=skip cannot undo"),
    ],
)
def test_config_errors_name_the_key_and_the_reason(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_config(tmp_path, overrides)


def test_resume_refuses_other_fragments_and_applies_another_delay():
    refusals, changes = config_changes(
        {"optim": {"fragments": 2, "sync_delay": 1}}, {"optim": {"fragments": 1, "sync_delay": 0}}
    )
    assert len(refusals) == 1 and refusals[0].startswith("optim.fragments=2") and "fragments" in refusals[0]
    assert [str(c) for c in changes] == ["optim.sync_delay: 1 -> 0"]
