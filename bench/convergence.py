"""Does SNOO reach the baseline's loss with less compute? Both sides tuned, both figures shown.

    python bench/convergence.py                              # llama_small, AdamW baseline, 20 tokens/param
    python bench/convergence.py --model llama_tiny --seeds 0,1,2      # the winners on three seeds
    python bench/convergence.py --baseline muon --lr-key optim.muon_lr
        --baseline-lrs 0.01,0.02,0.04 --snoo-lrs 0.005,0.01,0.02  # (one line) Muon vs SNOO(Muon)
    python bench/convergence.py --model llama_tiny --steps 40 --jobs 1 data.seq_len=64

The budget B: --steps, or by default the steps that give --tokens-per-param (20, the
compute-optimal ratio the paper measures at and above) training tokens per *non-embedding*
parameter (decoder layers and final norm, without the token embedding and the tied head:
snoo_train.models.non_embedding_parameters; Kaplan et al.'s count, which does not move with the
vocabulary). At llama_small that is 10,636 steps of 8 x 256 tokens, hours on a CPU; llama_tiny
is 889 steps. bench/scaling.py runs this over several sizes.

Every run is a real `python -m snoo_train.train` process (its metrics.jsonl, config.yaml and
summary.json stay in the work directory, so each figure traces back to its run); up to --jobs
run at once, each with --threads torch threads. Same model, data, seed and batch everywhere.

1. Sweep, full budget B = --steps:
   * baseline: optim=<baseline> at each --baseline-lrs;
   * SNOO: optim=snoo_<baseline> at each --snoo-lrs (inner lr) with the first --outer setting
     (k, eta, mu), then every other --outer setting at the best of those inner lrs.
   A side whose winning lr is at an end of its grid gets one more lr beyond that end.
   Winner of each side: lowest final validation loss. target = the baseline winner's.
2. Crossing speedup: B / the step at which the SNOO winner's validation curve first reaches
   the target (interpolated between evaluations), for every SNOO run.
3. Budget speedup: the SNOO winner's settings retrained with max_steps = f x B for
   --fractions (default 0.95 ... 0.7, 0.05 apart, so a 1.1x gain is resolved; its cosine
   schedule scaled to the budget), largest f first, --jobs at a time,
   until one misses the target; speedup = 1 / the smallest f that ends at or below the target
   with every larger f also reaching it (snoo_train.analysis.speedup). A figure that is not reached
   is reported as such, never as a number.

4. Seeds (--seeds 0,1,2): the sweep runs on the first seed; the two winners' settings are
   trained again on every other seed, each with its own crossing and budget speedup. The JSON's
   `seeds` holds every seed's figures and the mean +- sample standard deviation of each final
   loss and speedup, and says whether SNOO's final-loss gain is larger than the seed noise.

Caveat, stated in the JSON too: the winners are chosen on the same validation loss they are
compared on, and SNOO gets more settings than the baseline, so a small speedup is within the
selection noise; rerun with another --seed to check it.

Writes <out>.json (fields below), <out>.png (validation curves of the sweep; final loss per
budget) and prints a table. JSON fields:
    target_val_loss, crossing_speedup, crossing_step, budget_speedup, budget_fraction
    baseline / snoo: the winning settings and final validation loss
    budget: {fraction: final val loss} of the SNOO winner's settings
    runs: every run with side, settings, status (ok | diverged | failed), final_val_loss,
          crossing_step, crossing_speedup, run_dir and its validation curve (step, val_loss)
    lr_at_grid_edge: whether a side's winning lr is still at an end of its (extended) grid
    settings, machine, command, date, caveat
    wall_time_s (this invocation), runs_reused (runs found finished in the work directory)
    seeds (with --seeds): per_seed [{seed, baseline_final, snoo_final, crossing_speedup,
          budget_speedup}], the same four keys as {mean, std, min, max, reached, seeds, values},
          gain {mean_gain, noise, diffs, verdict}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

from common import compose_config  # noqa: E402

from snoo_train.analysis.plot import styles  # noqa: E402
from snoo_train.analysis.runs import load_run  # noqa: E402
from snoo_train.analysis.speedup import (  # noqa: E402
    budget_speedup,
    crossing_point,
    format_speedup,
    gain_versus_seed_noise,
    seed_spread,
    smallest_sufficient_fraction,
)
from snoo_train.models.flops import non_embedding_parameters, steps_for_tokens_per_param  # noqa: E402

CAVEAT = (
    "Winners are picked on the validation loss they are compared on, and SNOO tries more "
    "settings than the baseline: a speedup near 1 is within selection noise. Check with --seed."
)


@dataclass
class Spec:
    """One training run: its side, settings and, once run, its outcome."""

    side: str  # baseline | snoo | budget
    optim: str
    lr: float
    steps: int
    k: int | None = None
    eta: float | None = None
    mu: float | None = None
    fraction: float = 1.0
    name: str = ""
    run_dir: str = ""
    status: str = "pending"
    final_val_loss: float = math.nan
    curve: dict = field(default_factory=dict)
    crossing_step: float | None = None
    crossing_speedup: float | None = None
    seed: int | None = None  # None: --seed (the sweep); set for the --seeds repeats
    reused: bool = False  # found finished in the work directory, not trained by this invocation
    wall_time_s: float | None = None  # the run's own wall time (summary.json: train + eval)
    lr_key: str | None = None  # the key `lr` sets; None: --lr-key
    extra: list = field(default_factory=list)  # more Hydra overrides for this run (e.g. its data)

    def settings(self) -> str:
        s = f"{self.optim} lr={self.lr:g}"
        if self.k is not None:
            s += f" k={self.k} eta={self.eta:g} mu={self.mu:g}"
        s += f" f={self.fraction:g}" if self.side == "budget" else ""
        return s + (f" seed={self.seed}" if self.seed is not None else "")


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_outer(text: str) -> list[tuple[int, float, float]]:
    """ "20,0.7,0.5;10,0.7,0.9" -> [(20, 0.7, 0.5), (10, 0.7, 0.9)]"""
    settings = []
    for item in text.split(";"):
        k, eta, mu = item.split(",")
        settings.append((int(k), float(eta), float(mu)))
    return settings


def overrides_for(spec: Spec, args: argparse.Namespace) -> list[str]:
    o = [
        f"model={args.model}",
        f"optim={spec.optim}",
        f"{spec.lr_key or args.lr_key}={spec.lr}",
        f"trainer.max_steps={spec.steps}",
        f"trainer.batch_size={args.batch_size}",
        f"data.seq_len={args.seq_len}",
        f"trainer.seed={args.seed if spec.seed is None else spec.seed}",
        # Budget runs are judged by their final loss only: no periodic evaluation to pay for.
        f"trainer.eval_interval={0 if spec.side == 'budget' else args.eval_interval}",
        f"trainer.log_interval={args.eval_interval}",
        f"trainer.eval_batches={args.eval_batches}",
        "trainer.progress=false",
        "logging.wandb.mode=disabled",
    ]
    if spec.k is not None:
        o += [f"optim.k={spec.k}", f"optim.outer_lr={spec.eta}", f"optim.outer_momentum={spec.mu}"]
    return o + list(spec.extra) + list(args.overrides)


def run_one(spec: Spec, args: argparse.Namespace, work: Path) -> Spec:
    overrides = overrides_for(spec, args)
    # The name says what the run is; the hash, that every override matched (a rerun with other
    # settings never reuses a stale directory).
    digest = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
    spec.name = spec.settings().replace(" ", "_").replace("=", "") + f"_B{spec.steps}_{digest}"
    run_dir = work / spec.name
    spec.run_dir = str(run_dir)
    spec.reused = (run_dir / "summary.json").is_file()
    if not spec.reused:
        # A run cut short (no summary) starts over: the trainer appends to metrics.jsonl.
        shutil.rmtree(run_dir, ignore_errors=True)
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(args.threads),
            MKL_NUM_THREADS=str(args.threads),
            PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            WANDB_MODE="disabled",
        )
        # No checkpoints: the run directories are results (kept in bench/results), not restarts.
        # A token store (data=prepared) is its own cache: no data.cache_dir for it.
        cache = [f"data.cache_dir={args.data_cache}"] if args.data_cache else []
        cmd = [sys.executable, "-m", "snoo_train.train", *overrides, *cache, f"hydra.run.dir={run_dir}",
               "checkpoint.interval=0", "trainer.resume=none"]  # fmt: skip
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            diverged = "training loss is" in done.stderr or "gradient norm is" in done.stderr
            spec.status = "diverged" if diverged else "failed"
            (work / f"{spec.name}.stderr").write_text(done.stderr)
            print(f"  {spec.status}: {spec.settings()} ({done.stderr.strip().splitlines()[-1:]})",
                  flush=True)
            return spec
    run = load_run(run_dir)
    steps, losses = run.series("val_loss", "step")
    norm_steps, norms = run.series("weight_norm", "step")
    spec.curve = {"step": steps, "val_loss": losses, "norm_step": norm_steps, "weight_norm": norms}
    summary = json.loads((run_dir / "summary.json").read_text())
    spec.wall_time_s = summary["train_time_s"] + summary["eval_time_s"]
    spec.final_val_loss = losses[-1] if losses else math.nan
    spec.status = "ok" if math.isfinite(spec.final_val_loss) else "diverged"
    print(f"  {spec.settings():<48} final val_loss {spec.final_val_loss:.4f}", flush=True)
    return spec


def run_all(specs: list[Spec], args: argparse.Namespace, work: Path) -> list[Spec]:
    # Longest first, so the pool does not end with one long run alone.
    order = sorted(specs, key=lambda s: -s.steps)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda s: run_one(s, args, work), order))
    return specs


def finite_or_null(obj):
    """NaN and inf are not JSON: a run without a finite loss is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_null(v) for v in obj]
    return obj


def edge_extension(side: list[Spec]) -> Spec | None:
    """One more lr beyond the grid (half the smallest or twice the largest) when the side's
    winner sits at that end: a winner at the edge may not be that side's best."""
    lrs = sorted(s.lr for s in side)
    win = best(side)
    if len(lrs) < 2 or lrs[0] < win.lr < lrs[-1]:
        return None
    lr = win.lr / 2 if win.lr == lrs[0] else win.lr * 2
    return Spec(win.side, win.optim, lr, win.steps, win.k, win.eta, win.mu)


def run_budgets(fractions: list[float], win: Spec, target: float, args, work: Path) -> list[Spec]:
    """Train the winner's settings at f x B, largest f first, --jobs budgets at a time. The
    search stops after a batch in which some budget missed the target (or the full-budget run
    itself missed it): the budget speedup needs every larger f to reach it, so smaller budgets
    could not change the figure."""
    done: list[Spec] = []
    if not win.final_val_loss <= target:
        print("  skipped: the full-budget run does not reach the target", flush=True)
        return done
    for i in range(0, len(fractions), args.jobs):
        batch = [
            Spec("budget", win.optim, win.lr, max(1, round(f * win.steps)), win.k, win.eta,
                 win.mu, fraction=f, seed=win.seed)
            for f in fractions[i : i + args.jobs]
        ]
        done += run_all(batch, args, work)
        if not all(s.final_val_loss <= target for s in batch):
            break
    return done


def best(specs: list[Spec]) -> Spec:
    ok = [s for s in specs if s.status == "ok"]
    if not ok:
        raise SystemExit("error: every run of one side failed; see the .stderr files in the work dir")
    return min(ok, key=lambda s: s.final_val_loss)


def draw_weight_norms(ax, report: dict, specs: list[Spec]) -> None:
    """The two winners' weight norms against step (the paper's section 4, observation 1: SNOO's
    slow weights keep a smaller norm, still falling late, while the baseline's level off)."""
    winners = [s for s in specs if s.name in (report["baseline"]["name"], report["snoo"]["name"])]
    drawn = False
    for spec, color in zip(winners, ("tab:blue", "tab:red")):
        if spec.curve.get("weight_norm"):
            ax.plot(spec.curve["norm_step"], spec.curve["weight_norm"], color=color, label=spec.settings())
            drawn = True
    if not drawn:  # runs made before metrics.jsonl had weight_norm
        ax.text(0.5, 0.5, "no weight_norm in these runs' metrics", transform=ax.transAxes, ha="center")
    ax.set(xlabel="optimizer step", ylabel="L2 norm of the weights (slow for SNOO)", title="weight norm, winners")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)


def draw(report: dict, specs: list[Spec], out: Path) -> None:
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.6))
    draw_weight_norms(middle, report, specs)
    target = report["target_val_loss"]
    full = [s for s in specs if s.side != "budget" and s.curve.get("step")]
    for spec, (color, ls, marker) in zip(full, styles()):
        winner = spec.name in (report["baseline"]["name"], report["snoo"]["name"])
        left.plot(spec.curve["step"], spec.curve["val_loss"], color=color, linestyle=ls,
                  marker=marker, markersize=3, markevery=max(1, len(spec.curve["step"]) // 8),
                  linewidth=2.4 if winner else 1.0, alpha=1.0 if winner else 0.7,
                  label=("* " if winner else "") + spec.settings())
        if spec.crossing_step is not None and spec.side == "snoo":
            left.plot([spec.crossing_step], [target], marker="o", markersize=9,
                      markerfacecolor="none", markeredgecolor=color, linestyle="none")
    left.axhline(target, color="gray", linestyle=":", linewidth=1)
    left.set(xlabel="optimizer step", ylabel="validation loss (slow weights for SNOO)",
             title=f"full budget B={report['settings']['steps']} (* = winner; o = reaches target)")
    # Zoom on the part of the curves where the comparison happens.
    finals = [s.final_val_loss for s in full if math.isfinite(s.final_val_loss)]
    if finals:
        left.set_ylim(min(finals) - 0.05, max(finals) + 0.5)
    left.legend(fontsize=6.5, loc="upper right")
    left.grid(True, alpha=0.3)

    fractions = sorted(float(f) for f in report["budget"])
    losses = [report["budget"][str(f)] for f in fractions]
    right.plot(fractions, losses, color="black", marker="s", linestyle="-",
               label=f"SNOO ({report['snoo']['settings']})")
    right.axhline(target, color="gray", linestyle=":", label=f"baseline final {target:.4f}")
    if report["budget_fraction"] is not None:
        right.axvline(report["budget_fraction"], color="black", linestyle="--", linewidth=1,
                      label=f"budget speedup {format_speedup(report['budget_speedup'])}")
    if len(fractions) == 1:
        right.text(0.5, 0.5, "no shorter budgets trained:\nthe full-budget SNOO run does not\n"
                   "reach the baseline's final loss", transform=right.transAxes, ha="center")
    right.set(xlabel="SNOO budget as a fraction of B", ylabel="final validation loss",
              title="budget speedup")
    right.legend(fontsize=7)
    right.grid(True, alpha=0.3)
    fig.suptitle(f"{report['model']}: SNOO vs {report['settings']['baseline']} "
                 f"(crossing {format_speedup(report['crossing_speedup'])}, "
                 f"budget {format_speedup(report['budget_speedup'])})")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def print_table(report: dict, specs: list[Spec]) -> None:
    print(f"\n{report['model']}, B={report['settings']['steps']} steps x "
          f"{report['settings']['tokens_per_step']} tokens, target {report['target_val_loss']:.4f}")
    print(f"{'side':<9}{'settings':<50}{'status':<9}{'final val':>10}{'cross step':>12}{'speedup':>13}")
    for s in sorted(specs, key=lambda s: (s.side, s.optim, -s.fraction, s.lr)):
        cross = "" if s.crossing_step is None else f"{s.crossing_step:.0f}"
        speed = format_speedup(s.crossing_speedup) if s.side == "snoo" else ""
        print(f"{s.side:<9}{s.settings():<50}{s.status:<9}{s.final_val_loss:>10.4f}{cross:>12}{speed:>13}")
    print(f"baseline winner: {report['baseline']['settings']}  final {report['baseline']['final_val_loss']:.4f}")
    print(f"SNOO winner:     {report['snoo']['settings']}  final {report['snoo']['final_val_loss']:.4f}")
    edges = [side for side, edge in report["lr_at_grid_edge"].items() if edge]
    if edges:
        print(f"note: the {' and '.join(edges)} winner's lr is at the edge of its grid")
    print(f"crossing speedup {format_speedup(report['crossing_speedup'])}, "
          f"budget speedup {format_speedup(report['budget_speedup'])} "
          f"(smallest sufficient fraction {report['budget_fraction']})")
    if len(report.get("seeds", {}).get("per_seed", [])) > 1:
        print_seeds(report["seeds"])


def format_spread(stats: dict, fmt: str = ".4f") -> str:
    if stats["mean"] is None:
        return f"not reached on {stats['seeds']} seeds"
    tail = "" if stats["reached"] == stats["seeds"] else f" (reached on {stats['reached']}/{stats['seeds']} seeds)"
    return f"{stats['mean']:{fmt}} +- {stats['std']:{fmt}}{tail}"


def print_seeds(seeds: dict) -> None:
    print(f"\nseeds {seeds['seeds']} (the sweep on the first, the winners' settings on all):")
    print(f"{'seed':<6}{'baseline final':>15}{'SNOO final':>12}{'crossing':>14}{'budget':>14}")
    for row in seeds["per_seed"]:
        print(f"{row['seed']:<6}{row['baseline_final']:>15.4f}{row['snoo_final']:>12.4f}"
              f"{format_speedup(row['crossing_speedup']):>14}{format_speedup(row['budget_speedup']):>14}")
    for key in ("baseline_final", "snoo_final", "crossing_speedup", "budget_speedup"):
        print(f"  {key:<17} {format_spread(seeds[key], '.4f' if 'final' in key else '.2f')}")
    gain = seeds["gain"]
    noise = "unknown" if gain["noise"] is None else f"{gain['noise']:.4f}"
    print(f"  final-loss gain of SNOO {gain['mean_gain']:+.4f} vs seed noise (std) {noise}: {gain['verdict']}")


def repeat_on_seeds(report: dict, base_win: Spec, snoo_win: Spec, seeds: list[int], fractions, args, work) -> dict:
    """The winners' settings on every other seed: each seed's final losses, its crossing speedup
    (against that seed's baseline) and its budget speedup; then mean and spread of each."""
    B = base_win.steps
    per_seed = [{"seed": seeds[0], "baseline_final": base_win.final_val_loss, "snoo_final": snoo_win.final_val_loss,
                 "crossing_speedup": report["crossing_speedup"], "budget_speedup": report["budget_speedup"]}]  # fmt: skip
    extra: list[Spec] = []
    for seed in seeds[1:]:
        print(f"[seed {seed}] the winners' settings again, then SNOO's budgets", flush=True)
        b = Spec("baseline", base_win.optim, base_win.lr, B, seed=seed)
        n = Spec("snoo", snoo_win.optim, snoo_win.lr, B, snoo_win.k, snoo_win.eta, snoo_win.mu, seed=seed)
        run_all([b, n], args, work)
        target = b.final_val_loss
        cross = crossing_point(n.curve.get("step", []), n.curve.get("val_loss", []), target) if n.curve else None
        n.crossing_step, n.crossing_speedup = cross, (B / cross if cross else None)
        budget = run_budgets(fractions, n, target, args, work)
        by_fraction = {1.0: n.final_val_loss, **{s.fraction: s.final_val_loss for s in budget}}
        per_seed.append({"seed": seed, "baseline_final": b.final_val_loss, "snoo_final": n.final_val_loss,
                         "crossing_speedup": n.crossing_speedup, "budget_speedup": budget_speedup(by_fraction, target)})  # fmt: skip
        extra += [b, n, *budget]
    out = {"seeds": seeds, "per_seed": per_seed}
    for key in ("baseline_final", "snoo_final", "crossing_speedup", "budget_speedup"):
        out[key] = seed_spread([row[key] for row in per_seed])
    out["gain"] = gain_versus_seed_noise([r["baseline_final"] for r in per_seed], [r["snoo_final"] for r in per_seed])
    report["_seed_specs"] = extra
    return out


def replot(stem: Path) -> dict:
    report = json.loads(stem.with_suffix(".json").read_text())
    nan = math.nan
    specs = [Spec(**{**r, "final_val_loss": nan if r["final_val_loss"] is None else r["final_val_loss"]})
             for r in report["runs"]]
    draw(report, specs, stem.with_suffix(".png"))
    print_table(report, specs)
    print(f"wrote {stem.with_suffix('.png')}")
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_small")
    p.add_argument("--baseline", default="adamw", help="optim config of the baseline (adamw, muon)")
    p.add_argument("--snoo-optim", default=None, help="optim config of SNOO (default snoo_<baseline>)")
    p.add_argument("--steps", type=int, default=None,
                   help="the full budget B (default: from --tokens-per-param)")
    p.add_argument("--tokens-per-param", type=float, default=20.0,
                   help="B gives this many training tokens per non-embedding parameter (20: compute-optimal)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-interval", type=int, default=30)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr-key", default="optim.lr",
                   help="the lr the sweeps set (optim.muon_lr for Muon's matrix lr)")
    p.add_argument("--baseline-lrs", default="7.5e-4,1.5e-3,3e-3")
    p.add_argument("--snoo-lrs", default="5e-4,1e-3,2e-3", help="SNOO's inner lr")
    p.add_argument("--outer", default="20,0.7,0.5;10,0.7,0.9;28,0.68,0.37",
                   help="k,eta,mu settings separated by ';' (the first one is used for the lr sweep)")
    p.add_argument("--fractions", default="0.95,0.9,0.85,0.8,0.7",
                   help="budgets below 1.0 to try (0.05 apart: resolves a 1.1x speedup)")
    p.add_argument("--seeds", default=None,
                   help="e.g. 0,1,2: the sweep runs on the first, the winners' settings are repeated on the others")
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--work-dir", default=None, help="run directories (default <out>_runs/)")
    p.add_argument("--data-cache", default=os.path.join(tempfile.gettempdir(), "snoo_train_data"),
                   help="packed-token cache shared by the runs (kept out of the results)")
    p.add_argument("--out", default=None, help="output stem (default bench/results/convergence_<model>_<baseline>)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    p.add_argument("--replot", action="store_true",
                   help="redraw <out>.png and reprint the table from <out>.json; train nothing")
    args = p.parse_intermixed_args(argv)
    if args.replot:
        return replot(Path(args.out or REPO / "bench" / "results" / f"convergence_{args.model}_{args.baseline}"))

    t0 = time.time()
    snoo_optim = args.snoo_optim or f"snoo_{args.baseline}"
    stem = Path(args.out or REPO / "bench" / "results" / f"convergence_{args.model}_{args.baseline}")
    work = Path(args.work_dir or f"{stem}_runs")
    work.mkdir(parents=True, exist_ok=True)
    outer = parse_outer(args.outer)
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]
    args.seed = seeds[0]
    model_cfg = compose_config([f"model={args.model}", *args.overrides], str(work)).model
    non_embedding = non_embedding_parameters(model_cfg)
    B = args.steps or steps_for_tokens_per_param(model_cfg, args.tokens_per_param, args.batch_size, args.seq_len)
    print(f"{args.model}: {non_embedding:,} non-embedding parameters; B={B} steps x "
          f"{args.batch_size * args.seq_len} tokens = {B * args.batch_size * args.seq_len / non_embedding:.1f} "
          "tokens per non-embedding parameter", flush=True)

    print(f"[1/3] sweep at B={B}: {args.baseline} lr in {args.baseline_lrs}; {snoo_optim} inner lr "
          f"in {args.snoo_lrs} at (k, eta, mu)={outer[0]}", flush=True)
    base = [Spec("baseline", args.baseline, lr, B) for lr in parse_floats(args.baseline_lrs)]
    snoo = [Spec("snoo", snoo_optim, lr, B, *outer[0]) for lr in parse_floats(args.snoo_lrs)]
    run_all(base + snoo, args, work)
    extra = [edge_extension(side) for side in (base, snoo)]
    if any(extra):
        print(f"[1b] a winner at the edge of its lr grid: also {[s.settings() for s in extra if s]}",
              flush=True)
        run_all([s for s in extra if s], args, work)
        base += [s for s in extra[:1] if s]
        snoo += [s for s in extra[1:] if s]
    best_lr = best(snoo).lr
    if outer[1:]:
        print(f"[2/3] {snoo_optim} (k, eta, mu) in {outer[1:]} at inner lr {best_lr:g}", flush=True)
        snoo += run_all([Spec("snoo", snoo_optim, best_lr, B, *o) for o in outer[1:]], args, work)
    base_win, snoo_win = best(base), best(snoo)
    target = base_win.final_val_loss

    for s in snoo + base:
        if s.curve.get("step"):
            s.crossing_step = crossing_point(s.curve["step"], s.curve["val_loss"], target)
            if s.crossing_step is not None:
                s.crossing_speedup = B / s.crossing_step

    fractions = sorted({f for f in parse_floats(args.fractions) if 0 < f < 1}, reverse=True)
    print(f"[3/3] budgets f x B for f in {fractions} with {snoo_win.settings()}", flush=True)
    budget = run_budgets(fractions, snoo_win, target, args, work)
    by_fraction = {1.0: snoo_win.final_val_loss, **{s.fraction: s.final_val_loss for s in budget}}
    specs = base + snoo + budget

    def winner(s: Spec) -> dict:
        return {"name": s.name, "settings": s.settings(), "lr": s.lr, "k": s.k, "eta": s.eta,
                "mu": s.mu, "final_val_loss": s.final_val_loss}

    # From the run itself: an override (data.seq_len=...) may have changed it.
    summary = json.loads((Path(base_win.run_dir) / "summary.json").read_text())
    tokens_per_step = summary["tokens"] // summary["steps"]
    report = {
        "benchmark": "convergence",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "bench/convergence.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "jobs": args.jobs, "threads_per_job": args.threads,
                    "load_avg_at_end": os.getloadavg()[0]},
        "model": args.model,
        "settings": {"baseline": args.baseline, "snoo": snoo_optim, "steps": B,
                     "non_embedding_params": non_embedding,
                     "tokens_per_param": B * tokens_per_step / non_embedding,
                     "lr_key": args.lr_key,  # what "lr" means in every run's settings
                     "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "tokens_per_step": tokens_per_step, "params": summary["params"],
                     "eval_interval": args.eval_interval,
                     "eval_batches": args.eval_batches, "seed": args.seed,
                     "overrides": list(args.overrides)},
        "target_val_loss": target,
        "baseline": winner(base_win),
        "snoo": winner(snoo_win),
        "crossing_step": snoo_win.crossing_step,
        "crossing_speedup": snoo_win.crossing_speedup,
        "budget": {str(f): loss for f, loss in sorted(by_fraction.items())},
        "budget_fraction": smallest_sufficient_fraction(by_fraction, target),
        "budget_speedup": budget_speedup(by_fraction, target),
        "runs": [asdict(s) for s in specs],
        # A winner at the end of its lr grid may not be that side's best: widen the grid.
        "lr_at_grid_edge": {
            "baseline": base_win.lr in (min(s.lr for s in base), max(s.lr for s in base)),
            "snoo": snoo_win.lr in (min(s.lr for s in snoo), max(s.lr for s in snoo)),
        },
        "caveat": CAVEAT,
        "wall_time_s": time.time() - t0,  # this invocation; reused runs cost it nothing
        "runs_reused": sum(s.reused for s in specs),
    }
    report["seeds"] = repeat_on_seeds(report, base_win, snoo_win, seeds, fractions, args, work)
    if seeds[1:]:
        specs += report.pop("_seed_specs")
        report["runs"] = [asdict(s) for s in specs]
        report["wall_time_s"] = time.time() - t0
        report["runs_reused"] = sum(s.reused for s in specs)
    report.pop("_seed_specs", None)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(finite_or_null(report), indent=2) + "\n")
    draw(report, specs, png_path)
    print_table(report, specs)
    print(f"wall time {report['wall_time_s'] / 60:.1f} min; wrote {json_path} and {png_path}")
    return report


if __name__ == "__main__":
    main()
