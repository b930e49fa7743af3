"""The data path at scale: prepare throughput, start-up cost against corpus size, loader headroom,
streaming shares and resume cost.

    python bench/data.py                       # ~10 minutes on 2 CPU cores
    python bench/data.py --scale 2 --quick     # a smoke run, a minute

What it does, on the embedded corpus (the standard library's sources) written out as jsonl files,
x1 and x`--scale` (each copy's documents marked so that no two are identical):

1. trains a byte-level BPE tokenizer (`--vocab`, default 8192) on x1 with our tokenizer trainer;
2. prepares x1 with 1 and with 2 workers: tokens/s of each and the ratio (one run, so the
   machine's noise hits both), and whether the two stores are byte-identical;
3. time to the first training step and peak RSS of the training process (llama_tiny, one rank),
   from a store and from today's in-memory path (`data=local`), on x1 and x`--scale`: the store's
   ratio x`--scale`/x1 should be ~1.0, the in-memory path's grows with the corpus;
4. the tokens/s one rank's loader serves from the store, against what llama_small consumes on this
   CPU (measured) and what llama_1b would consume on an H100 at 40% MFU (989 TFLOP/s bf16 dense x
   0.4 / the model's FLOPs per token at seq_len 2048);
5. streaming with 2 ranks: the fraction of the documents each rank tokenized, and the time to
   resume at an early and a late step.

Writes bench/results/data.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, write_report

from snoo_train.config import DataConfig, PrepareJob, TokenizerJob
from snoo_train.configs import compose_job
from snoo_train.data import BatchLoader, build_datasets
from snoo_train.data.prepare import prepare
from snoo_train.data.sources import list_stdlib, read_stdlib
from snoo_train.data.store import TokenStore
from snoo_train.data.tokenizer import HFTokenizer
from snoo_train.data.train_tokenizer import train_tokenizer
from snoo_train.models import PRESETS
from snoo_train.models.flops import flops_per_token

H100_BF16_DENSE = 989e12
FILES = 8  # jsonl files per corpus: the stream's shards


def write_corpus(root: Path, copies: int, max_documents: int | None) -> tuple[Path, int]:
    """The standard library as jsonl, `copies` times over; (directory, bytes of text)."""
    root.mkdir(parents=True, exist_ok=True)
    texts = read_stdlib(list_stdlib(max_documents)).documents["text"]
    handles = [open(root / f"part{i}.jsonl", "w") for i in range(FILES)]
    size = 0
    for c in range(copies):
        for i, text in enumerate(texts):
            doc = text if c == 0 else f"# copy {c}\n{text}"
            size += len(doc.encode())
            handles[(c * len(texts) + i) % FILES].write(json.dumps({"text": doc}) + "\n")
    for h in handles:
        h.close()
    return root, size


def local(corpus: Path) -> list[str]:
    return ["data=local", f"data.files=[{corpus}/*.jsonl]"]


def timed_prepare(corpus: Path, tok: Path, out: Path, workers: int) -> dict:
    job = compose_job(
        "prepare", local(corpus) + [f"data.tokenizer={tok}", f"prepare.out={out}", f"prepare.workers={workers}", "prepare.progress=false"], PrepareJob
    )
    summary = prepare(job)
    return {"workers": workers, "seconds": summary["seconds"], "tokens": summary["tokens"], "tokens_per_s": summary["tokens"] / summary["seconds"]}


def first_step(args: list[str], work: Path) -> dict:
    """Seconds from launch to the first logged training step, and the peak RSS of the process
    (os.wait4's rusage: this child alone). The run is stopped right after step 1."""
    run_dir = tempfile.mkdtemp(dir=work, prefix="run-")
    cmd = [sys.executable, "-m", "snoo_train.train", "model=llama_tiny", "trainer.max_steps=1000", "trainer.log_interval=1",
           "trainer.eval_interval=0", "checkpoint.interval=0", "logging.wandb.mode=disabled", f"hydra.run.dir={run_dir}", *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="2")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds, tail = None, []
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        if " step=1 " in line:
            seconds = time.perf_counter() - t0
            proc.terminate()
            break
    proc.stdout.close()
    _, _, usage = os.wait4(proc.pid, 0)
    shutil.rmtree(run_dir, ignore_errors=True)
    if seconds is None:
        raise RuntimeError("the training run never reached step 1:\n" + "".join(tail))
    return {"seconds_to_first_step": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024}


def loader_tokens_per_s(store: Path, seq_len: int, batch: int, steps: int) -> float:
    train = TokenStore(str(store)).dataset("train", seq_len)
    loader = BatchLoader(train, global_batch_size=batch, grad_accum=1, rank=0, world_size=1, seed=0)
    loader.next_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loader.next_step()
    return steps * batch * seq_len / (time.perf_counter() - t0)


def llama_small_tokens_per_s(store: Path, work: Path, steps: int) -> float:
    run_dir = tempfile.mkdtemp(dir=work, prefix="small-")
    cmd = [sys.executable, "-m", "snoo_train.train", "model=llama_small", "data=prepared", f"data.path={store}",
           f"trainer.max_steps={steps}", "trainer.eval_interval=0", "trainer.eval_batches=1", "checkpoint.interval=0",
           "logging.wandb.mode=disabled", f"hydra.run.dir={run_dir}"]  # fmt: skip
    subprocess.run(cmd, cwd=work, check=True, capture_output=True)
    return json.loads((Path(run_dir) / "summary.json").read_text())["tokens_per_s"]


class Counting(HFTokenizer):
    """The BPE tokenizer, counting the documents it encodes."""

    def __init__(self, path: str):
        super().__init__(path)
        self.documents = 0

    def encode_batch(self, texts):
        self.documents += len(texts)
        return super().encode_batch(texts)


def streaming(corpus: Path, tok: Path, steps: tuple[int, int]) -> dict:
    """2 ranks streaming x1: each rank's share of the documents tokenized, and resume times."""
    cfg = DataConfig(source="local", files=[f"{corpus}/*.jsonl"], streaming=True, tokenizer=str(tok), seq_len=256)

    def rank_loader(rank: int, tokenizer):
        train, _ = build_datasets(cfg, tokenizer, seed=0)
        return BatchLoader(train, global_batch_size=16, grad_accum=1, rank=rank, world_size=2, seed=0)

    counters = [Counting(str(tok)) for _ in range(2)]
    ranks = [rank_loader(r, c) for r, c in enumerate(counters)]
    states = {}
    for step in range(1, steps[1] + 1):
        for loader in ranks:
            loader.next_step()
        if step in steps:
            states[step] = (ranks[0].state_dict(), ranks[0].rank_state())
    for loader in ranks:
        loader.close()
    total = sum(c.documents for c in counters)
    resume = {}
    for step, (state, rank_state) in states.items():
        loader = rank_loader(0, HFTokenizer(str(tok)))
        t0 = time.perf_counter()
        loader.load_state_dict(state)
        loader.load_rank_state(rank_state)
        loader.next_step()
        resume[str(step)] = time.perf_counter() - t0
        loader.close()
    return {"documents_tokenized": [c.documents for c in counters], "fraction": [c.documents / total for c in counters],
            "resume_seconds": resume}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=8, help="the large corpus is this many copies of the standard library")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--quick", action="store_true", help="200 documents per copy, fewer steps: a smoke run")
    p.add_argument("--work", default=None, help="keep the corpora and stores here (default: a temporary directory)")
    p.add_argument("--out", default=str(REPO / "bench/results/data.json"))
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="snoo-data-bench-")).resolve()
    docs = 200 if args.quick else None
    report: dict = {"scale": args.scale, "vocab": args.vocab, "cpu_count": os.cpu_count()}

    x1, bytes1 = write_corpus(work / "x1", 1, docs)
    xn, bytesn = write_corpus(work / f"x{args.scale}", args.scale, docs)
    report["corpus_bytes"] = {"x1": bytes1, f"x{args.scale}": bytesn}
    tok = work / "bpe"
    t0 = time.perf_counter()
    if not tok.exists():
        train_tokenizer(compose_job("train_tokenizer", local(x1) + [f"tokenizer.vocab_size={args.vocab}", f"tokenizer.out={tok}"], TokenizerJob))
    report["tokenizer_seconds"] = time.perf_counter() - t0

    # 2. prepare throughput, 1 vs 2 workers, in one run
    for d in ("s1w1", "s1w2", "sNw2"):
        shutil.rmtree(work / d, ignore_errors=True)
    w1 = timed_prepare(x1, tok, work / "s1w1", 1)
    w2 = timed_prepare(x1, tok, work / "s1w2", 2)
    identical = all(
        (work / "s1w1" / f).read_bytes() == (work / "s1w2" / f).read_bytes() for f in os.listdir(work / "s1w1") if (work / "s1w1" / f).is_file()
    )
    report["prepare"] = {"workers_1": w1, "workers_2": w2, "speedup_2_over_1": w2["tokens_per_s"] / w1["tokens_per_s"], "byte_identical": identical}
    report["prepare"][f"x{args.scale}_workers_2"] = timed_prepare(xn, tok, work / "sNw2", 2)

    # 3. start-up cost against corpus size
    start = {}
    for name, corpus, store in (("x1", x1, work / "s1w2"), (f"x{args.scale}", xn, work / "sNw2")):
        start[name] = {
            "store": first_step(["data=prepared", f"data.path={store}"], work),
            "in_memory": first_step(local(corpus) + [f"data.tokenizer={tok}"], work),
        }
    big = f"x{args.scale}"
    for path in ("store", "in_memory"):
        for key in ("seconds_to_first_step", "peak_rss_bytes"):
            start[f"{path}_{key}_ratio"] = start[big][path][key] / start["x1"][path][key]
    report["start_up"] = start

    # 4. loader headroom
    h100 = 0.4 * H100_BF16_DENSE / flops_per_token(PRESETS["llama_1b"], args.vocab, 2048)
    report["loader"] = {
        "tokens_per_s_seq256_batch16": loader_tokens_per_s(work / "sNw2", 256, 16, 200 if args.quick else 2000),
        "tokens_per_s_seq2048_batch8": loader_tokens_per_s(work / "sNw2", 2048, 8, 50 if args.quick else 500),
        "llama_small_cpu_tokens_per_s": llama_small_tokens_per_s(work / "s1w2", work, 10 if args.quick else 40),
        "llama_1b_h100_40pct_mfu_tokens_per_s": h100,
    }

    # 5. streaming shares and resume
    report["streaming"] = streaming(x1, tok, (10, 100 if args.quick else 1000))
    print_table(report)
    write_report(report, args.out)
    return report


def print_table(r: dict) -> None:
    big = f"x{r['scale']}"
    p, s, lo, st = r["prepare"], r["start_up"], r["loader"], r["streaming"]
    rows = [
        ("prepare x1, 1 worker (tokens/s)", f"{p['workers_1']['tokens_per_s']:,.0f}"),
        ("prepare x1, 2 workers (tokens/s)", f"{p['workers_2']['tokens_per_s']:,.0f}"),
        ("2 workers / 1 worker", f"{p['speedup_2_over_1']:.2f}x (byte-identical: {p['byte_identical']})"),
        (f"prepare {big}, 2 workers", f"{p[big + '_workers_2']['seconds']:.0f} s, {p[big + '_workers_2']['tokens']:,} tokens"),
    ]
    for path in ("store", "in_memory"):
        for name in ("x1", big):
            v = s[name][path]
            rows.append((f"first step, {path}, {name}", f"{v['seconds_to_first_step']:.1f} s, peak RSS {v['peak_rss_bytes'] / 2**30:.2f} GiB"))
        rows.append((f"  {path}: {big} / x1", f"time {s[path + '_seconds_to_first_step_ratio']:.2f}x, RSS {s[path + '_peak_rss_bytes_ratio']:.2f}x"))
    rows += [
        ("loader, seq 256 x 16 (tokens/s)", f"{lo['tokens_per_s_seq256_batch16']:,.0f}"),
        ("loader, seq 2048 x 8 (tokens/s)", f"{lo['tokens_per_s_seq2048_batch8']:,.0f}"),
        ("llama_small consumes, this CPU", f"{lo['llama_small_cpu_tokens_per_s']:,.0f}"),
        ("llama_1b consumes, H100 at 40% MFU", f"{lo['llama_1b_h100_40pct_mfu_tokens_per_s']:,.0f}"),
        ("streaming: documents each rank tokenized", " / ".join(f"{f:.3f}" for f in st["fraction"])),
        ("streaming: resume at step " + " and ".join(st["resume_seconds"]), " / ".join(f"{v:.2f} s" for v in st["resume_seconds"].values())),
    ]
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")


if __name__ == "__main__":
    main()
