"""How does SNOO's gain over tuned AdamW move with the global batch size, at a fixed token budget?
(GPA reports gains growing with batch size; nobody has shown it for SNOO.)

    python bench/batch_size.py                               # llama_tiny, batches 4,8,16,32, 2 seeds
    python bench/batch_size.py --model llama_small --batch-sizes 8,32,128 --jobs 2
    python bench/batch_size.py --batch-sizes 4,16 --seeds 0 --tokens 40000 --seq-len 64   # a quick look

The budget is a number of training tokens (--tokens; by default 20 per non-embedding
parameter at --seq-len), the same at every batch size b, so b sets the number of steps
B_b = tokens / (b x seq_len). At each b, bench/convergence.py runs in full (called in this
process; its runs are their own processes, as always): AdamW's lr and SNOO's inner lr swept on a
grid, SNOO's k swept, the winners repeated on every seed with their crossing and budget speedups.

How the grids are re-tuned per batch size (the rule, so that no side is tuned by hand at one
size only): the learning-rate grids are the reference grids (--baseline-lrs, --snoo-lrs, set for
--ref-batch) scaled by sqrt(b / ref_batch), the square-root rule Adam's lr follows with batch
size (Malladi et al. 2022), a grid edge extended by convergence.py when a winner sits on it;
SNOO's k is swept over --ks at (eta, mu) = --outer-eta-mu, since the paper ties k to the
tokens per outer step (a larger batch moves more tokens per inner step).

Writes bench/results/batch_size_<model>.json and .png (speedups and final losses against b,
mean and sample std over seeds, with convergence.py's verdict on seed noise) and prints a
table; each batch size's full convergence report is bench/results/batch_size_<model>_b<b>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import convergence
import matplotlib
from common import REPO, compose_config, repo_path
from convergence import finite_or_null

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from snoo_train.models.flops import non_embedding_parameters  # noqa: E402


def scaled(grid: str, factor: float) -> str:
    return ",".join(f"{float(v) * factor:.3g}" for v in grid.split(",") if v.strip())


def one_batch_size(b: int, steps: int, args, stem: Path) -> dict:
    """convergence.py at batch size b; its report."""
    factor = math.sqrt(b / args.ref_batch)
    eta, mu = args.outer_eta_mu.split(",")
    outer = ";".join(f"{k},{eta},{mu}" for k in args.ks.split(","))
    argv = [
        "--model", args.model, "--steps", str(steps), "--batch-size", str(b), "--seq-len", str(args.seq_len),
        "--eval-interval", str(max(1, steps // args.evals)), "--eval-batches", str(args.eval_batches),
        "--baseline-lrs", scaled(args.baseline_lrs, factor), "--snoo-lrs", scaled(args.snoo_lrs, factor),
        "--outer", outer, "--fractions", args.fractions, "--seeds", args.seeds, "--jobs", str(args.jobs),
        "--threads", str(args.threads), "--out", str(stem.parent / f"{stem.name}_b{b}"), *args.overrides,
    ]  # fmt: skip
    print(f"[b={b}] {steps} steps; lr grids x {factor:.3g}; k in {args.ks}", flush=True)
    return convergence.main(argv)


def row(b: int, steps: int, report: dict, path: Path) -> dict:
    seeds = report["seeds"]
    return {
        "batch_size": b, "steps": steps,
        "baseline": report["baseline"], "snoo": report["snoo"],
        "crossing_speedup": seeds["crossing_speedup"], "budget_speedup": seeds["budget_speedup"],
        "baseline_final": seeds["baseline_final"], "snoo_final": seeds["snoo_final"], "gain": seeds["gain"],
        "report": repo_path(path),
    }  # fmt: skip


def _mean_std(stats: dict) -> tuple[float, float]:
    mean, std = stats.get("mean"), stats.get("std")
    return (math.nan if mean is None else mean), (0.0 if std is None else std)


def draw(rows: list[dict], out: Path, title: str) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    bs = [r["batch_size"] for r in rows]
    for key, marker in (("crossing_speedup", "o"), ("budget_speedup", "s")):
        mean, std = zip(*(_mean_std(r[key]) for r in rows))
        left.errorbar(bs, mean, yerr=std, marker=marker, capsize=3, label=key.replace("_", " "))
    left.axhline(1.0, color="gray", linestyle=":")
    left.set(xlabel="global batch size (sequences)", ylabel="SNOO speedup over tuned AdamW",
             title="speedup at a fixed token budget (mean, std over seeds)")  # fmt: skip
    for key, color in (("baseline_final", "tab:blue"), ("snoo_final", "tab:red")):
        mean, std = zip(*(_mean_std(r[key]) for r in rows))
        right.errorbar(bs, mean, yerr=std, color=color, marker="o", capsize=3, label=key.replace("_", " "))
    right.set(xlabel="global batch size (sequences)", ylabel="final validation loss", title="final losses")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_tiny")
    p.add_argument("--batch-sizes", default="4,8,16,32")
    p.add_argument("--tokens", type=int, default=None, help="the token budget (default: 20 per non-embedding parameter)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ref-batch", type=int, default=8, help="the batch size the reference lr grids are for")
    p.add_argument("--baseline-lrs", default="7.5e-4,1.5e-3,3e-3")
    p.add_argument("--snoo-lrs", default="5e-4,1e-3,2e-3")
    p.add_argument("--ks", default="10,20,40", help="SNOO's k grid at every batch size")
    p.add_argument("--outer-eta-mu", default="0.7,0.5")
    p.add_argument("--fractions", default="0.95,0.9,0.85,0.8,0.7")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--evals", type=int, default=20, help="evaluations per run (the crossing's resolution)")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="output stem (default bench/results/batch_size_<model>)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_intermixed_args(argv)
    t0 = time.time()
    stem = Path(args.out or REPO / "bench" / "results" / f"batch_size_{args.model}")
    model_cfg = compose_config([f"model={args.model}", *args.overrides], str(stem.parent)).model
    non_embedding = non_embedding_parameters(model_cfg)
    tokens = args.tokens or int(20 * non_embedding)
    rows = []
    for b in sorted(int(v) for v in args.batch_sizes.split(",")):
        steps = max(1, round(tokens / (b * args.seq_len)))
        report = one_batch_size(b, steps, args, stem)
        rows.append(row(b, steps, report, stem.parent / f"{stem.name}_b{b}.json"))
    out = {
        "benchmark": "batch_size",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "bench/batch_size.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model,
        "settings": {"tokens": tokens, "non_embedding_params": non_embedding, "seq_len": args.seq_len,
                     "ref_batch": args.ref_batch, "baseline_lrs": args.baseline_lrs, "snoo_lrs": args.snoo_lrs,
                     "ks": args.ks, "outer_eta_mu": args.outer_eta_mu, "seeds": args.seeds,
                     "lr_rule": "reference grids x sqrt(b / ref_batch)", "overrides": list(args.overrides)},  # fmt: skip
        "rows": rows,
        "wall_time_s": time.time() - t0,
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(finite_or_null(out), indent=2) + "\n")
    draw(rows, stem.with_suffix(".png"), f"{args.model}: SNOO vs AdamW at {tokens:,} tokens")
    print(f"\n{'b':>4} {'steps':>6} {'crossing':>16} {'budget':>16} {'AdamW final':>18} {'SNOO final':>18}  verdict")
    for r in rows:
        cells = [f"{m:.3f} +- {s:.3f}" for m, s in (_mean_std(r[k]) for k in
                 ("crossing_speedup", "budget_speedup", "baseline_final", "snoo_final"))]  # fmt: skip
        print(f"{r['batch_size']:>4} {r['steps']:>6} {cells[0]:>16} {cells[1]:>16} {cells[2]:>18} {cells[3]:>18}  "
              f"{r['gain'].get('verdict')}")
    print(f"wall time {out['wall_time_s'] / 60:.1f} min; wrote {repo_path(stem.with_suffix('.json'))}")
    return out


if __name__ == "__main__":
    main()
