"""`python -m snoo_train.plan [overrides] world_size=N [--device-memory 80GiB] [--json]`

Prints one rank's memory plan for the config `python -m snoo_train.train [overrides]` would run
on N ranks (world_size=1 by default). Exit status: 0 when it fits `--device-memory` (or none was
given), 1 when its peak does not fit, 2 for bad input (a bad override or value, one line).
The plan is for an accelerator (bf16 compute, as trainer.mixed_precision=auto picks there)
unless trainer.device=cpu or trainer.mixed_precision=fp32; --json prints the MemoryPlan's fields.
Under parallel.pp the table is for the pipeline rank with the largest peak, each rank's peak above it.
"""

from __future__ import annotations

import json
import re
import sys

from snoo_train.config import Config, ConfigError, pipeline_microbatches

# What the planner takes besides the trainer's overrides (tests/test_docs.py reads these too).
CLI_OPTIONS = ("--device-memory", "--json", "--help", "-h")
CLI_KEYS = ("world_size",)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'80GiB', '141GB', '512MiB' or plain bytes -> bytes; ConfigError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or (unit and unit not in _UNITS):
        raise ConfigError(f"--device-memory={text!r}: give a size such as 80GiB, 141GB or 512MiB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(match.group(1)) * _UNITS[unit or "B"])


def parse_args(argv: list[str]) -> tuple[list[str], int, int | None, bool]:
    """(Hydra overrides, world size, device memory in bytes or None, JSON output)."""
    overrides, world_size, memory, as_json = [], 1, None, False
    args = iter(argv)
    for arg in args:
        if arg.startswith("world_size="):
            value = arg.split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"world_size={value!r} must be a positive integer (ranks in the job)")
            world_size = int(value)
        elif arg == "--device-memory" or arg.startswith("--device-memory="):
            value = arg.split("=", 1)[1] if "=" in arg else next(args, None)
            if value is None:
                raise ConfigError("--device-memory needs a size, e.g. --device-memory 80GiB")
            memory = parse_size(value)
        elif arg == "--json":
            as_json = True
        elif arg.startswith("-") and arg.split("=", 1)[0] not in CLI_OPTIONS:
            raise ConfigError(f"unknown option {arg!r}; see python -m snoo_train.plan --help")
        else:
            overrides.append(arg)
    return overrides, world_size, memory, as_json


def compose_training_config(overrides: list[str]) -> Config:
    """The Config the trainer composes from these overrides (same groups, same schema, the same
    refusal of unknown keys); a bad override is a ConfigError of one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from snoo_train.configs import CONFIG_DIR, accept_async_alias, reject_unknown_keys

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            dcfg = compose("config", overrides=accept_async_alias(list(overrides)))
        reject_unknown_keys(dcfg)
        return OmegaConf.to_object(dcfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from err


def _gib(n: int) -> str:
    return f"{n / 2**30:10.3f} GiB"


def _held(plan, cfg: Config) -> str:
    """What a pipeline rank holds, e.g. 'stage 0: decoder layers 0-3, embedding'."""
    from snoo_train.config import pipeline_stages_per_rank

    runs: list[list[int]] = []  # consecutive layers as first-last
    for i in plan.layers:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    spans = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)
    parts = [f"decoder layers {spans}" if runs else "no decoder layer"]
    if 0 in plan.stages:
        parts.append("embedding")
    if cfg.parallel.pp * pipeline_stages_per_rank(cfg.parallel) - 1 in plan.stages:
        parts.append("final norm + head")
    return f"stage{'s' if len(plan.stages) > 1 else ''} {', '.join(map(str, plan.stages))}: {', '.join(parts)}"


def _whose(plan, cfg: Config, stages) -> list[str]:
    """Which rank the table is for; under pp, every pipeline rank's peak besides."""
    if not stages:
        return [f"per rank (rank {plan.rank}: its shards are the largest); device memory:"]
    p = cfg.parallel
    lines = [f"pipeline: pp {p.pp}, {p.pp_schedule}, {pipeline_microbatches(p)} micro-batches per step; each pipeline "
             f"rank's peak (the first rank of its stage, whose shards are the largest):"]  # fmt: skip
    lines += [f"  pp rank {q.pp_rank} (rank {q.rank}, {_held(q, cfg)}; {q.chunks_in_flight} micro-batch(es) in "
              f"flight): {q.peak_bytes / 2**30:.3f} GiB" for q in stages]  # fmt: skip
    lines.append(f"rank {plan.rank} (pp rank {plan.pp_rank}, {_held(plan, cfg)}: the largest peak); device memory:")
    return lines


def format_plan(plan, cfg: Config, memory: int | None, last=None, stages=None) -> str:
    """The plan as the table the CLI prints; `last`: the last rank's plan (the smallest shards);
    `stages`: under pipeline parallelism, every pipeline rank's plan."""
    ac = cfg.trainer.activation_checkpointing
    moment = max(("loss", plan.loss_moment_bytes), ("backward", plan.backward_moment_bytes),
                 ("optimizer", plan.optimizer_moment_bytes), key=lambda kv: kv[1])[0]  # fmt: skip
    rows = [
        ("parameters (fp32 master shard)", plan.param_bytes),
        ("gradients (fp32 shard)", plan.grad_bytes),
        (f"inner optimizer state ({cfg.optim.inner})", plan.inner_state_bytes),
        (f"outer optimizer state ({cfg.optim.outer})", plan.outer_state_bytes),
        ("SkipMask snapshot (nonfinite=skip)", plan.snapshot_bytes),
        (f"activations (checkpointing {'on' if ac else 'off'})", plan.activation_bytes),
        ("logits + cross-entropy (fp32)", plan.loss_bytes),
        ("FSDP stage gathered + fp32 grads (pp)" if plan.stages else "FSDP unsharded params/grads in flight",
         plan.fsdp_buffer_bytes),
        *([("pipeline receive buffers (pp)", plan.pipeline_buffer_bytes)] if plan.stages else []),
        ("optimizer step temporaries", plan.optimizer_temp_bytes),
    ]
    lines = [
        f"memory plan: model {cfg.model.name}, optim {cfg.optim.name}, world size {plan.world_size} "
        f"(replicas {cfg.parallel.replicas}, tp {cfg.parallel.tp}, ep {cfg.parallel.ep}, pp {cfg.parallel.pp}), micro-batch "
        f"{plan.micro_batch} x {cfg.data.seq_len} tokens, compute {'bf16' if plan.compute_bytes == 2 else 'fp32'}",
        *_whose(plan, cfg, stages),
    ]
    lines += [f"  {name:<42}{_gib(n)}" for name, n in rows]
    lines.append(f"  {'peak (at the ' + moment + ' moment)':<42}{_gib(plan.peak_bytes)}")
    lines.append(f"  {'  activations without / with checkpointing':<42}{_gib(plan.activation_bytes_without_ac)} / {plan.activation_bytes_with_ac / 2**30:.3f} GiB")
    lines.append(f"  {'  peak without / with checkpointing':<42}{_gib(plan.peak_bytes_without_ac)} / {plan.peak_bytes_with_ac / 2**30:.3f} GiB")
    if last is not None and last.peak_bytes != plan.peak_bytes:
        lines.append(f"  {'  rank ' + str(last.rank) + ' (smallest shards): peak':<42}{_gib(last.peak_bytes)}")
    host = plan.outer_state_host_bytes
    if host:
        lines.append(f"host memory (optim.outer_state_device=cpu): {host / 2**30:.3f} GiB")
    if memory is not None:
        verdict = "fits" if plan.peak_bytes <= memory else "does NOT fit"
        lines.append(f"device memory {memory / 2**30:.2f} GiB: {verdict} (peak is {100 * plan.peak_bytes / memory:.0f}% of it)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    from snoo_train.plan.memory import estimate, estimate_stages

    try:
        overrides, world_size, memory, as_json = parse_args(argv)
        cfg = compose_training_config(overrides)
        stages = estimate_stages(cfg, world_size) if cfg.parallel.pp > 1 else None
        # Under pp the table is the pipeline rank's with the largest peak (estimate's default).
        plan = max(stages, key=lambda q: q.peak_bytes) if stages else estimate(cfg, world_size)
        last = estimate(cfg, world_size, rank=world_size - 1) if world_size > 1 and not stages else None
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if as_json:
        out = plan.as_dict() | ({"device_memory_bytes": memory, "fits": plan.peak_bytes <= memory} if memory else {})
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan, cfg, memory, last, stages))
    return 0 if memory is None or plan.peak_bytes <= memory else 1


if __name__ == "__main__":
    sys.exit(main())
