"""Downstream accuracy before and after a short training run, measured in the loop.

    python bench/downstream.py                      # llama_tiny, 200 steps (`make train`'s length)
    python bench/downstream.py --steps 50 --model llama_tiny

The task is ours, generated here (no fetched text): Python idioms, the corpus's language (the
embedded corpus is Python's standard library). Each question is an idiom's start, the right
ending and two distractors made of the same characters in a seeded random order, so the choices
have the same bytes and length and chance is 1/3: only the order of the bytes tells them apart.

One process runs `make train`'s defaults (SNOO on the embedded corpus) on the chosen model with
trainer.downstream_eval on that task: scored at step 0 (before any step, by hand: the loop
starts after the first step), every --interval steps and after the last, at the slow weights.
The final checkpoint is then scored again by `python -m snoo_train.evaluate`'s code: the two
must agree. Writes bench/results/downstream_<model>_<steps>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from common import REPO, compose_config, repo_path, write_report

from snoo_train.dist import init_distributed
from snoo_train.evaluate import evaluate, parse_args
from snoo_train.trainer import Trainer

TASK = "py_idioms"
# (start, right ending): our own lines, the shapes that fill the standard library.
IDIOMS = [
    ("import", " os"), ("from typing import", " Any"), ("def __init__(self", ", *args, **kwargs):"),
    ("if __name__ ==", " '__main__':"), ("for i in", " range(n):"), ("return", " None"),
    ("raise", " ValueError(msg)"), ("except", " Exception as e:"), ("with open(path)", " as f:"),
    ("self.", "assertEqual(a, b)"), ("class Foo", "(object):"), ("while True", ":\n    break"),
    ("elif", " x is None:"), ("lambda x", ": x + 1"), ("print(", "'hello')"),
    ("isinstance(obj", ", str)"), ("try", ":\n    pass"), ("finally", ":\n    f.close()"), ("import sys", "\nimport os"),
    ("def test_", "main(self):"), ("return self.", "_value"), ("len(", "items)"),
    ("if not", " args:"), ("for key, value in", " items():"), ("@property", "\n    def name(self):"),
    ("@staticmethod", "\n    def make():"), ("super().__init__", "(*args)"), ("yield", " item"), ("assert", " x == y"),
    ("os.path.", "join(a, b)"), ("__all__ =", " ['main']"), ("global", " _cache"),
    ("except ImportError", ":\n    pass"), ("self.assertTrue", "(result)"), ("dict(", "a=1, b=2)"),
    ("list(", "range(10))"), ("str(", "value)"), ("return '", "%s' % x"), ("if x", " < 0:"),
    ("def __repr__", "(self):"),
]  # fmt: skip
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: brier_score
    higher_is_better: false
"""


def distractor(text: str, rng: random.Random) -> str:
    """The same characters in a random order (every ending above has several distinct ones)."""
    chars = list(text)
    rng.shuffle(chars)
    return "".join(chars)


def write_task(directory: Path, seed: int = 0) -> int:
    """The task's YAML and data in `directory`; the number of questions."""
    rng = random.Random(seed)
    rows = []
    for question, right in IDIOMS:
        wrong = []
        while len(wrong) < 2:
            d = distractor(right, rng)
            if d not in wrong and d != right:
                wrong.append(d)
        choices = [right, *wrong]
        rng.shuffle(choices)
        rows.append({"question": question, "choices": choices, "answer": choices.index(right)})
    data = directory / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--interval", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tasks, run = Path(scratch) / "tasks", Path(scratch) / "run"
        tasks.mkdir()
        n = write_task(tasks)
        overrides = [
            f"model={args.model}", f"trainer.max_steps={args.steps}", "trainer.progress=false",
            f"trainer.downstream_eval.tasks=[{TASK}]", f"trainer.downstream_eval.include={tasks}",
            f"trainer.downstream_eval.interval={args.interval}", f"checkpoint.interval={args.steps}",
        ]  # fmt: skip
        trainer = Trainer(compose_config(overrides, str(run)), init_distributed("auto"))
        t0 = time.perf_counter()
        before = trainer.downstream.run(0, trainer.model, trainer.evaluator.weights, trainer.autocast)
        eval0_s = time.perf_counter() - t0
        summary = trainer.fit()
        scores = {"0": before, **{k: {m: v for m, v in d.items() if m != "results_file"} for k, d in summary["downstream"].items()}}
        path, opts = parse_args([str(run / "checkpoints" / f"step_{args.steps:08d}"), f"tasks=[{TASK}]", f"include={tasks}"])
        cli = evaluate(path, opts)["scores"]
    acc = f"downstream/{TASK}/acc"
    report = {
        "command": f"python bench/downstream.py --model {args.model} --steps {args.steps} --interval {args.interval}",
        "task": {"name": TASK, "questions": n, "choices": 3, "chance_acc": 1 / 3},
        "overrides": [o for o in overrides if "include=" not in o],
        "scores_by_step": scores,
        "cli_on_final_checkpoint": cli,
        "loop_equals_cli": cli[acc] == scores[str(args.steps)][acc],
        "final_loss": summary["final_loss"],
        "final_val_loss": summary["final_val_loss"],
        "train_time_s": summary["train_time_s"],
        "eval_time_s": summary["eval_time_s"],
        "downstream_eval_at_step0_s": eval0_s,
    }
    for step, s in scores.items():
        print(f"step {step:>4}: acc {s[acc]:.4f}  brier {s[f'downstream/{TASK}/brier_score']:.4f}")
    print(f"CLI on the final checkpoint: acc {cli[acc]:.4f} (loop {'agrees' if report['loop_equals_cli'] else 'DISAGREES'})")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"downstream_{args.model}_{args.steps}.json"
    report["out"] = repo_path(out)
    write_report(report, out)


if __name__ == "__main__":
    main()
