"""The final model holds every step (issue 20): with trainer.max_steps=25 and optim.k=10, SNOO's
last outer step was at 20, and steps 21-25 (the lowest learning rates) lived only in the fast
weights. The rule (docs/optimizers.md, SNOO section): after the step at max_steps the trainer takes the outer
step on that partial window, on every rank, so the final evaluation, the checkpoint at max_steps
and the export hold it.

Every run goes through Trainer.fit; the expected weights are computed here with torch's
SGD(lr=eta, momentum=mu, nesterov) on the slow weights of step 20 with the pseudo-gradient
w - p of step 25 (DESIGN.md section 2), averaged over the replicas for DiLoCo.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from snoo_train.dist import init_distributed
from snoo_train.export import main as export_main
from snoo_train.optim import SNOO
from snoo_train.trainer import Trainer
from tests.conftest import make_config, read_records
from tests.dist_utils import run_distributed

STEPS, K = 25, 10
LAST_OUTER = STEPS - STEPS % K  # 20
MID_WINDOW = 15  # a log step between outer steps: the slow weights are those of step 10
# One evaluation and one checkpoint, both at max_steps.
RUN = [f"trainer.max_steps={STEPS}", f"optim.k={K}", "trainer.eval_interval=0", f"checkpoint.interval={STEPS}"]
FINAL_CHECKPOINT = f"checkpoints/step_{STEPS:08d}"


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


class RecordingTrainer(Trainer):
    """The trainer, unchanged, keeping what the reference needs: the slow weights and momentum
    right after the outer step at step 20, and the fast weights right after step 25's update."""

    def train_step(self, step: int):
        out = super().train_step(step)
        if step in (MID_WINDOW, LAST_OUTER, STEPS):
            opt, seen = self.optimizer, self.__dict__.setdefault("seen", {})
            seen[step] = {
                name: {
                    "fast": _full(p),
                    "slow": _full(opt.state[p]["snoo_slow"]),
                    "momentum": _full(opt.state[p]["snoo_momentum"]),
                }
                for name, p in self.model.named_parameters()
            }
        return out


def fit(run_dir: Path, overrides: list[str], *, replicas: int = 1) -> RecordingTrainer:
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    cfg = make_config(run_dir, RUN + overrides, world_size=world_size)
    trainer = RecordingTrainer(cfg, init_distributed("cpu", replicas=replicas))
    trainer.fit()
    return trainer


def reference_final_weights(
    slow: dict[str, torch.Tensor],
    momentum: dict[str, torch.Tensor],
    fast: list[dict[str, torch.Tensor]],
    eta: float,
    mu: float,
    nesterov: bool,
) -> dict[str, torch.Tensor]:
    """torch's SGD on the slow weights w (momentum buffer b) with gradient mean_r(w - p_r)."""
    w = {n: t.clone().requires_grad_(True) for n, t in slow.items()}
    sgd = torch.optim.SGD(list(w.values()), lr=eta, momentum=mu, nesterov=nesterov)
    for n, wn in w.items():
        wn.grad = torch.stack([slow[n] - f[n] for f in fast]).mean(0)
        if mu:
            sgd.state[wn]["momentum_buffer"] = momentum[n].clone()
    sgd.step()
    return {n: t.detach() for n, t in w.items()}


def export_weights(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    export_main([str(run_dir / FINAL_CHECKPOINT), str(out)])
    return load_file(out / "model.safetensors")


def assert_export_is_the_reference(optim_cfg, seen: dict, exported: dict, fast: list[dict]) -> None:
    """The exported weights are the reference's; the old rule's (the slow weights of step 20),
    which miss steps 21-25, are not. `seen`: RecordingTrainer.seen (rank 0's under DiLoCo);
    `fast`: every replica's fast weights after step 25."""
    o = optim_cfg
    names = list(seen[STEPS])
    # Nothing moved the slow weights between the outer step at 20 and the end of step 25.
    for n in names:
        assert torch.equal(seen[STEPS][n]["slow"], seen[LAST_OUTER][n]["slow"]), n
    want = reference_final_weights(
        {n: seen[LAST_OUTER][n]["slow"] for n in names},
        {n: seen[LAST_OUTER][n]["momentum"] for n in names},
        fast, o.outer_lr, o.outer_momentum, o.nesterov,
    )  # fmt: skip
    compared = [n for n in names if n in exported]  # a tied head is saved once, as the embedding
    assert len(compared) >= len(names) - 1
    old_rule_gap = 0.0
    for n in compared:
        torch.testing.assert_close(exported[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
        old_rule_gap = max(old_rule_gap, (exported[n] - seen[LAST_OUTER][n]["slow"]).abs().max().item())
    assert old_rule_gap > 1e-4  # steps 21-25 moved the exported weights


# -- one process: SNOO and Lookahead ---------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """optim -> (its run directory, its trainer after fit), trained once for the module."""
    root = tmp_path_factory.mktemp("final_model")
    return {optim: (root / optim, fit(root / optim, [f"optim={optim}"])) for optim in ("snoo_adamw", "lookahead_adamw")}


@pytest.mark.parametrize("optim", ["snoo_adamw", "lookahead_adamw"])
def test_final_model_holds_the_partial_window(runs, tmp_path, optim):
    run_dir, trainer = runs[optim]
    assert isinstance(trainer.optimizer, SNOO)
    fast = [{n: v["fast"] for n, v in trainer.seen[STEPS].items()}]
    exported = export_weights(run_dir, tmp_path / "hf")
    assert_export_is_the_reference(trainer.cfg.optim, trainer.seen, exported, fast)

    # The model left in memory is the exported one (fast == slow after the final outer step),
    # and the final evaluation was taken at it: evaluating again gives the logged value.
    for n, p in trainer.model.named_parameters():
        if n in exported:
            assert torch.equal(p.detach(), exported[n]), n
    last = read_records(run_dir)[-1]
    assert last["step"] == STEPS and last["val_weights"] == "slow"
    assert trainer.evaluate() == last["val_loss"]
    group = trainer.optimizer.param_groups[0]
    assert (group["snoo_step"], group["snoo_flushed_at"]) == (STEPS, STEPS)


def _norm(weights: dict[str, torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.cat([w.double().flatten() for w in weights.values()])).item()


@pytest.mark.parametrize("optim", ["snoo_adamw", "lookahead_adamw"])
def test_weight_norm_is_the_slow_weights_norm(runs, optim):
    """metrics.jsonl's weight_norm (issue 25: the paper's observation on weight norms) is the norm
    of the weights evaluation sees: mid-window the slow weights of the last outer step, not the
    fast ones; after the final flush, the exported model's."""
    run_dir, trainer = runs[optim]
    logged = {r["step"]: r["weight_norm"] for r in read_records(run_dir)}
    seen = trainer.seen
    mid_slow = _norm({n: v["slow"] for n, v in seen[MID_WINDOW].items()})
    mid_fast = _norm({n: v["fast"] for n, v in seen[MID_WINDOW].items()})
    assert logged[MID_WINDOW] == pytest.approx(mid_slow, rel=1e-6)
    assert abs(mid_fast - mid_slow) > 1e-4 * mid_slow  # the fast weights would have been another figure
    assert logged[LAST_OUTER] == pytest.approx(_norm({n: v["slow"] for n, v in seen[LAST_OUTER].items()}), rel=1e-6)
    final = {n: p.detach() for n, p in trainer.model.named_parameters()}
    assert logged[STEPS] == pytest.approx(_norm(final), rel=1e-6)


def test_resuming_the_final_checkpoint(runs, tmp_path):
    """What a resume from the checkpoint at max_steps does (docs/optimizers.md): with the same max_steps it
    only evaluates the saved model (no second final outer step); with a larger one it continues
    from the exported model, and the next outer step is at the next multiple of k."""
    first, trainer = runs["snoo_adamw"]
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    final_val = read_records(first)[-1]["val_loss"]
    resume = f"trainer.resume={first / FINAL_CHECKPOINT}"

    again = fit(tmp_path / "again", [resume])
    assert again.evaluate() == final_val
    for n, p in again.model.named_parameters():
        assert torch.equal(p.detach(), final[n]), n

    longer = fit(tmp_path / "longer", [resume, "trainer.max_steps=30"])
    assert [r["step"] for r in read_records(tmp_path / "longer")] == list(range(STEPS + 1, 31))
    group = longer.optimizer.param_groups[0]
    # Steps 26-30 are a five-step window closed by the regular outer step at 30, not by a flush.
    assert (group["snoo_step"], group["snoo_flushed_at"]) == (30, STEPS)
    moved = 0.0
    for n, p in longer.model.named_parameters():
        assert torch.equal(p, longer.optimizer.state[p]["snoo_slow"]), n
        moved = max(moved, (p.detach() - final[n]).abs().max().item())
    assert moved > 1e-4


# -- DiLoCo, 2 replicas x 1 rank: the final outer step includes the replicas' all-reduce -----------


def _diloco_worker(rank: int, world_size: int, root: str) -> None:
    trainer = fit(Path(root) / "run", ["parallel.replicas=2"], replicas=2)
    fast = {n: v["fast"] for n, v in trainer.seen[STEPS].items()}
    final = {n: _full(p) for n, p in trainer.model.named_parameters()}
    final_slow = {n: _full(trainer.optimizer.state[p]["snoo_slow"]) for n, p in trainer.model.named_parameters()}
    torch.save(
        {"seen": trainer.seen, "fast": fast, "final": final, "final_slow": final_slow,
         "flushed_at": trainer.optimizer.param_groups[0]["snoo_flushed_at"]},
        Path(root) / f"rank{rank}.pt",
    )  # fmt: skip


@pytest.mark.slow
def test_diloco_replicas_take_the_final_outer_step_together(tmp_path):
    run_distributed(_diloco_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    names = list(ranks[0]["final"])
    # The replicas trained on their own data: their fast weights differ at step 25 ...
    assert any(not torch.equal(ranks[0]["fast"][n], ranks[1]["fast"][n]) for n in names)
    # ... and after the final outer step every replica holds the same model, fast == slow.
    for n in names:
        assert torch.equal(ranks[0]["final"][n], ranks[1]["final"][n]), n
        assert torch.equal(ranks[0]["final"][n], ranks[0]["final_slow"][n]), n
    assert ranks[0]["flushed_at"] == ranks[1]["flushed_at"] == STEPS

    cfg = make_config(tmp_path / "run", RUN + ["parallel.replicas=2"], world_size=2)
    exported = export_weights(tmp_path / "run", tmp_path / "hf")
    assert_export_is_the_reference(cfg.optim, ranks[0]["seen"], exported, [r["fast"] for r in ranks])
    # weight_norm counts the replicas' equal slow weights once.
    logged = {r["step"]: r["weight_norm"] for r in read_records(tmp_path / "run")}
    mid_slow = {n: v["slow"] for n, v in ranks[0]["seen"][MID_WINDOW].items()}
    assert logged[MID_WINDOW] == pytest.approx(_norm(mid_slow), rel=1e-6)
    assert logged[STEPS] == pytest.approx(_norm(ranks[0]["final"]), rel=1e-6)
    for n in names:
        if n in exported:
            torch.testing.assert_close(ranks[0]["final"][n], exported[n], rtol=0, atol=0, msg=n)
