"""A run's checkpointed state: the tree a checkpoint holds, when to save it, what a checkpoint
must agree with to be loaded, and resuming (with fallback past damaged checkpoints, and the
config changes a resume applies or refuses: snoo_train/resume.py), including a DiLoCo
checkpoint resumed with another replica count (docs/checkpoints.md, elastic replicas)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from snoo_train.checkpoint import (
    Checkpointer,
    CheckpointError,
    CorruptCheckpoint,
    check_replicas_agree,
    checkpoint_candidates,
    checkpoint_name,
    named_candidates,
    no_loadable_checkpoint,
    read_tensor_keys,
    replica_keys,
    split_state,
    verify_spread,
)
from snoo_train.config import is_diloco
from snoo_train.dist import agree as agree_on
from snoo_train.dist import gather_objects
from snoo_train.optim.snoo import MOMENTUM, RESIDUAL, SLOW
from snoo_train.resume import apply_changes, config_changes, param_group_hyperparameters
from snoo_train.rundir import check_free_space, check_writable, guard_fresh_start

if TYPE_CHECKING:
    from snoo_train.trainer.trainer import Trainer

log = logging.getLogger("snoo_train")

# The decisions rank 0 takes for every rank (snoo_train.dist.agree) may fail with these.
_AGREED_ERRORS = (CheckpointError,)

# Optimizer state that is the same on every DiLoCo replica (one averaged update at each outer
# step, none between): checked across the saved replicas on an elastic resume. Every other
# state[p] key, whatever optimizer adds it, is per replica and follows the replica it is read from.
REPLICATED_STATE = (SLOW, MOMENTUM)


def agree(dist, decide: Callable[[], Any]) -> Any:
    return agree_on(dist, decide, _AGREED_ERRORS)


def merge_param_groups(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every rank's optimizer param groups (as get_state_dict gives them: parameter names under
    "params") as one list naming each parameter once. Groups are matched by their
    hyper-parameters (every other key) and, among a rank's groups with equal ones, by order, not
    by position alone: a stage without matrices (only the embedding) has fewer groups, and its
    first must join the others' group of the same weight decay. Groups keep the order in which
    they first appear (rank 0's first); names their first rank's order."""
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    names: dict[tuple[str, int], set[str]] = {}
    for groups in per_rank:
        seen: dict[str, int] = {}
        for group in groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            values = repr(sorted(hyper.items()))
            key = (values, seen.get(values, 0))
            seen[values] = key[1] + 1
            target = merged.setdefault(key, {**hyper, "params": []})
            have = names.setdefault(key, set())
            target["params"] += [n for n in group["params"] if n not in have]
            have.update(group["params"])
    return list(merged.values())


class RunState:
    """Owns the trainer's checkpoints: `checkpoint.interval`, the tree, saving, resuming."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        cfg, self.dist = trainer.cfg, trainer.dist
        self.cfg = cfg
        self.dir = cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints")
        agree(self.dist, self._check_space)
        self.checkpointer = Checkpointer(
            self.dir,
            keep_latest=cfg.checkpoint.keep_latest,
            async_save=cfg.checkpoint.async_save,
            checksum=cfg.checkpoint.checksum,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.config_changes: list = []
        self._restore_rng = False
        # The checkpoint being loaded: its replica count (1 without DiLoCo) and the saved
        # replica this rank reads its model and optimizer state from (None: no replica prefix).
        self._saved_replicas, self._source = 1, None

    # -- when --

    def should_save(self, step: int, *, preempted: bool) -> bool:
        """Every checkpoint.interval steps (0: never) and after the last step; always on preemption."""
        interval = self.cfg.checkpoint.interval
        return preempted or (interval > 0 and (step % interval == 0 or step == self.cfg.trainer.max_steps))

    # -- the tree --

    def meta(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be loaded into this run."""
        cfg = self.cfg
        return {
            "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
            "model": {**OmegaConf.to_container(OmegaConf.structured(cfg.model)), "vocab_size": self.trainer.vocab_size},
            "optim": {"name": cfg.optim.name, "inner": cfg.optim.inner, "outer": cfg.optim.outer},
            "replicas": cfg.parallel.replicas,
            "world_size": self.dist.world_size,
        }

    def tree(self) -> dict[str, Any]:
        """Everything a checkpoint holds, as one tree of tensors (DTensor shards under FSDP2)
        and plain values. get_state_dict keys the optimizer state by parameter name, so DCP can
        reshard it, SNOO's slow weights and momentum included (they live in optimizer.state)."""
        t = self.trainer
        model_sd, optim_sd = get_state_dict(t.model, t.optimizer)
        rng = {"cpu": torch.get_rng_state()}
        if self.dist.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.dist.device)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "rng": {f"rank{self.dist.rank}": rng},
            "data": self._stream_positions(),
            "trainer": {
                "step": t.step,
                "tokens": t.tokens_at(t.step),
                "skipped_steps": t.policy.skipped_steps,
                "consecutive_skips": t.policy.consecutive_skips,
                "loader": t.loader.state_dict(),
                "scheduler": t.scheduler.state_dict(),
            },
        }

    def _stream_positions(self) -> dict[str, Any]:
        """Streaming: every rank's position in its own share of the stream, gathered so that rank 0
        writes them all (plain values); nothing otherwise (the step is the whole position)."""
        t = self.trainer
        if not t.loader.streaming:
            return {}
        return {f"rank{r}": p for r, p in enumerate(gather_objects(t.loader.rank_state()))}

    @property
    def _keys(self) -> Callable[[str], str] | None:
        """Per-replica keys under DiLoCo (checkpoint.replica_keys); the tree's own otherwise."""
        return replica_keys(self.dist.replica) if is_diloco(self.cfg) else None

    def _load_keys(self, key: str) -> str:
        """The saved key a tree key is read from: the source replica's under a DiLoCo checkpoint
        (set by check_meta, which runs before any key is mapped)."""
        return key if self._source is None else replica_keys(self._source)(key)

    # -- save --

    def save(self, step: int, *, blocking: bool | None = None) -> str:
        """Save the run at `step`. The non-finite policy is checked first (a host sync): the
        steps since the last log were not read yet, and nothing non-finite may be published
        (trainer.nonfinite=stop raises here; skip makes the skip counters exact)."""
        self.trainer.policy.check(step)
        tree = self.tree()
        if self.dist.pp > 1:
            # Plain values are written from rank 0 alone, whose param groups name only its own
            # stage's parameters: the saved groups name every stage's (one gather of names).
            tree["optim"]["param_groups"] = merge_param_groups(gather_objects(tree["optim"]["param_groups"]))
        self.checkpointer.save(step, tree, self.meta(), blocking=blocking, rename=self._keys)
        return os.path.join(self.dir, checkpoint_name(step))

    def _check_space(self) -> None:
        """Before the first step, not at the first save: the checkpoint directory takes a file,
        and has room for one checkpoint (the parameters and the optimizer's copies of them, in
        fp32; a lower bound: the real one also holds small state)."""
        check_writable(self.dir, "checkpoint.dir")
        o = self.cfg.optim
        copies = {"adamw": 2, "muon": 1, "schedule_free_adamw": 2}.get(o.inner, 1)
        copies += {"snoo": 2, "gpa": 1, "ema_nesterov": 1}.get(o.outer, 0)
        copies += 1 if is_diloco(self.cfg) and o.error_feedback else 0  # SNOO's residuals
        check_free_space(self.dir, 4 * self.trainer.num_params * (1 + copies) * self._replicas, "checkpoint.dir")

    # -- load --

    def check_meta(self, saved: dict[str, Any], saved_world_size: int) -> None:
        """Refuse a checkpoint this run cannot continue (before any tensor is read), and note the
        hyper-parameters that changed since it was written (applied after loading)."""
        problem = next(
            (f"meta.{k}" for k in ("model", "optim", "config") if not isinstance(saved.get(k), dict)), None
        ) or next((f"meta.optim.{k}" for k in ("name", "inner", "outer") if k not in saved["optim"]), None)
        if problem:
            raise CorruptCheckpoint(f"malformed state.json: {problem} is missing or not what the trainer writes")
        here = self.meta()
        diffs = [
            f"model.{k}={saved['model'].get(k)!r} (this run: {v!r})"
            for k, v in here["model"].items()
            if k != "name" and saved["model"].get(k) != v
        ]
        if diffs:
            raise CheckpointError(
                f"the checkpoint was written for a different model ({saved['model'].get('name')}): " + ", ".join(diffs)
            )
        for key in ("inner", "outer"):
            if saved["optim"][key] != here["optim"][key]:
                raise CheckpointError(
                    f"the checkpoint was written with optim.{key}={saved['optim'][key]} "
                    f"(this run: {here['optim'][key]}); its optimizer state does not fit"
                )
        # Another parallel.replicas is refused or allowed with the config (resume.py).
        refusals, self.config_changes = config_changes(saved["config"], here["config"])
        if refusals:
            raise CheckpointError(
                "cannot resume: the checkpoint was written with " + "; ".join(refusals)
                + ". Resume with its values, or start a new run in a new hydra.run.dir"
            )
        self._source_replica(saved)
        # RNG states are per rank: they carry over to the same ranks in the same replicas only.
        self._restore_rng = saved_world_size == self.dist.world_size and self._saved_replicas == self._replicas
        if self.cfg.data.streaming and not self._restore_rng:
            raise CheckpointError(
                f"the checkpoint was written by {saved_world_size} ranks streaming their own shares of "
                f"data.files/data.path; it resumes at that world size only (this run: {self.dist.world_size}). "
                "data=prepared resumes at any world size"
            )

    @property
    def _replicas(self) -> int:
        """Replicas whose state is saved apart (DiLoCo's); 1 otherwise (HSDP's are one copy)."""
        return self.cfg.parallel.replicas if is_diloco(self.cfg) else 1

    def _source_replica(self, saved: dict[str, Any]) -> None:
        """Elastic replicas (docs/checkpoints.md): replica r of this run continues saved replica
        r mod R_saved (its fast weights, inner state and any other per-replica state)."""
        diloco = saved.get("replicas", 1) > 1 and saved["optim"]["outer"] == "snoo"
        self._saved_replicas = saved["replicas"] if diloco else 1
        self._source = self.dist.replica % self._saved_replicas if diloco else None
        if self._source is not None and self._source != self.dist.replica:
            log.info("resume: replica %d continues the saved replica %d", self.dist.replica, self._source)

    def _check_replicated(self, path: str, optim_tree: dict[str, Any]) -> None:
        """On an elastic resume of a DiLoCo checkpoint: the state every replica holds alike
        (REPLICATED_STATE) must be bitwise equal in every saved replica."""
        if self._source is None or self._saved_replicas == self._replicas:
            return
        tensors, _ = split_state({"optim": optim_tree})
        shared = {k: v for k, v in tensors.items() if k.startswith("optim/state/") and k.rsplit("/", 1)[-1] in REPLICATED_STATE}
        check_replicas_agree(path, shared, self._saved_replicas, self._source)

    def load(self, path: str) -> None:
        # The tree to load into; on a fresh optimizer get_state_dict first creates its state
        # with one zero-learning-rate step, which the loaded values then replace.
        t = self.trainer
        tree = self.tree()
        self._restore_rng = False
        self.checkpointer.load(path, tree, check_meta=self.check_meta, skip=self._skip(path), rename=self._load_keys)
        self._check_replicated(path, tree["optim"])
        set_state_dict(t.model, t.optimizer, model_state_dict=tree["model"], optim_state_dict=tree["optim"])
        state = tree["trainer"]
        # A checkpoint from before the loader saved its layout had one stream per replica.
        t.loader.load_state_dict({"streams": self._saved_replicas, **state["loader"]})
        if self._restore_rng and t.loader.streaming:
            t.loader.load_rank_state(tree["data"][f"rank{self.dist.rank}"])
        t.scheduler.load_state_dict(state["scheduler"])
        # Its per-group lists are the saving rank 0's, whose groups another pipeline stage or
        # layout may not share: this rank's are those of its groups as loaded (by parameter name).
        t.scheduler.base_lrs = [g["initial_lr"] for g in t.optimizer.param_groups]
        t.scheduler._last_lr = [g["lr"] for g in t.optimizer.param_groups]
        t.step = int(state["step"])
        t.step_base, t.tokens_base = t.step, int(state.get("tokens", t.step * t.loader.tokens_per_step))
        t.policy.skipped_steps = int(state["skipped_steps"])
        t.policy.consecutive_skips = int(state["consecutive_skips"])
        if self._restore_rng:
            rng = tree["rng"][f"rank{self.dist.rank}"]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.dist.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.dist.device)

    def _skip(self, path: str) -> Callable[[str], bool]:
        """The tensors not to load: RNG states from another world size, and SNOO's error-feedback
        residuals a checkpoint does not hold (written with optim.error_feedback=false): they
        stay at zero, the residual of a run that had sent everything. A replica added by an
        elastic resume (r >= the saved replicas) starts its residuals at zero too: a copy of
        replica r mod R's would send that replica's unsent remainder twice. Evaluated in the
        load's preflight, after check_meta, on every rank."""
        saved: dict[str, Any] = {}

        def skip(key: str) -> bool:
            if key.startswith("rng/"):
                return not self._restore_rng
            if key.endswith("/" + RESIDUAL):
                if self._source is not None and self.dist.replica >= self._saved_replicas:
                    return True
                if not saved:
                    saved.update(read_tensor_keys(path))
                return self._load_keys(key) not in saved
            return False

        return skip

    def resume(self) -> str | None:
        """Load the checkpoint trainer.resume names (auto: the newest loadable one in
        checkpoint.dir, falling back past damaged ones, including damage found only while
        loading), apply the config changes since it was written, and return its path; None
        when the run starts fresh, which is refused where an earlier run would be overwritten."""
        t = self.trainer
        # The optimizer's hyper-parameters as this run's config set them: loading a checkpoint
        # overwrites them with the saved ones, and a changed one is written back (resume.py).
        built_groups = param_group_hyperparameters(t.optimizer)
        path = self._load_first_loadable()
        if self.config_changes:
            apply_changes(self.config_changes, t.optimizer, t.scheduler, built_groups)
            for change in self.config_changes:
                log.warning("resume: %s (applied from step %d on)", change, t.step + 1)
        return path

    def _load_first_loadable(self) -> str | None:
        resume = self.cfg.trainer.resume
        if resume == "none":
            agree(self.dist, lambda: self._guard_fresh_start("trainer.resume=none"))
            return None
        # Rank 0 lists the candidates (cheap: names); every rank then verifies its share of one
        # candidate's files and loads it, all ranks agreeing on each outcome on the control
        # group (checkpoint.agreed). Only damage moves on to the next candidate; a failure
        # (an I/O error, out of memory) stops the run with the newest checkpoint untouched.
        candidates, fallback = agree(self.dist, lambda: self._candidates(resume))
        checksum = self.cfg.checkpoint.checksum
        problems: list[str] = []
        for path in candidates:
            try:
                verify_spread(path, checksum=checksum)
                self.load(path)
            except CorruptCheckpoint as e:
                if not fallback:
                    raise CorruptCheckpoint(f"trainer.resume: {e}") from e
                problems.append(str(e))
                if self.dist.is_main:
                    log.warning("skipping checkpoint: %s", e)
                continue
            if problems and self.dist.is_main:
                log.warning("resuming from the previous complete checkpoint %s", path)
            return path
        if problems:
            raise no_loadable_checkpoint(self.dir, problems)
        agree(self.dist, lambda: self._guard_fresh_start("there is no checkpoint to resume from (trainer.resume=auto)"))
        return None

    def _candidates(self, resume: str) -> tuple[list[str], bool]:
        """The checkpoints to try, best first, and whether damage may fall back to the next."""
        if resume == "auto":
            return [str(p) for p in checkpoint_candidates(self.dir)], True
        try:
            found, fallback = named_candidates(resume)
        except CheckpointError as e:
            raise type(e)(f"trainer.resume: {e}") from e
        return [str(p) for p in found], fallback

    def _guard_fresh_start(self, why: str) -> None:
        archived = guard_fresh_start(
            self.cfg.run_dir,
            self.dir,
            self.cfg.logging.metrics_file,
            archive=self.cfg.trainer.archive_previous_run,
            why=why,
        )
        if archived is not None:
            log.warning("trainer.archive_previous_run: the earlier run is now in %s", archived)
