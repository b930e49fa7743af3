"""Reading finished (or running) training runs back: their metrics.jsonl and config.yaml.

A run directory is any directory holding a metrics file; a sweep directory (Hydra's
multirun/<time>/, or bench/'s work directories) is searched for the run directories under it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METRICS_FILE = "metrics.jsonl"

# Keys that differ between runs without saying anything about the experiment.
_NOT_A_SETTING = ("run_dir", "logging.", "trainer.progress", "data.cache_dir")


@dataclass
class Run:
    path: Path
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)  # flattened: {"optim.lr": 0.002, ...}
    label: str = ""

    def series(self, metric: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(x, metric) for the records that logged a number for `metric`; x is any logged field."""
        xs, ys = [], []
        for r in self.records:
            if x in r and isinstance(r.get(metric), (int, float)):
                xs.append(float(r[x]))
                ys.append(float(r[metric]))
        return xs, ys

    def vector_series(self, metric: str, x: str = "step") -> tuple[list[float], list[list[float]]]:
        """(x, one list per component) for a list-valued metric such as an MoE layer's expert
        load (`moe/layer0/load`: one fraction per expert)."""
        xs, rows = [], []
        for r in self.records:
            if x in r and isinstance(r.get(metric), list):
                xs.append(float(r[x]))
                rows.append([float(v) for v in r[metric]])
        return xs, [list(col) for col in zip(*rows)]

    def final(self, metric: str) -> float:
        """The last logged value of `metric` (nan if never logged)."""
        _, ys = self.series(metric)
        return ys[-1] if ys else math.nan


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _natural_key(path: Path) -> list[Any]:
    # Hydra numbers sweep jobs 0, 1, ..., 10: sort 2 before 10.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Every run directory in `paths`, in the order given; a sweep directory in job order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / METRICS_FILE).is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted((m.parent for m in p.rglob(METRICS_FILE)), key=_natural_key)
        else:
            raise FileNotFoundError(f"{p}: not a run directory (no {METRICS_FILE}) or sweep directory")
    if not found:
        raise FileNotFoundError(f"no {METRICS_FILE} under {', '.join(map(str, paths))}")
    return found


def load_run(path: str | Path) -> Run:
    path = Path(path)
    records = []
    for line in (path / METRICS_FILE).read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a run still being written: its last line may be partial
    config_file = path / "config.yaml"
    config = flatten(yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    return Run(path=path, records=records, config=config, label=path.name)


def label_runs(runs: list[Run]) -> None:
    """Label each run by the settings that differ between the runs (e.g. "optim=adamw lr=0.003"),
    so a sweep's curves are told apart by what the sweep changed; the directory name otherwise."""
    keys = sorted({k for r in runs for k in r.config})
    differing = [
        k
        for k in keys
        if not k.startswith(_NOT_A_SETTING) and len({repr(r.config.get(k)) for r in runs}) > 1
    ]
    differing.sort(key=lambda k: (not k.endswith(".name"), k))  # what was run, then how
    # "optim.name" reads best as "optim", "optim.lr" as "lr".
    short = {k: k.split(".")[-2] if k.endswith(".name") else k.split(".")[-1] for k in differing}
    if len(set(short.values())) < len(short):  # e.g. model.name and optim.name both differ
        short = {k: k for k in differing}
    for run in runs:
        parts = [f"{short[k]}={run.config.get(k)}" for k in differing]
        run.label = " ".join(parts) if parts else run.path.name


def load_runs(paths: list[str | Path]) -> list[Run]:
    runs = [load_run(p) for p in find_run_dirs(paths)]
    label_runs(runs)
    return runs
