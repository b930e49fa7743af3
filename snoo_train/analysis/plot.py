"""Plot runs against each other and print how much sooner each reaches the baseline's loss.

    python -m snoo_train.analysis.plot RUN_DIR... -o out.png
    python -m snoo_train.analysis.plot multirun/2026-11-22_10-00-00 -o sweep.png       # a whole sweep
    python -m snoo_train.analysis.plot runs/a runs/b --metric snoo/pseudo_grad_norm -o pg.png
    python -m snoo_train.analysis.plot runs/moe --metric moe/layer0/load -o load.png   # one line per expert
    python -m snoo_train.analysis.plot runs/* --baseline runs/adamw --x steps -o steps.png

One panel per x axis (optimizer steps, training tokens, training FLOPs). For a loss metric
(the default val_loss) a dotted line marks the baseline's final value and an open circle marks
where each other run first reaches it; the table printed below gives the speedup at that point
(baseline's final x / run's crossing x, see snoo_train.analysis.speedup). Curves differ in line style
and marker as well as colour, so the figure reads in black and white.

The baseline is --baseline, else the first run without an outer optimizer, else the first run.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed (CI, SLURM, ssh)
import matplotlib.pyplot as plt  # noqa: E402

from snoo_train.analysis.runs import Run, load_runs  # noqa: E402
from snoo_train.analysis.speedup import crossing_point, format_speedup  # noqa: E402

X_AXES = {"steps": ("step", "optimizer steps"), "tokens": ("tokens", "training tokens"),
          "flops": ("flops", "training FLOPs")}

# Line style x marker x grey level: each curve stays distinguishable without colour.
_LINESTYLES = ("-", "--", "-.", ":")
# Cycle lengths 7, 4 and 9 share no factor: no two of the first 252 curves look alike.
_MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*", "P")
_COLORS = ("black", "tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:gray")


def styles():
    """An endless cycle of (color, linestyle, marker) with all three changing together."""
    for i in itertools.count():
        yield (_COLORS[i % len(_COLORS)], _LINESTYLES[i % len(_LINESTYLES)],
               _MARKERS[i % len(_MARKERS)])


def lower_is_better(metric: str) -> bool:
    return "loss" in metric


def pick_baseline(runs: list[Run], baseline: str | None) -> Run:
    if baseline is not None:
        want = Path(baseline).resolve()
        for run in runs:
            if run.path.resolve() == want:
                return run
        raise SystemExit(f"error: --baseline {baseline} is not one of the runs plotted")
    plain = [r for r in runs if r.config.get("optim.outer", "none") == "none"]
    return (plain or runs)[0]


def crossings(runs: list[Run], baseline: Run, metric: str, x_field: str):
    """Per run: (x where it reaches the baseline's final value or None, speedup or None).
    Empty when the metric has no direction or the baseline never logged it."""
    target = baseline.final(metric)
    bx, _ = baseline.series(metric, x_field)
    if not lower_is_better(metric) or not math.isfinite(target) or not bx:
        return {}
    out = {}
    for run in runs:
        xs, ys = run.series(metric, x_field)
        if not xs:
            continue
        x = crossing_point(xs, ys, target)
        out[run.path] = (x, None if x is None else (bx[-1] / x if x > 0 else math.inf))
    return out


def draw(ax, runs: list[Run], baseline: Run, metric: str, x_field: str, x_label: str) -> dict:
    cross = crossings(runs, baseline, metric, x_field)
    for run, (color, ls, marker) in zip(runs, styles()):
        xs, columns = run.vector_series(metric, x_field)
        for i, ys in enumerate(columns):  # a list-valued series: one thin line per component
            ax.plot(xs, ys, color=color, linestyle=ls, marker=_MARKERS[i % len(_MARKERS)],
                    markersize=3, markevery=max(1, len(xs) // 8), linewidth=1.0,
                    label=f"{run.label} [{i}]")
        xs, ys = run.series(metric, x_field)
        if not xs:
            continue
        width = 2.2 if run is baseline else 1.4
        label = run.label + (" (baseline)" if run is baseline else "")
        ax.plot(xs, ys, color=color, linestyle=ls, marker=marker, markersize=4,
                markevery=max(1, len(xs) // 8), linewidth=width, label=label)
        x = cross.get(run.path, (None, None))[0]
        if x is not None and run is not baseline:
            ax.plot([x], [baseline.final(metric)], marker="o", markersize=9, markerfacecolor="none",
                    markeredgecolor=color, markeredgewidth=1.8, linestyle="none")
    if cross:
        ax.axhline(baseline.final(metric), color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    return cross


def print_table(runs: list[Run], baseline: Run, metric: str, table: dict[str, dict]) -> None:
    print(f"baseline: {baseline.label} ({baseline.path}), final {metric} {baseline.final(metric):.4f}")
    axes = list(table)
    header = f"{'run':<44}{'final':>9}" + "".join(f"{'speedup/' + a:>18}" for a in axes)
    print(header)
    for run in runs:
        row = f"{run.label[:43]:<44}{run.final(metric):>9.4f}"
        for a in axes:
            row += f"{format_speedup(table[a].get(run.path, (None, None))[1]):>18}"
        print(row)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m snoo_train.analysis.plot", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories or sweep directories")
    parser.add_argument("-o", "--out", required=True, help="output image (png, pdf, svg)")
    parser.add_argument("--metric", default="val_loss", help="any logged series (default val_loss)")
    parser.add_argument("--x", default="steps,tokens,flops",
                        help=f"comma-separated x axes from {', '.join(X_AXES)}")
    parser.add_argument("--baseline", default=None, help="the run whose final value is the target")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)

    try:
        runs = load_runs(args.runs)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    axes = [a.strip() for a in args.x.split(",") if a.strip()]
    unknown = [a for a in axes if a not in X_AXES]
    if unknown:
        sys.exit(f"error: --x {','.join(unknown)}: choose from {', '.join(X_AXES)}")
    if not any(run.series(args.metric)[0] or run.vector_series(args.metric)[0] for run in runs):
        logged = sorted({k for run in runs for r in run.records for k in r})
        sys.exit(f"error: no run logged {args.metric!r}; logged series: {', '.join(logged)}")
    baseline = pick_baseline(runs, args.baseline)

    fig, panels = plt.subplots(1, len(axes), figsize=(5.5 * len(axes), 4.2), squeeze=False)
    table = {}
    for ax, a in zip(panels[0], axes):
        field, label = X_AXES[a]
        table[a] = draw(ax, runs, baseline, args.metric, field, label)
        if a != "steps":
            ax.set_xscale("linear")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    panels[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(args.title or f"{args.metric}: {len(runs)} run(s)")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)

    if any(table.values()):
        print_table(runs, baseline, args.metric, {a: t for a, t in table.items() if t})
    else:
        for run in runs:
            _, columns = run.vector_series(args.metric)
            final = [round(c[-1], 4) for c in columns] if columns else f"{run.final(args.metric):.4g}"
            print(f"{run.label:<44} final {args.metric} {final}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
