"""Run metrics: a JSONL file, an optional wandb run and a progress bar, all on rank 0 only.

`metrics.jsonl` (in the run directory) holds one JSON object per logged step; `bench/` and
plots read it. Fields:

    step            optimizer steps taken (1-based)
    loss            mean training loss over the steps since the previous record (all ranks)
    lr              inner learning rate used for this step
    grad_norm       global gradient norm before clipping (this step; under DiLoCo replica 0's)

A number that is not finite (the loss of a window whose steps were all skipped, the norm of a
non-finite step) is written as null: the file is strict JSON.
    tokens          global training tokens consumed so far
    flops           model training FLOPs so far: tokens x models.flops_per_token (6 x matmul
                    params + attention), the MFU numerator; plots use it as the compute axis
    tokens_per_s    global training throughput since the previous record (evaluation excluded)
    elapsed_s       wall time since the first step started (evaluation included)
    peak_mem_bytes  this rank's peak: CUDA allocator peak on GPU, process max RSS on CPU
    mfu             model FLOPs utilisation, only where a peak FLOP/s is known
    val_loss        held-out loss (token mean over all ranks) at the slow weights, on eval steps
    weight_norm     global L2 norm of the weights evaluation sees (SNOO: the slow weights, so
                    between outer steps it stays at the last outer step's value), at log steps
    snoo/pseudo_grad_norm, snoo/slow_weight_norm   SNOO only, from the last outer step
    moe/aux_loss    MoE only: router load-balancing loss (unscaled; the training loss includes
                    model.router_aux_loss_coef x it), mean over the steps since the last record
    moe/layer{i}/load, moe/layer{i}/max_over_mean, moe/max_over_mean   MoE only: fraction of
                    routed tokens per expert in layer i since the last record, its max/mean
                    (1.0 = balanced), and the mean of that ratio over layers
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)

# bf16 dense peak FLOP/s per device (vendor datasheets, no sparsity), matched by device name.
# Order matters: the first substring found in the name wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("A100", 312e12),
)


def peak_flops_by_name(name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override` (trainer.peak_flops) or the table; None if unknown."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


# How long start-up waits for the W&B server before refusing an online run (wandb.init itself
# retries for about two minutes, after the model and the data are built).
WANDB_PROBE_TIMEOUT_S = 5.0


def check_wandb_online(wb: Any) -> None:
    """`logging.wandb.mode=online` needs an API key and a reachable server: both checked here in
    seconds, before anything is built or written, instead of by wandb.init after the model and
    data are (15 s to a traceback without a key, about two minutes without a network). The key
    is looked up where wandb looks (its environment variables, .netrc, its settings file), with
    no network; the server is probed once at wandb's base URL (WANDB_BASE_URL or its settings).
    Raises ConfigError with one line; other modes need neither."""
    if wb.mode != "online":
        return
    import requests
    from wandb import env
    from wandb.errors import AuthenticationError
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib.wbauth import wbnetrc

    from snoo_train.config import ConfigError

    settings = wandb_setup.singleton().settings
    base_url = settings.base_url
    instead = "or set logging.wandb.mode=offline (upload later with `wandb sync`) or disabled"
    try:
        has_key = bool(
            os.environ.get(env.API_KEY)
            or os.environ.get(env.IDENTITY_TOKEN_FILE)
            or wbnetrc.read_netrc_auth(host=base_url)
            or settings.api_key
        )
    except AuthenticationError as e:
        raise ConfigError(f"logging.wandb.mode=online: the W&B credentials for {base_url} are unusable ({e}); run `wandb login`, {instead}") from None
    if not has_key:
        raise ConfigError(
            f"logging.wandb.mode=online needs a W&B API key for {base_url} and none is set (WANDB_API_KEY, "
            f"~/.netrc, wandb's settings): run `wandb login` or set WANDB_API_KEY, {instead}"
        )
    try:
        requests.head(base_url, timeout=WANDB_PROBE_TIMEOUT_S, allow_redirects=False)
    except requests.RequestException as e:
        raise ConfigError(
            f"logging.wandb.mode=online cannot reach the W&B server {base_url} within "
            f"{WANDB_PROBE_TIMEOUT_S:g} s ({_root_cause(e)}): check the network or WANDB_BASE_URL, {instead}"
        ) from None


def _root_cause(error: BaseException) -> str:
    """The operating system's words under requests' and urllib3's wrappers ("Connection
    refused", "timed out", "Name or service not known"), else the outermost error's name."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        if isinstance(e, TimeoutError) or type(e).__name__.endswith("Timeout"):
            return "timed out"
        todo += [getattr(e, "reason", None), e.__cause__, e.__context__, *e.args]
    return type(error).__name__


class MetricsLogger:
    """Writes records on rank 0; on other ranks every method is a no-op."""

    def __init__(
        self,
        run_dir: str,
        cfg: Any,
        rank: int,
        *,
        total_steps: int | None = None,
        resolved_config: dict | None = None,
        resume_step: int | None = None,
    ):
        """`resume_step`: the run continues from a checkpoint at that step; records after it
        (written by the interrupted run after its last checkpoint) are dropped, so the file
        reads as one run, and wandb continues the same run id."""
        self.enabled = rank == 0
        self.run_dir = run_dir
        self._file = None
        self._wandb = None
        self._bar = None
        self._redirect = None
        self._want_bar = False
        self._total_steps = total_steps
        # Every rank needs it: building a record takes collectives (the MoE router's loads).
        trainer_cfg = getattr(cfg, "trainer", None)
        self.log_interval = getattr(trainer_cfg, "log_interval", 1)
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, cfg.logging.metrics_file)
        if resume_step is not None:
            truncate_records(self.path, resume_step)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: readable while running
        wb = cfg.logging.wandb
        if wb.mode != "disabled":
            import wandb  # only here: disabled runs never import it

            id_file = os.path.join(run_dir, "wandb_run_id")
            run_id = None
            if resume_step is not None and os.path.exists(id_file):
                with open(id_file) as f:
                    run_id = f.read().strip() or None
            self._wandb = wandb.init(
                id=run_id,
                resume="allow" if run_id else None,
                project=wb.project,
                entity=wb.entity,
                name=wb.name,
                group=wb.group,
                tags=list(wb.tags),
                dir=run_dir,
                mode=wb.mode,
                config=resolved_config,
            )
            with open(id_file, "w") as f:
                f.write(self._wandb.id)
        self._want_bar = bool(cfg.trainer.progress)

    def _start_bar(self) -> None:
        self._want_bar = False
        # disable=None: no bar when stderr is not a terminal (SLURM logs, pipes, CI).
        bar = tqdm(
            total=self._total_steps, desc="train", unit="step", dynamic_ncols=True, disable=None
        )
        if bar.disable:
            return
        self._bar = bar
        # Console log lines go through tqdm.write so they print above the bar, not through it.
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()

    def should_log(self, step: int, first_step: int) -> bool:
        """A record every trainer.log_interval steps, and at the first step of a session (the
        evaluator adds its own steps: Evaluator.should_run)."""
        return step == first_step or step % self.log_interval == 0

    def advance(self, step: int) -> None:
        """Move the progress bar to `step` (called every optimizer step)."""
        if self._want_bar:
            self._start_bar()
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        # Strict JSON: a non-finite number (a window of skipped steps, a NaN norm) is null.
        self._file.write(json.dumps({k: _json_number(v) for k, v in record.items()}, allow_nan=False) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self._bar is not None:
            postfix = {"loss": f"{record['loss']:.4f}"} if "loss" in record else {}
            if "tokens_per_s" in record:
                postfix["tok/s"] = f"{record['tokens_per_s']:.3g}"
            if "val_loss" in record:
                postfix["val"] = f"{record['val_loss']:.4f}"
            self._bar.set_postfix(postfix, refresh=False)
        log.info(_format(record))

    def message(self, text: str) -> None:
        if self.enabled:
            log.info(text)

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._file is not None:
            self._file.close()
            self._file = None


def truncate_records(path: str, last_step: int) -> None:
    """Keep only the records of steps <= last_step (atomically rewritten)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except ValueError:  # a line cut short by a kill: drop it
                continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _json_number(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def _format(record: dict[str, Any]) -> str:
    parts = []
    for k, v in record.items():
        if isinstance(v, float):
            v = f"{v:.4g}" if math.isfinite(v) and abs(v) >= 1e-3 else f"{v:.3e}"
        parts.append(f"{k}={v}")
    return " ".join(parts)


class LossWindow:
    """The training loss since the last record, summed on the device: `add` every step issues
    no host read, `mean()` (at log steps) reads it once.

    float64 and summed in step order from 0, skipped steps adding exactly 0.0: bitwise the mean
    the loop computed from host floats before (sum(losses) / len(losses) over the good steps)."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._count: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, good: torch.Tensor) -> None:
        """`loss`: a float64 device scalar; `good`: a device bool, False for a skipped step."""
        if self._sum is None:
            self._sum = torch.zeros((), dtype=torch.float64, device=loss.device)
            self._count = torch.zeros((), dtype=torch.float64, device=loss.device)
        self._sum += torch.where(good, loss, 0.0)
        self._count += good

    def mean(self, merge: Callable[[list[float]], list[float]] | None = None) -> float:
        """The mean over the good steps since the last call (nan if none), then reset. `merge`
        sums [total, count] over ranks (DiLoCo: each replica keeps its own window between log
        steps); every rank must call it at the same steps."""
        if self._sum is None:
            total, count = 0.0, 0.0
        else:
            total, count = torch.stack([self._sum, self._count]).tolist()
        if merge is not None:
            total, count = merge([total, count])
        self._sum = self._count = None
        return total / count if count else float("nan")


class Throughput:
    """Tokens/s over the window since the last `tick`, with paused intervals (evaluation) removed."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self._mark = self.start
        self._paused = 0.0
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def pause(self, seconds: float) -> None:
        self._paused += seconds

    def tick(self) -> float:
        now = time.perf_counter()
        dt = max(now - self._mark - self._paused, 1e-9)
        rate = self._tokens / dt
        self._mark, self._paused, self._tokens = now, 0.0, 0
        return rate

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
