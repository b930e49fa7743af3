"""One comparison table, same model, data, seed, batch and step budget for every method: AdamW,
SNOO, Lookahead, GPA, EMA-Nesterov and Schedule-Free, each at its best inner learning rate.

    python bench/methods.py                                   # llama_small, the six methods, B=500
    python bench/methods.py --methods adamw,snoo_adamw --lrs 1e-3,2e-3
    python bench/methods.py --method-lrs gpa_adamw=2e-3,4e-3,8e-3 --method-lrs snoo_adamw=1e-3,2e-3
    python bench/methods.py --device cuda --jobs 4            # a GPU machine; runs share the GPU
    python bench/methods.py --model llama_tiny --steps 60 --out /tmp/methods_tiny data.seq_len=64

For each method (an optim config in snoo_train/configs/groups/optim/, --methods) its inner learning rate
(optim.lr) is swept over a grid: --lrs for every method, replaced for one method by
--method-lrs METHOD=LR,LR,... (repeatable). Every other setting is the method's own config:
SNOO's k/eta/mu, GPA's mu_x/mu_y, ... and Schedule-Free's constant lr schedule (its config sets
trainer.lr_schedule=constant; every other method keeps the trainer's cosine schedule).
A method whose winning lr sits at an end of its grid gets one more lr beyond that end (half the
smallest, or twice the largest; bench/convergence.py's rule), unless --no-extend; a winner still
at an end afterwards is flagged in the table and JSON (lr_at_grid_edge: low | high | single).

Winner of a method: its lowest final validation loss. target = the --baseline (adamw) winner's
final validation loss. For each method's winner: its final validation loss, the step at which its
validation curve first reaches the target (interpolated between evaluations,
snoo_train.analysis.speedup.crossing_point) and speedup = B / that step, or "not reached". The baseline's
own crossing is B unless its curve dipped to its final value earlier. Validation loss is measured
on the weights each method reports (val_weights in metrics.jsonl: params for AdamW, the slow
weights for SNOO and Lookahead, the averaged sequence x for GPA, EMA-Nesterov and Schedule-Free);
the table states which.

Every run is a real `python -m snoo_train.train` process (bench/convergence.py's run machinery:
runs finished in the work directory with the same overrides are reused), --jobs at a time with
--threads torch threads each (default: the CPU cores split between the jobs). Time at the default
size on a 2-core CPU, estimated (not measured) from llama_small's ~0.35 s per step: 18 runs of
~3.5 min, 2 at a time, plus up to 6 grid extensions: 30 to 45 minutes. The llama_tiny smoke run
(--steps 60, data.seq_len=64, 24 runs with the extensions) took 3 minutes.

Writes <out>.json, <out>.png (the winners' validation curves; final loss against lr for every
run) and prints markdown tables. JSON fields:
    target_val_loss, baseline
    methods: one row per method, in --methods order: method, lr, lr_grid, lr_at_grid_edge,
             status, final_val_loss, delta_vs_baseline, crossing_step, crossing_speedup,
             val_weights, lr_schedule, run_dir
    runs: every run: method, lr, status (ok | diverged | failed), final_val_loss, val_weights,
          lr_schedule, crossing_step, crossing_speedup, wall_time_s, reused, run_dir, curve
    settings, device, machine, command, date, caveat, wall_time_s, runs_reused
--replot redraws the PNG and reprints the tables from the JSON without training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

from convergence import (  # noqa: E402  (a sibling script: bench/ is on sys.path)
    Spec,
    edge_extension,
    finite_or_null,
    parse_floats,
    run_all,
)

from snoo_train.analysis.plot import styles  # noqa: E402
from snoo_train.analysis.runs import load_run  # noqa: E402
from snoo_train.analysis.speedup import crossing_point, format_speedup  # noqa: E402

METHODS = "adamw,snoo_adamw,lookahead_adamw,gpa_adamw,ema_nesterov_adamw,schedule_free_adamw"
NAMES = {
    "adamw": "AdamW",
    "snoo_adamw": "SNOO",
    "lookahead_adamw": "Lookahead",
    "gpa_adamw": "GPA",
    "ema_nesterov_adamw": "EMA-Nesterov",
    "schedule_free_adamw": "Schedule-Free",
}
CAVEAT = (
    "Each winner is picked on the same validation loss it is compared on (one seed, a few lrs "
    "per method, every other hyper-parameter at its config's value): differences of the order of "
    "the seed-to-seed spread are noise. Check with another --seed."
)


def display(method: str) -> str:
    return NAMES.get(method, method)


# -- pure logic: grids, winners, edges, crossings -----------------------------------------------


def parse_lr_grids(methods: list[str], default: str, per_method: list[str] | None) -> dict[str, list[float]]:
    """{method: lrs}: `default` ("1e-3,2e-3") for every method, replaced for a method by a
    per_method item "METHOD=1e-3,2e-3". A per-method grid for a method not compared is an error
    (a typo would otherwise be ignored silently)."""
    grids = {m: parse_floats(default) for m in methods}
    for item in per_method or []:
        method, sep, lrs = item.partition("=")
        if not sep or method.strip() not in grids:
            raise ValueError(f"--method-lrs {item!r}: expected METHOD=LR,LR,... with METHOD in {methods}")
        grids[method.strip()] = parse_floats(lrs)
    for method, lrs in grids.items():
        if not lrs or any(not lr > 0 for lr in lrs):
            raise ValueError(f"{method}: learning rates must be positive, got {lrs}")
    return grids


def winner(runs: list[dict]) -> dict | None:
    """The run with the lowest finite final validation loss among the ok ones; None if none."""
    ok = [r for r in runs if r["status"] == "ok" and _finite(r["final_val_loss"])]
    return min(ok, key=lambda r: r["final_val_loss"]) if ok else None


def grid_edge(runs: list[dict], lr: float) -> str | None:
    """Where `lr` sits in the grid of lrs tried (trained to the end or diverged; a crashed run
    says nothing about its lr): "single" (one lr only), "low", "high" or None (inside)."""
    tried = sorted({r["lr"] for r in runs if r["status"] in ("ok", "diverged")})
    if len(tried) < 2:
        return "single"
    if lr <= tried[0]:
        return "low"
    if lr >= tried[-1]:
        return "high"
    return None


def crossing(curve: dict, target: float, steps: int) -> tuple[float | None, float | None]:
    """(step at which the curve first reaches target, steps / that step); (None, None) if never."""
    if not curve.get("step"):
        return None, None
    losses = [math.nan if v is None else v for v in curve["val_loss"]]
    step = crossing_point(curve["step"], losses, target)
    if step is None:
        return None, None
    return step, (steps / step if step > 0 else math.inf)


def compare(runs: list[dict], methods: list[str], baseline: str, steps: int) -> tuple[float, list[dict]]:
    """The comparison: (target, one row per method in `methods` order).

    `runs` are dicts with at least method, lr, status, final_val_loss and curve ({"step": [...],
    "val_loss": [...]}); val_weights, lr_schedule and run_dir are copied to the rows if present.
    target = the baseline's winner's final validation loss. Also sets crossing_step and
    crossing_speedup on every run."""
    base = winner([r for r in runs if r["method"] == baseline])
    if base is None:
        raise SystemExit(f"error: every {baseline} run failed, so there is no target; "
                         "see the .stderr files in the work directory")
    target = base["final_val_loss"]
    for r in runs:
        r["crossing_step"], r["crossing_speedup"] = crossing(r.get("curve") or {}, target, steps)
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        win = winner(mine)
        row = {
            "method": method,
            "name": display(method),
            "status": "ok",
            "lr_grid": sorted({r["lr"] for r in mine}),
            "lr": None, "lr_at_grid_edge": None, "final_val_loss": None,
            "delta_vs_baseline": None, "crossing_step": None, "crossing_speedup": None,
            "val_weights": None, "lr_schedule": None, "run_dir": None,
        }  # fmt: skip
        if win is None:
            statuses = {r["status"] for r in mine}
            row["status"] = "diverged" if "diverged" in statuses else "failed"
            row["val_weights"] = next((r.get("val_weights") for r in mine if r.get("val_weights")), None)
            row["lr_schedule"] = next((r.get("lr_schedule") for r in mine if r.get("lr_schedule")), None)
        else:
            row.update(
                lr=win["lr"],
                lr_at_grid_edge=grid_edge(mine, win["lr"]),
                final_val_loss=win["final_val_loss"],
                delta_vs_baseline=win["final_val_loss"] - target,
                crossing_step=win["crossing_step"],
                crossing_speedup=win["crossing_speedup"],
                val_weights=win.get("val_weights"),
                lr_schedule=win.get("lr_schedule"),
                run_dir=win.get("run_dir"),
            )
        rows.append(row)
    return target, rows


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# -- tables and figure (from the report alone, so --replot needs no runs) -----------------------


def _fmt_lr(lr: float | None) -> str:
    return "-" if lr is None else f"{lr:.3g}"


def tables(report: dict) -> str:
    s = report["settings"]
    base = display(report["baseline"])
    target = report["target_val_loss"]
    lines = [
        f"{report['model']} ({s['params'] / 1e6:.2f}M params), B={s['steps']} steps x "
        f"{s['tokens_per_step']} tokens, seed {s['seed']}, device {report['device']['used']}; "
        f"target = {base}'s final validation loss {target:.4f}",
        "",
        f"| method | val weights | lr schedule | inner lr | lr grid | final val loss | vs {base} "
        f"| steps to {base}'s final | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["methods"]:
        edge = row["lr_at_grid_edge"]
        lr = _fmt_lr(row["lr"]) + (f" ({edge} edge)" if edge in ("low", "high") else "")
        lr += " (single lr)" if edge == "single" else ""
        grid = ",".join(_fmt_lr(v) for v in row["lr_grid"])
        if row["status"] != "ok":
            final = delta = cross = row["status"]
            speed = "-"
        else:
            final = f"{row['final_val_loss']:.4f}"
            delta = f"{row['delta_vs_baseline']:+.4f}"
            cross = "not reached" if row["crossing_step"] is None else f"{row['crossing_step']:.0f}"
            speed = format_speedup(row["crossing_speedup"])
        lines.append(f"| {row['name']} | {row['val_weights'] or '-'} | {row['lr_schedule'] or '-'} "
                     f"| {lr} | {grid} | {final} | {delta} | {cross} | {speed} |")
    edges = [r["name"] for r in report["methods"] if r["lr_at_grid_edge"] in ("low", "high")]
    if edges:
        lines.append(f"\nlr at the edge of its grid (its best lr may lie beyond): {', '.join(edges)}")
    lines += ["", "All runs:", "", "| method | lr | status | final val loss | steps to target |",
              "|---|---|---|---|---|"]
    for r in sorted(report["runs"], key=lambda r: (report["settings"]["methods"].index(r["method"]), r["lr"])):
        final = "-" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}"
        cross = "not reached" if r["crossing_step"] is None else f"{r['crossing_step']:.0f}"
        lines.append(f"| {display(r['method'])} | {_fmt_lr(r['lr'])} | {r['status']} | {final} "
                     f"| {cross if r['status'] == 'ok' else '-'} |")
    return "\n".join(lines)


def draw(report: dict, out: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    target = report["target_val_loss"]
    winners = {r["run_dir"] for r in report["methods"] if r["status"] == "ok"}
    by_dir = {r["run_dir"]: r for r in report["runs"]}
    finals = []
    for row, (color, ls, marker) in zip(report["methods"], styles()):
        run = by_dir.get(row["run_dir"])
        label = f"{row['name']} lr={_fmt_lr(row['lr'])} ({row['val_weights'] or '?'})"
        if run and run["curve"].get("step"):
            steps, losses = run["curve"]["step"], run["curve"]["val_loss"]
            left.plot(steps, [math.nan if v is None else v for v in losses], color=color,
                      linestyle=ls, marker=marker, markersize=3,
                      markevery=max(1, len(steps) // 8), linewidth=1.8, label=label)
            finals.append(row["final_val_loss"])
            if row["crossing_step"] is not None:
                left.plot([row["crossing_step"]], [target], marker="o", markersize=9,
                          markerfacecolor="none", markeredgecolor=color, linestyle="none")
        sweep = sorted((r["lr"], r["final_val_loss"]) for r in report["runs"]
                       if r["method"] == row["method"] and r["final_val_loss"] is not None)
        if sweep:
            right.plot(*zip(*sweep), color=color, linestyle=ls, marker=marker, label=row["name"])
            if row["run_dir"] in winners:
                right.plot([row["lr"]], [row["final_val_loss"]], marker="*", markersize=14,
                           color=color, linestyle="none")
    for ax in (left, right):
        ax.axhline(target, color="gray", linestyle=":", linewidth=1)
        ax.grid(True, alpha=0.3)
    if finals:
        left.set_ylim(min(finals) - 0.05, max(finals) + 0.5)
    base = display(report["baseline"])
    left.set(xlabel="optimizer step", ylabel="validation loss (each method's val_weights)",
             title=f"winners, B={report['settings']['steps']} (o = reaches {base}'s final loss)")
    left.legend(fontsize=7, loc="best")
    right.set_xscale("log")
    right.set(xlabel="inner learning rate", ylabel="final validation loss",
              title="lr sweep (* = winner; diverged runs not drawn)")
    right.legend(fontsize=7)
    fig.suptitle(f"{report['model']}: methods at the same budget "
                 f"(target {target:.4f} = {base}'s final validation loss)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# -- running --------------------------------------------------------------------------------------


def run_record(spec: Spec) -> dict:
    """A finished Spec as a JSON-ready run record, with what the run's own files say about the
    weights evaluated (metrics.jsonl: val_weights) and its lr schedule (config.yaml)."""
    val_weights = lr_schedule = device = None
    run_dir = Path(spec.run_dir)
    if (run_dir / "metrics.jsonl").is_file():
        run = load_run(run_dir)
        seen = [r["val_weights"] for r in run.records if "val_loss" in r and "val_weights" in r]
        val_weights = "/".join(dict.fromkeys(seen)) or None
        lr_schedule = run.config.get("trainer.lr_schedule")
        device = run_device(run_dir)
    return {
        "method": spec.optim, "lr": spec.lr, "steps": spec.steps, "status": spec.status,
        "final_val_loss": spec.final_val_loss, "val_weights": val_weights,
        "lr_schedule": lr_schedule, "device": device, "wall_time_s": spec.wall_time_s,
        "reused": spec.reused, "name": spec.name, "run_dir": spec.run_dir, "curve": spec.curve,
    }  # fmt: skip


def run_device(run_dir: Path) -> str | None:
    """The device the run trained on, from its log's first line ("... world size 1 on cuda:0")."""
    log = run_dir / "train.log"
    if not log.is_file():
        return None
    m = re.search(r"world size \d+ on (\S+)", log.read_text(errors="replace"))
    return m.group(1) if m else None


def device_info(requested: str, runs: list[dict]) -> dict:
    info = {"requested": requested, "used": "/".join(sorted({r["device"] for r in runs if r["device"]})) or "unknown"}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001  (the report does not depend on it)
        pass
    return info


def replot(stem: Path) -> dict:
    report = json.loads(stem.with_suffix(".json").read_text())
    draw(report, stem.with_suffix(".png"))
    print(tables(report))
    print(f"wrote {stem.with_suffix('.png')}")
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_small")
    p.add_argument("--methods", default=METHODS, help="optim configs to compare, comma-separated")
    p.add_argument("--baseline", default="adamw", help="the method whose final loss is the target")
    p.add_argument("--lrs", default="1e-3,2e-3,4e-3", help="inner lr grid (optim.lr) of every method")
    p.add_argument("--method-lrs", action="append", default=[], metavar="METHOD=LR,LR,...",
                   help="one method's own lr grid, instead of --lrs (repeatable)")
    p.add_argument("--no-extend", action="store_true",
                   help="do not add an lr beyond the grid for a winner at its edge")
    p.add_argument("--steps", type=int, default=500, help="the budget B, in optimizer steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="trainer.device for every run (auto | cpu | cuda)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: CPU cores / jobs)")
    p.add_argument("--work-dir", default=None, help="run directories (default <out>_runs/)")
    p.add_argument("--data-cache", default=os.path.join(tempfile.gettempdir(), "snoo_train_data"),
                   help="packed-token cache shared by the runs (kept out of the results)")
    p.add_argument("--out", default=None, help="output stem (default bench/results/methods_<model>)")
    p.add_argument("--replot", action="store_true",
                   help="redraw <out>.png and reprint the tables from <out>.json; train nothing")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_intermixed_args(argv)
    stem = Path(args.out or REPO / "bench" / "results" / f"methods_{args.model}")
    if args.replot:
        return replot(stem)

    t0 = time.time()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.baseline not in methods:
        p.error(f"--baseline {args.baseline} must be one of --methods ({','.join(methods)})")
    try:
        grids = parse_lr_grids(methods, args.lrs, args.method_lrs)
    except ValueError as e:
        p.error(str(e))
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    args.lr_key = "optim.lr"  # what bench/convergence.py's overrides_for sets
    hydra_overrides = list(args.overrides)  # as given, for the report
    if args.device:
        args.overrides = [*args.overrides, f"trainer.device={args.device}"]
    work = Path(args.work_dir or f"{stem}_runs")
    work.mkdir(parents=True, exist_ok=True)
    B = args.steps

    grid_text = "; ".join(f"{m} {','.join(map(_fmt_lr, lrs))}" for m, lrs in grids.items())
    print(f"[1/2] B={B} steps, lr grids: {grid_text} ({args.jobs} jobs x {args.threads} threads)",
          flush=True)
    specs = {m: [Spec(m, m, lr, B) for lr in lrs] for m, lrs in grids.items()}
    # Interleaved (lr first), so the first runs to finish already cover every method.
    run_all([s for i in range(max(map(len, specs.values())))
             for m in methods for s in specs[m][i:i + 1]], args, work)  # fmt: skip
    if not args.no_extend:
        extra = {m: edge_extension(ss) for m, ss in specs.items()
                 if any(s.status == "ok" for s in ss)}  # fmt: skip
        extra = {m: s for m, s in extra.items() if s is not None}
        if extra:
            print(f"[2/2] winners at the edge of their lr grid: also "
                  f"{[s.settings() for s in extra.values()]}", flush=True)
            run_all(list(extra.values()), args, work)
            for m, s in extra.items():
                specs[m].append(s)
    all_specs = [s for m in methods for s in specs[m]]
    runs = [run_record(s) for s in all_specs]
    target, rows = compare(runs, methods, args.baseline, B)

    base_dir = next(r["run_dir"] for r in rows if r["method"] == args.baseline)
    summary = json.loads((Path(base_dir) / "summary.json").read_text())
    report = {
        "benchmark": "methods",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "bench/methods.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": device_info(args.device or "auto", runs),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "jobs": args.jobs, "threads_per_job": args.threads,
                    "load_avg_at_end": os.getloadavg()[0]},
        "model": args.model,
        "settings": {"methods": methods, "baseline": args.baseline, "steps": B,
                     "lr_key": args.lr_key, "lr_grids": grids, "extend_grid": not args.no_extend,
                     "batch_size": args.batch_size, "seq_len": args.seq_len,
                     # From the run itself: an override (data.seq_len=...) may have changed it.
                     "tokens_per_step": summary["tokens"] // summary["steps"],
                     "params": summary["params"], "eval_interval": args.eval_interval,
                     "eval_batches": args.eval_batches, "seed": args.seed,
                     "overrides": hydra_overrides},
        "baseline": args.baseline,
        "target_val_loss": target,
        "methods": rows,
        "runs": runs,
        "caveat": CAVEAT,
        "wall_time_s": time.time() - t0,  # this invocation; reused runs cost it nothing
        "runs_reused": sum(s.reused for s in all_specs),
    }
    report = finite_or_null(report)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    draw(report, png_path)
    print()
    print(tables(report))
    print(f"\nwall time {report['wall_time_s'] / 60:.1f} min; wrote {json_path} and {png_path}")
    return report


if __name__ == "__main__":
    main()
