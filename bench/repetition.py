"""Repeated data: does SNOO's validation loss degrade more slowly than its inner optimizer's as
the same corpus is seen for more epochs? (SNOO paper, section 4, observation 2.)

    python bench/repetition.py                                   # llama_tiny, E = 1,2,4,8,16, 2 seeds
    python bench/repetition.py --model llama_small --jobs 2 --threads 1
    python bench/repetition.py --pairs adamw --epochs 1,4 --seeds 0 --steps 60   # a quick look

A fixed token budget B steps (by default 20 training tokens per non-embedding parameter, as in
bench/convergence.py) is drawn from a corpus cut to 1/E of it, for each E in --epochs: the
loader runs E epochs over it (each its own seeded permutation). The corpus is the embedded
standard-library text: its documents are split once into a held-out set (the project's
document-hash rule at --val-fraction) and training documents; corpus E is the shortest prefix
of the training documents holding B/E budget tokens (the last one cut to fit). Each E gets its own token store, made once
with `python -m snoo_train.data.prepare` from a local dataset directory with a `validation`
split, so every run of one E reads the same windows in the same order, and every E is
evaluated on the same held-out documents.

Sides, per pair in --pairs: the inner optimizer (adamw or muon) and SNOO around it. Each side's
learning rate is tuned once, at E=1 on the first seed, over its grid (--adamw-lrs, --muon-lrs;
SNOO's inner lr over --snoo-adamw-lrs, --snoo-muon-lrs, at --outer k,eta,mu), and kept for every
E and seed. Muon's grids set optim.muon_lr (its matrix lr). The figure: final validation loss
against E per side (mean and sample std over seeds), and the gap inner - SNOO per E, paired by
seed, with the verdict against seed noise (snoo_train.analysis.speedup.gain_versus_seed_noise).
The plot's right panel draws each side's weight norm (metrics.jsonl's weight_norm, SNOO's slow
weights) against step at E=1 and the largest E, first seed.

Writes bench/results/repetition_<model>.json and .png (the runs under
bench/results/repetition_<model>_runs/, kept so that a rerun reuses them; the corpora and stores
under --data-dir, out of the results) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib
from common import REPO, compose_config, repo_path
from convergence import Spec, best, finite_or_null, parse_floats, run_all

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from snoo_train.analysis.speedup import gain_versus_seed_noise, seed_spread  # noqa: E402
from snoo_train.data.sources import list_stdlib, read_stdlib  # noqa: E402
from snoo_train.data.split import is_validation  # noqa: E402
from snoo_train.models.flops import non_embedding_parameters, steps_for_tokens_per_param  # noqa: E402

# pair -> (the inner optim config, SNOO's, the key the lr grid sets)
PAIRS = {"adamw": ("adamw", "snoo_adamw", "optim.lr"), "muon": ("muon", "snoo_muon", "optim.muon_lr")}


def byte_tokens(text: str) -> int:
    """Tokens a document adds under the byte tokenizer: its UTF-8 bytes and one end-of-text."""
    return len(text.encode("utf-8", errors="surrogatepass")) + 1


def split_corpus(val_fraction: float) -> tuple[list[str], list[str]]:
    """(training documents in source order, held-out documents) of the embedded corpus."""
    texts = list(read_stdlib(list_stdlib(None)).documents["text"])
    held_out = [t for t in texts if is_validation(t, val_fraction)]
    return [t for t in texts if not is_validation(t, val_fraction)], held_out


def write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def make_store(epochs: int, budget_tokens: int, train: list[str], held_out: list[str], work: Path) -> dict:
    """The token store of corpus E under `work` (made once; reused when its manifest is there)."""
    want = -(-budget_tokens // epochs)
    docs, total = [], 0
    for text in train:
        if total >= want:
            break
        room = want - total - 1  # the last document is cut so that the corpus is B/E tokens
        if byte_tokens(text) - 1 > room:
            text = text.encode("utf-8", errors="surrogatepass")[:room].decode("utf-8", errors="ignore")
        docs.append(text)
        total += byte_tokens(text)
    if total < want:
        raise SystemExit(f"the embedded corpus holds {total:,} training tokens, fewer than B/E = {want:,} "
                         f"for E={epochs}: lower --tokens-per-param or use a smaller --model")
    store = work / f"store_E{epochs}"
    if not (store / "manifest.json").is_file():
        source = work / f"corpus_E{epochs}"
        source.mkdir(parents=True, exist_ok=True)
        write_jsonl(source / "train.jsonl", docs)
        write_jsonl(source / "validation.jsonl", held_out)
        cmd = [sys.executable, "-m", "snoo_train.data.prepare", "data=hf", f"data.path={source}",
               "data.val_split=validation", "data.tokenizer=byte", f"prepare.out={store}"]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   HF_DATASETS_OFFLINE="1")  # fmt: skip
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"prepare failed for E={epochs}:\n{done.stderr[-2000:]}")
    return {"epochs": epochs, "documents": len(docs), "train_tokens": total, "store": store}


def tune(pair: str, args, store: Path, B: int, work: Path) -> dict[str, Spec]:
    """Each side of the pair tuned at E=1 on the first seed: its winner."""
    inner, snoo, lr_key = PAIRS[pair]
    data = ["data=prepared", f"data.path={store}"]
    outer = tuple(float(v) for v in args.outer.split(","))
    k, eta, mu = int(outer[0]), outer[1], outer[2]
    grids = {inner: getattr(args, f"{inner}_lrs"), snoo: getattr(args, f"snoo_{inner}_lrs")}
    specs = {
        side: [Spec(side, side, lr, B, *((k, eta, mu) if side == snoo else ()), seed=args.seeds[0],
                    lr_key=lr_key, extra=data) for lr in parse_floats(grids[side])]
        for side in (inner, snoo)
    }  # fmt: skip
    run_all([s for side in specs.values() for s in side], args, work)
    return {side: best(runs) for side, runs in specs.items()}


def epoch_runs(winners: dict[str, Spec], corpora: list[dict], args, B: int, work: Path) -> list[tuple[int, Spec]]:
    """(E, run) for every side's winning settings on every corpus and seed (E=1's first seed is
    the tuning run, found finished in the work directory)."""
    runs = [
        (corpus["epochs"], Spec(side, win.optim, win.lr, B, win.k, win.eta, win.mu, seed=seed, lr_key=win.lr_key,
                                extra=["data=prepared", f"data.path={corpus['store']}"]))
        for corpus in corpora for seed in args.seeds for side, win in winners.items()
    ]  # fmt: skip
    run_all([s for _, s in runs], args, work)
    return runs


def summarise(runs: list[tuple[int, Spec]], pairs: list[str], epochs: list[int]) -> dict:
    """Per pair and E: each side's final loss over seeds, and the paired gap inner - SNOO."""
    out = {}
    for pair in pairs:
        inner, snoo, _ = PAIRS[pair]
        rows = {}
        for e in epochs:
            by = {side: {s.seed: s.final_val_loss for E, s in runs if s.optim == side and E == e}
                  for side in (inner, snoo)}  # fmt: skip
            seeds = sorted(by[inner])
            a, b = [by[inner][s] for s in seeds], [by[snoo][s] for s in seeds]
            rows[str(e)] = {inner: seed_spread(a), snoo: seed_spread(b),
                            "gap": seed_spread([x - y for x, y in zip(a, b)]),
                            "verdict": gain_versus_seed_noise(a, b)}  # fmt: skip
        out[pair] = rows
    return out


def _norm_at(curve: dict, fraction: float) -> float | None:
    """The logged weight norm at the first logged step >= fraction x the last one."""
    steps, norms = curve.get("norm_step") or [], curve.get("weight_norm") or []
    if not steps:
        return None
    at = fraction * steps[-1]
    return next(n for s, n in zip(steps, norms) if s >= at)


def weight_norms(runs: list[tuple[int, Spec]], pairs: list[str], epochs: list[int]) -> dict:
    """The paper's observation 1, per pair and E: each side's final weight norm (SNOO: its slow
    weights) and its change over the last 20% of steps (< 0: still falling late), over seeds,
    and the paired difference SNOO - inner of the final norm."""
    out = {}
    for pair in pairs:
        inner, snoo, _ = PAIRS[pair]
        rows = {}
        for e in epochs:
            curves = {side: {s.seed: s.curve for E, s in runs if s.optim == side and E == e and s.curve}
                      for side in (inner, snoo)}  # fmt: skip
            seeds = sorted(set(curves[inner]) & set(curves[snoo]))
            row: dict[str, Any] = {}
            for side in (inner, snoo):
                final = [_norm_at(curves[side][s], 1.0) for s in seeds]
                late = [_norm_at(curves[side][s], 1.0) - _norm_at(curves[side][s], 0.8) for s in seeds]
                row[side] = {"final": seed_spread(final), "late_change": seed_spread(late)}
            row["snoo_minus_inner"] = seed_spread([
                _norm_at(curves[snoo][s], 1.0) - _norm_at(curves[inner][s], 1.0) for s in seeds
            ])  # fmt: skip
            rows[str(e)] = row
        out[pair] = rows
    return out


def draw(report: dict, runs: list[tuple[int, Spec]], out: Path) -> None:
    pairs, epochs = report["settings"]["pairs"], report["settings"]["epochs"]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.6))
    colors = {"adamw": "tab:blue", "snoo_adamw": "tab:red", "muon": "tab:green", "snoo_muon": "tab:purple"}
    for pair in pairs:
        inner, snoo, _ = PAIRS[pair]
        rows = report["table"][pair]
        for side in (inner, snoo):
            mean = [_number(rows[str(e)][side]["mean"]) for e in epochs]
            std = [_number(rows[str(e)][side]["std"]) for e in epochs]
            left.errorbar(epochs, mean, yerr=std, color=colors[side], marker="o", capsize=3, label=side)
        gap = [_number(rows[str(e)]["gap"]["mean"]) for e in epochs]
        middle.errorbar(epochs, gap, yerr=[_number(rows[str(e)]["gap"]["std"]) for e in epochs],
                        color=colors[snoo], marker="s", capsize=3, label=f"{inner} - {snoo}")  # fmt: skip
    for ax in (left, middle):
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    left.set(xlabel="epochs over the corpus (fixed token budget)", ylabel="final validation loss",
             title="final loss vs repetition (mean, std over seeds)")  # fmt: skip
    middle.axhline(0.0, color="gray", linestyle=":")
    middle.set(xlabel="epochs", ylabel="inner - SNOO final loss (> 0: SNOO lower)", title="SNOO's gain")
    first = report["settings"]["seeds"][0]
    for e, s in runs:
        if s.seed == first and e in (epochs[0], epochs[-1]) and s.curve.get("weight_norm"):
            right.plot(s.curve["norm_step"], s.curve["weight_norm"], color=colors[s.optim],
                       linestyle="-" if e == epochs[0] else "--", label=f"{s.optim} E={e}")
    right.set(xlabel="optimizer step", ylabel="L2 norm of the weights (slow for SNOO)", title="weight norm")
    right.legend(fontsize=7)
    right.grid(True, alpha=0.3)
    fig.suptitle(f"{report['model']}: repeated data at a fixed budget of {report['settings']['steps']} steps")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _number(v: float | None) -> float:
    return math.nan if v is None else v  # a side that diverged on every seed


def print_table(report: dict) -> None:
    for pair, rows in report["table"].items():
        inner, snoo, _ = PAIRS[pair]
        print(f"\n{'E':>3} {inner + ' final':>20} {snoo + ' final':>24} {'gap (inner - SNOO)':>22}  verdict")
        for e, row in rows.items():
            cells = [f"{_number(row[k]['mean']):.4f} +- {_number(row[k]['std']):.4f}" for k in (inner, snoo, "gap")]
            print(f"{e:>3} {cells[0]:>20} {cells[1]:>24} {cells[2]:>22}  {row['verdict'].get('verdict')}")
        print(f"\n{'E':>3} {'weight norm: ' + inner:>24} {snoo:>16} {'SNOO - inner':>16}   last 20% of steps: {inner}, {snoo}")
        for e, row in report.get("weight_norms", {}).get(pair, {}).items():
            cells = [f"{_number(row[k]['final']['mean']):.2f} +- {_number(row[k]['final']['std']):.2f}" for k in (inner, snoo)]
            diff = row["snoo_minus_inner"]
            late = [f"{_number(row[k]['late_change']['mean']):+.2f}" for k in (inner, snoo)]
            print(f"{e:>3} {cells[0]:>24} {cells[1]:>16} {_number(diff['mean']):>+9.2f} +- {_number(diff['std']):.2f}   {late[0]}, {late[1]}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_tiny")
    p.add_argument("--epochs", default="1,2,4,8,16")
    p.add_argument("--pairs", default="adamw,muon", help="inner optimizers, each against SNOO around it")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=None, help="the budget B (default: from --tokens-per-param)")
    p.add_argument("--tokens-per-param", type=float, default=20.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--val-fraction", type=float, default=0.02, help="held-out share of the corpus")
    p.add_argument("--adamw-lrs", default="1.5e-3,3e-3,6e-3")
    p.add_argument("--snoo-adamw-lrs", default="1e-3,2e-3,4e-3")
    p.add_argument("--muon-lrs", default="0.01,0.02,0.04")
    p.add_argument("--snoo-muon-lrs", default="0.005,0.01,0.02")
    p.add_argument("--outer", default="20,0.7,0.5", help="SNOO's k,eta,mu")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="output stem (default bench/results/repetition_<model>)")
    p.add_argument("--data-dir", default=None,
                   help="the corpora and token stores, kept out of the results (default: a directory under the system temp dir)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_intermixed_args(argv)
    t0 = time.time()
    args.seeds = [int(v) for v in args.seeds.split(",")]
    # what convergence.run_one reads; no packed-token cache: the runs read token stores
    args.seed, args.lr_key, args.data_cache = args.seeds[0], "optim.lr", None
    epochs = sorted(int(v) for v in args.epochs.split(","))
    pairs = [v for v in args.pairs.split(",") if v]
    stem = Path(args.out or REPO / "bench" / "results" / f"repetition_{args.model}")
    work = Path(f"{stem}_runs")
    work.mkdir(parents=True, exist_ok=True)

    model_cfg = compose_config([f"model={args.model}", *args.overrides], str(work)).model
    B = args.steps or steps_for_tokens_per_param(model_cfg, args.tokens_per_param, args.batch_size, args.seq_len)
    budget_tokens = B * args.batch_size * args.seq_len
    train, held_out = split_corpus(args.val_fraction)
    print(f"{args.model}: B={B} steps = {budget_tokens:,} tokens; corpus {len(train)} training and "
          f"{len(held_out)} held-out documents", flush=True)
    data_dir = Path(args.data_dir or Path(tempfile.gettempdir()) / f"snoo_train_repetition_{args.model}")
    data_dir.mkdir(parents=True, exist_ok=True)
    corpora = [make_store(e, budget_tokens, train, held_out, data_dir) for e in epochs]

    winners: dict[str, Spec] = {}
    for pair in pairs:
        print(f"[tune] {pair} and snoo_{pair} at E={epochs[0]}, seed {args.seeds[0]}", flush=True)
        winners.update(tune(pair, args, corpora[0]["store"], B, work))
    print(f"[runs] {len(winners)} sides x E in {epochs} x seeds {args.seeds}", flush=True)
    runs = epoch_runs(winners, corpora, args, B, work)

    report = {
        "benchmark": "repetition",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "bench/repetition.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "jobs": args.jobs, "threads_per_job": args.threads},  # fmt: skip
        "model": args.model,
        "settings": {"steps": B, "budget_tokens": budget_tokens, "epochs": epochs, "pairs": pairs,
                     "seeds": args.seeds, "non_embedding_params": non_embedding_parameters(model_cfg),
                     "batch_size": args.batch_size, "seq_len": args.seq_len, "outer": args.outer,
                     "val_fraction": args.val_fraction, "overrides": list(args.overrides)},  # fmt: skip
        "corpora": [{**c, "store": c["store"].name, "epochs_drawn": budget_tokens / c["train_tokens"]}
                    for c in corpora],  # fmt: skip
        "winners": {side: {"lr": s.lr, "lr_key": s.lr_key, "k": s.k, "eta": s.eta, "mu": s.mu,
                           "final_val_loss": s.final_val_loss} for side, s in winners.items()},  # fmt: skip
        "table": summarise(runs, pairs, epochs),
        "weight_norms": weight_norms(runs, pairs, epochs),
        "runs": [{**asdict(s), "run_dir": repo_path(s.run_dir), "epochs": e} for e, s in runs],
        "wall_time_s": time.time() - t0,
        # What the runs took, reused ones included (their own wall times, over the parallel jobs).
        "runs_wall_time_s": sum(s.wall_time_s or 0.0 for _, s in runs) / args.jobs,
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(finite_or_null(report), indent=2) + "\n")
    draw(report, runs, stem.with_suffix(".png"))
    print_table(report)
    print(f"wall time {report['wall_time_s'] / 60:.1f} min; wrote {repo_path(stem.with_suffix('.json'))}")
    return report


if __name__ == "__main__":
    main()
