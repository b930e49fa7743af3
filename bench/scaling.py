"""SNOO's speedup against model size, at a compute-optimal budget for every size.

    python bench/scaling.py                                   # CPU: llama_tiny, llama_mini, llama_midi
    python bench/scaling.py --sizes llama_125m,llama_1b --device cuda --batch-size 64 --seq-len 1024 \\
        --jobs 1 data=prepared data.path=tokens/fineweb       # (one line) on GPUs

For each size, bench/convergence.py at --tokens-per-param (default 20) training tokens per
non-embedding parameter: both sides tuned on a small inner-lr grid (the baseline's and SNOO's),
SNOO's (k, eta, mu) on --outer, then the winners' settings on every seed of --seeds, each with its
crossing and budget speedup. Every run is a real training process whose directory stays under
--work (a rerun reuses finished runs, so an interrupted study continues).

Prints a table (size, non-embedding parameters, tokens, each side's final loss, crossing and
budget speedup, each mean +- standard deviation over seeds) and writes <out>.json and <out>.png:
speedup against non-embedding parameters and against training FLOPs (log x axes, error bars =
the seeds' standard deviation). A log-linear trend is fitted and drawn only when the sizes'
error bars do not all overlap; otherwise the plot and the JSON say that they overlap and no
trend is claimed.

JSON fields: sizes [{model, non_embedding_params, flops_per_token, steps, tokens,
tokens_per_param, train_flops, baseline_final, snoo_final, crossing_speedup, budget_speedup (each
{mean, std, min, max, reached, seeds, values}), gain {mean_gain, noise, verdict}, baseline, snoo
(the winners' settings), wall_time_s, report (that size's convergence JSON)}], trend {metric,
fitted, slope_per_decade, reason}, settings, command, date, machine, wall_time_s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import textwrap
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import convergence  # noqa: E402
from common import compose_config, repo_path  # noqa: E402

from snoo_train.models.flops import flops_per_token  # noqa: E402

BYTE_VOCAB = 257


def run_size(model: str, args: argparse.Namespace, work: Path) -> dict:
    """One size through bench/convergence.py; the figures the scaling table needs."""
    t0 = time.time()
    argv = [
        "--model", model, "--tokens-per-param", str(args.tokens_per_param), "--seeds", args.seeds,
        "--baseline-lrs", args.baseline_lrs, "--snoo-lrs", args.snoo_lrs, "--outer", args.outer,
        "--fractions", args.fractions, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
        "--eval-interval", str(args.eval_interval), "--eval-batches", str(args.eval_batches),
        "--jobs", str(args.jobs), "--threads", str(args.threads),
        "--work-dir", str(work / model), "--out", str(work / f"convergence_{model}"),
        *args.overrides,
    ]  # fmt: skip
    report = convergence.main(argv)
    s = report["settings"]
    cfg = compose_config([f"model={model}", *args.overrides], str(work)).model
    per_token = flops_per_token(cfg, BYTE_VOCAB if args.vocab is None else args.vocab, args.seq_len)
    tokens = s["steps"] * s["tokens_per_step"]
    seeds = report["seeds"]
    return {
        "model": model,
        "non_embedding_params": s["non_embedding_params"],
        "flops_per_token": per_token,
        "steps": s["steps"],
        "tokens": tokens,
        "tokens_per_param": s["tokens_per_param"],
        "train_flops": per_token * tokens,
        **{k: seeds[k] for k in ("baseline_final", "snoo_final", "crossing_speedup", "budget_speedup", "gain")},
        "baseline": report["baseline"]["settings"],
        "snoo": report["snoo"]["settings"],
        "wall_time_s": time.time() - t0,
        "report": repo_path(work / f"convergence_{model}.json"),
    }


def trend(sizes: list[dict], metric: str) -> dict:
    """A least-squares line of speedup against log10(non-embedding parameters), only when it can
    be told from noise: every size reached the speedup on every seed (at least two, so that it
    has a spread), and the sizes' mean +- std intervals do not all overlap."""
    partial = [r["model"] if "model" in r else r["non_embedding_params"] for r in sizes
               if r[metric].get("seeds", 2) < 2 or r[metric].get("reached", 2) < r[metric].get("seeds", 2)]  # fmt: skip
    if partial:
        return {"metric": metric, "fitted": False,
                "reason": f"{metric} was not reached on every seed (at least 2) at {', '.join(map(str, partial))}: "
                          "no spread to tell a trend from noise, none claimed"}  # fmt: skip
    pts = [(math.log10(r["non_embedding_params"]), r[metric]["mean"], r[metric]["std"] or 0.0) for r in sizes]
    if len(pts) < 2:
        return {"metric": metric, "fitted": False, "reason": f"{metric} at fewer than 2 sizes"}
    lo = max(m - s for _, m, s in pts)
    hi = min(m + s for _, m, s in pts)
    if lo <= hi:
        return {"metric": metric, "fitted": False, "reason": "the sizes' error bars (mean +- std over seeds) overlap: no trend claimed"}
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return {"metric": metric, "fitted": True, "slope_per_decade": slope, "intercept": my - slope * mx,
            "reason": "every size reached it on every seed and the error bars do not all overlap"}  # fmt: skip


def draw(report: dict, out: Path) -> None:
    sizes = report["sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, xkey, xlabel in ((axes[0], "non_embedding_params", "non-embedding parameters"), (axes[1], "train_flops", "training FLOPs (full budget)")):
        for metric, marker, color in (("crossing_speedup", "o", "tab:blue"), ("budget_speedup", "s", "tab:orange")):
            pts = [(r[xkey], r[metric]["mean"], r[metric]["std"] or 0.0) for r in sizes if r[metric]["mean"] is not None]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=marker,
                            color=color, capsize=4, linestyle="-",
                            label=metric.replace("_", " ") + " (mean of the seeds that reached it)")  # fmt: skip
                for r in sizes:  # how many seeds each point stands for
                    if r[metric]["mean"] is not None:
                        ax.annotate(f"{r[metric]['reached']}/{r[metric]['seeds']} seeds", (r[xkey], r[metric]["mean"]),
                                    textcoords="offset points", xytext=(4, 6), fontsize=7, color=color)  # fmt: skip
            missed = [r[xkey] for r in sizes if r[metric]["mean"] is None]
            if missed:
                ax.plot(missed, [1.0] * len(missed), marker="x", color=color, linestyle="none", label=f"{metric.split('_')[0]}: not reached")
        fit = report["trend"]
        if fit["fitted"] and xkey == "non_embedding_params":
            xs = sorted(r[xkey] for r in sizes)
            ax.plot(xs, [fit["intercept"] + fit["slope_per_decade"] * math.log10(x) for x in xs], color="gray",
                    linestyle="--", label=f"trend {fit['slope_per_decade']:+.2f} per decade")  # fmt: skip
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel="SNOO speedup over the baseline")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    note = "" if report["trend"]["fitted"] else "\n" + textwrap.shorten(report["trend"]["reason"], 150)
    fig.suptitle(f"SNOO vs {report['settings']['baseline']} at {report['settings']['tokens_per_param']:g} tokens per "
                 f"non-embedding parameter (mean +- std over seeds {report['settings']['seeds']}){note}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def spread(stats: dict, fmt: str) -> str:
    return convergence.format_spread(stats, fmt)


def print_table(report: dict) -> None:
    print(f"\n{'size':<12}{'non-emb':>10}{'tokens':>12}{'baseline final':>20}{'SNOO final':>20}{'crossing':>38}{'budget':>38}  gain vs noise")
    for r in report["sizes"]:
        print(f"{r['model']:<12}{r['non_embedding_params']:>10,}{r['tokens']:>12,}{spread(r['baseline_final'], '.4f'):>20}"
              f"{spread(r['snoo_final'], '.4f'):>20}{spread(r['crossing_speedup'], '.2f'):>38}{spread(r['budget_speedup'], '.2f'):>38}"
              f"  {r['gain']['verdict']}")  # fmt: skip
    fit = report["trend"]
    if fit["fitted"]:
        print(f"trend: {fit['metric']} {fit['slope_per_decade']:+.3f} per decade of non-embedding parameters")
    else:
        print(f"trend: none claimed ({fit['reason']})")


def replot(out: Path) -> dict:
    report = json.loads(out.with_suffix(".json").read_text())
    report["trend"] = trend(report["sizes"], report["trend"]["metric"])
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    draw(report, out.with_suffix(".png"))
    print_table(report)
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="llama_tiny,llama_mini,llama_midi", help="model presets, smallest first")
    p.add_argument("--tokens-per-param", type=float, default=20.0)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--baseline", default="adamw")
    p.add_argument("--baseline-lrs", default="3e-3,6e-3")
    p.add_argument("--snoo-lrs", default="3e-3,6e-3")
    p.add_argument("--outer", default="20,0.7,0.5;28,0.68,0.37")
    p.add_argument("--fractions", default="0.95,0.9,0.85,0.8,0.7")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda: every run on the GPU (trainer.device)")
    p.add_argument("--vocab", type=int, default=None, help="tokenizer vocabulary for the FLOP count (default: bytes, 257)")
    p.add_argument("--work", default=None, help="run directories (default <out>_runs/)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "scaling"))
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    p.add_argument("--replot", action="store_true", help="recompute the trend, redraw and reprint from <out>.json; train nothing")
    args = p.parse_intermixed_args(argv)
    if args.replot:
        return replot(Path(args.out))
    if args.device:
        args.overrides = [*args.overrides, f"trainer.device={args.device}"]
    t0 = time.time()
    out = Path(args.out)
    work = Path(args.work or f"{out}_runs")
    work.mkdir(parents=True, exist_ok=True)
    sizes = [run_size(m, args, work) for m in args.sizes.split(",")]
    report = {
        "benchmark": "scaling",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "bench/scaling.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "jobs": args.jobs},
        "settings": {"baseline": args.baseline, "tokens_per_param": args.tokens_per_param, "seeds": args.seeds,
                     "baseline_lrs": args.baseline_lrs, "snoo_lrs": args.snoo_lrs, "outer": args.outer,
                     "fractions": args.fractions, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "overrides": list(args.overrides)},  # fmt: skip
        "sizes": sizes,
        "trend": trend(sizes, "crossing_speedup"),
        "wall_time_s": time.time() - t0,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(convergence.finite_or_null(report), indent=2) + "\n")
    draw(report, out.with_suffix(".png"))
    print_table(report)
    print(f"wall time {report['wall_time_s'] / 60:.1f} min; wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
