"""Downstream evaluation of a checkpoint with EleutherAI's lm-evaluation-harness.

    python -m snoo_train.evaluate RUN_OR_CHECKPOINT tasks=[a,b] [include=DIR] [limit=N]
        [batch_size=N] [device=cpu] [weights=eval] [num_fewshot=N] [out=FILE]

RUN_OR_CHECKPOINT is what `python -m snoo_train.export` takes. The model is the checkpoint's
evaluation weights (SNOO's slow weights; `weights=params` for the raw parameters), loaded in
memory by export.load_model and handed to lm-eval's HFLM with the run's tokenizer (the byte
tokenizer through data/hf_byte_tokenizer.py). `include=DIR` adds task YAMLs from a directory
(local tasks: `dataset_path: json` + `dataset_kwargs: {data_files: ...}` need no network).

Writes `<run>/downstream/step_XXXXXXXX.json` (lm-eval's results, or `out=FILE`) and, for a
checkpoint inside a run directory, appends one record to its metrics.jsonl and a `downstream`
entry to its summary.json, and, where the run's logging.wandb.mode is not disabled, logs the
scores to its wandb run (the same run id). A task whose dataset is on the hub, with the hub
unreachable and the dataset not in the local cache, fails in seconds with one line. Needs the
`eval` extra. The loop runs the same code: trainer.downstream_eval (trainer/downstream.py).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from snoo_train.checkpoint import CheckpointError, read_state, resolve_checkpoint
from snoo_train.config import ConfigError
from snoo_train.data.errors import DataError

log = logging.getLogger("snoo_train.evaluate")

# The options this tool takes (tests/test_docs.py reads these to check documented commands).
CLI_OPTIONS = ("--help", "-h")
CLI_KEYS = ("tasks", "include", "limit", "batch_size", "device", "weights", "num_fewshot", "out")
DEFAULTS: dict[str, Any] = {
    "tasks": None, "include": None, "limit": None, "batch_size": 8, "device": "cpu",
    "weights": "eval", "num_fewshot": None, "out": None,
}  # fmt: skip
# Datasets lm-eval reads from files rather than the hub (datasets' packaged builders).
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}


class EvalError(RuntimeError):
    """An evaluation request that cannot run as given; the message names the key."""


def parse_args(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """(checkpoint path, options) from `PATH key=value ...`; values are YAML (tasks=[a,b])."""
    paths = [a for a in argv if "=" not in a]
    if len(paths) != 1:
        raise EvalError(f"expected one RUN_OR_CHECKPOINT and key=value options, got {argv}")
    opts = dict(DEFAULTS)
    for arg in argv:
        if "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if key not in DEFAULTS:
            raise EvalError(f"{key}: unknown option (known: {', '.join(DEFAULTS)})")
        opts[key] = yaml.safe_load(value) if value else None
    tasks = opts["tasks"]
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise EvalError(
            f"tasks: give one or more task names, e.g. tasks=[arc_easy], got {opts['tasks']!r}"
        )
    opts["tasks"] = list(tasks)
    for key in ("limit", "batch_size", "num_fewshot"):
        v = opts[key]
        if v is not None and (
            not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "num_fewshot" else 1)
        ):
            raise EvalError(f"{key}: expected a positive integer, got {v!r}")
    if opts["weights"] not in ("eval", "params"):
        raise EvalError(f"weights: expected eval or params, got {opts['weights']!r}")
    if opts["include"] is not None and not Path(str(opts["include"])).is_dir():
        raise EvalError(f"include: {opts['include']} is not a directory of task YAMLs")
    check_device(str(opts["device"]))
    return paths[0], opts


def check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise EvalError(f"device: {device!r} is not a torch device ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device: {device} asked for, but this torch sees no CUDA device")


@functools.lru_cache(maxsize=4)
def _manager(include: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=defaults)


def task_manager(tasks: list[str], include: str | None):
    """lm-eval's TaskManager, after checking that every name is a task, group or tag it knows.
    Local tasks alone skip indexing lm-eval's ~15k built-in YAMLs (tens of seconds); the full
    index is built (once per process) only when a name is not in `include`."""
    include = str(include) if include else None
    if include:
        local = _manager(include, False)
        if all(t in local.task_index for t in tasks):
            return local
    manager = _manager(include, True)
    unknown = [t for t in tasks if t not in manager.task_index]
    if unknown:
        where = (
            f"lm-eval's tasks nor {include}"
            if include
            else "lm-eval's tasks (include=DIR adds local ones)"
        )
        raise EvalError(f"tasks: unknown task {', '.join(map(repr, unknown))}: not in {where}")
    return manager


def hub_datasets(manager, tasks: list[str]) -> dict[str, str]:
    """task -> its hub dataset, for the named tasks (and a group's or tag's members) that read one."""
    found: dict[str, str] = {}
    todo, seen = list(tasks), set()
    while todo:
        name = todo.pop()
        entry = manager.task_index.get(name) if isinstance(name, str) else None
        if entry is None or name in seen:
            continue
        seen.add(name)
        cfg = entry.cfg or {}
        members = cfg.get("task", []) if "group" in cfg else []
        todo += [m for m in members if isinstance(m, str)]
        todo += [n for n, e in manager.task_index.items() if name in e.tags]  # a tag's tasks
        dataset = cfg.get("dataset_path")
        if (
            isinstance(dataset, str)
            and dataset not in LOCAL_BUILDERS
            and not os.path.isdir(dataset)
        ):
            found[name] = dataset
    return found


def go_offline_if_unreachable(manager, tasks: list[str]) -> str | None:
    """With a hub dataset to read and no hub, make `datasets` use its cache only, so a cached
    dataset still loads and a missing one fails at once instead of retrying for minutes.
    Returns what a missing dataset's error should say ("task reads X; the hub ..."), or None."""
    from snoo_train.data.hub import hub_offline, hub_unreachable

    needed = hub_datasets(manager, tasks)
    if not needed:
        return None
    reads = ", ".join(f"{t} reads {d}" for t, d in sorted(needed.items()))
    if hub_offline():
        return f"{reads}: not in the local cache and HF_HUB_OFFLINE is set"
    unreachable = hub_unreachable()
    if unreachable is None:
        return None
    import datasets.config
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    return f"{reads}: not in the local cache and the hub {unreachable}"


def hf_tokenizer(cfg):
    """The run's tokenizer as a `transformers` tokenizer (the byte one through an adapter)."""
    from snoo_train.data.build import training_tokenizer_name

    name = training_tokenizer_name(cfg.data)
    if name == "byte":
        from snoo_train.data.hf_byte_tokenizer import HFByteTokenizer

        return HFByteTokenizer()
    from snoo_train.data.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(name)


def check_installed() -> None:
    """EvalError (naming how to install it) when lm-eval cannot be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(
            "lm-eval is not installed: `make install` (the lock has it) or pip install 'snoo-train[eval]'"
        ) from None


def prepare(tasks: list[str], include: str | None):
    """(task manager, offline message) for the tasks: unknown names fail here, before any model
    is loaded; see task_manager and go_offline_if_unreachable."""
    manager = task_manager(tasks, include)
    return manager, go_offline_if_unreachable(manager, tasks)


def load_tasks(manager, opts: dict[str, Any], offline: str | None = None) -> None:
    """Build the tasks once, reading their datasets (into `datasets`' cache): a dataset that
    cannot be read fails here, not in the middle of an evaluation."""
    try:
        manager.load(opts["tasks"])
    except ConnectionError as e:
        if offline is None:
            raise
        raise EvalError(f"tasks: {offline}") from e


def run_tasks(
    model, tokenizer, manager, opts: dict[str, Any], offline: str | None = None
) -> dict[str, Any] | None:
    """lm_eval.simple_evaluate on the in-memory model, where it is (HFLM places only models it
    loads); lm-eval's results dict (None on a process with LOCAL_RANK > 0: lm-eval keeps the
    results on local rank 0). `offline`: what to say when `datasets` refuses a hub dataset that
    is not cached (go_offline_if_unreachable)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=opts["batch_size"], device=str(opts["device"])
    )
    try:
        return simple_evaluate(
            model=lm, tasks=opts["tasks"], task_manager=manager, limit=opts["limit"],
            num_fewshot=opts["num_fewshot"], log_samples=False, bootstrap_iters=1000,  # acc and other means: the analytic stderr, no resampling
        )  # fmt: skip
    except ConnectionError as e:  # datasets' offline refusal of a dataset missing from the cache
        if offline is None:
            raise
        raise EvalError(f"tasks: {offline}") from e


def results_path(root: Path, step: int) -> Path:
    """Where the results of `step` go: `<run>/downstream/step_XXXXXXXX.json`."""
    return root / "downstream" / f"step_{step:08d}.json"


def write_results(out: Path, header: dict[str, Any], results: dict[str, Any]) -> dict[str, float]:
    """Write {**header, "lm_eval": results} (samples left out) to `out`; the scores."""
    from lm_eval.utils import handle_non_serializable

    results.pop("samples", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {**header, "lm_eval": results}
    out.write_text(json.dumps(doc, indent=2, default=handle_non_serializable))
    return scores(results)


def scores(results: dict[str, Any]) -> dict[str, float]:
    """{"downstream/<task>/<metric>": value} for every metric (not stderr, not sample counts)."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if "," not in key or metric.endswith("_stderr") or isinstance(value, bool):
                continue  # name, alias, sample_len; stderr goes to the table and the JSON
            if isinstance(value, (int, float)):
                out[f"downstream/{task}/{metric}"] = float(value)
    return out


def format_table(results: dict[str, Any]) -> str:
    """One line per task and metric: value, stderr and the number of documents scored."""
    lines = [f"{'task':<24} {'metric':<12} {'value':>8} {'stderr':>8} {'docs':>6}"]
    for task, metrics in results["results"].items():
        n = (
            results.get("n-samples", {})
            .get(task, {})
            .get("effective", metrics.get("sample_len", ""))
        )
        for key, value in metrics.items():
            metric, _, _flt = key.partition(",")
            if not _flt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{metric}_stderr,{_flt}")
            err = f"{err:.4f}" if isinstance(err, (int, float)) else "-"
            lines.append(f"{task:<24} {metric:<12} {value:>8.4f} {err:>8} {n!s:>6}")
    return "\n".join(lines)


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory holding `<run>/checkpoints/step_N`, if it is one (has a config.yaml or
    metrics); None for a checkpoint copied elsewhere."""
    run = checkpoint.parent.parent
    if checkpoint.parent.name == "checkpoints" and any(
        (run / f).exists() for f in ("config.yaml", "metrics.jsonl")
    ):
        return run
    return None


def record(run: Path, cfg, step: int, numbers: dict[str, float], result_file: Path) -> None:
    """Append the numbers to the run's metrics.jsonl and its summary.json (if it has one)."""
    with open(run / cfg.logging.metrics_file, "a") as f:
        f.write(json.dumps({"step": step, **numbers}) + "\n")
    summary = run / "summary.json"
    if summary.exists():
        doc = json.loads(summary.read_text())
        doc.setdefault("downstream", {})[str(step)] = {**numbers, "results_file": str(result_file)}
        tmp = summary.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, summary)


def log_to_wandb(run: Path, cfg, step: int, numbers: dict[str, float]) -> None:
    """Send the scores to the run's wandb run (logging.wandb.mode offline or online), resumed by
    the id the trainer wrote (<run>/wandb_run_id; a new run if there is none). wandb drops a
    `step=` below its last one, so the scores carry their training step as `step`, the x axis
    of the downstream/ charts (define_metric)."""
    wb = cfg.logging.wandb
    if wb.mode == "disabled":
        return
    import wandb

    from snoo_train.metrics import check_wandb_online

    check_wandb_online(wb)  # online without a key or a server: one line, in seconds
    id_file = run / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    handle = wandb.init(
        id=run_id or None, resume="allow" if run_id else None, project=wb.project, entity=wb.entity,
        name=wb.name, group=wb.group, tags=list(wb.tags), dir=str(run), mode=wb.mode,
    )  # fmt: skip
    handle.define_metric("step")
    handle.define_metric("downstream/*", step_metric="step")
    handle.log({"step": step, **numbers})
    handle.finish()


def evaluate(path: str | Path, opts: dict[str, Any]) -> dict[str, Any]:
    """Run the tasks on the checkpoint; returns {"step", "scores", "results", "file"}."""
    from snoo_train.export import load_model

    manager, offline = prepare(opts["tasks"], opts["include"])  # bad names fail before the model loads
    checkpoint = resolve_checkpoint(path)
    step = read_state(checkpoint)["step"]
    model, cfg = load_model(checkpoint, weights=opts["weights"])
    results = run_tasks(model.to(opts["device"]), hf_tokenizer(cfg), manager, opts, offline)
    run = run_dir_of(checkpoint)
    out = Path(opts["out"]) if opts["out"] else results_path(run or checkpoint, step)
    header = {"step": step, "checkpoint": str(checkpoint), "weights": opts["weights"]}
    numbers = write_results(out, header, results)
    if run is not None:
        record(run, cfg, step, numbers, out)
        log_to_wandb(run, cfg, step, numbers)
    return {"step": step, "scores": numbers, "results": results, "file": out}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        check_installed()
        path, opts = parse_args(argv)
        done = evaluate(path, opts)
    except (EvalError, ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(format_table(done["results"]))
    print(f"step {done['step']}: results in {done['file']}")


if __name__ == "__main__":  # pragma: no cover
    main()
