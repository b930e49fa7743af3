"""Downstream evaluation (python -m snoo_train.evaluate) with lm-evaluation-harness, offline.

The tasks are written here: tiny multiple-choice tasks over a local jsonl file. The reference
is computed here too, from the exported model loaded with transformers' own
AutoModelForCausalLM and the text encoded as UTF-8 bytes: each choice's log-likelihood is the
sum of log-probabilities of its bytes (" " + choice, lm-eval's default target delimiter) after
the question's bytes. lm-eval must pick the same answers: acc equals the reference's on the
task's own answers, 1.0 where the answers are the reference's argmax, 0.0 where its argmin.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from snoo_train.evaluate import EvalError, evaluate, format_table, parse_args
from snoo_train.export import main as export_main
from tests.conftest import REPO, entry_env

QUESTIONS = [
    ("def f(x):\n    return", ["x", "}", "]"]),
    ("import", ["os", "}}", "(("]),
    ("for i in", ["range(10):", "))]", "42"]),
    ("class Foo", ["(object):", ":", "==="]),
    ("while True:\n   ", ["break", "}{", "%%"]),
]
GIVEN = [0, 0, 0, 1, 0]  # the "right" answers, as a test author would write them

TASK_YAML = """task: {name}
dataset_path: {dataset}
{kwargs}test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(
    directory: Path, name: str, answers: list[int] | None, dataset: str = "json"
) -> None:
    kwargs = ""
    if answers is not None:
        data = directory / f"{name}.jsonl"
        rows = [{"question": q, "choices": c, "answer": a} for (q, c), a in zip(QUESTIONS, answers)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        kwargs = f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
    (directory / f"{name}.yaml").write_text(
        TASK_YAML.format(name=name, dataset=dataset, kwargs=kwargs)
    )


def reference_loglikelihoods(model_dir: Path) -> list[list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for question, choices in QUESTIONS:
        row = []
        for choice in choices:
            ctx, cont = list(question.encode()), list((" " + choice).encode())
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            # Token t is predicted by the logits at position t - 1.
            row.append(sum(logp[len(ctx) + i - 1, tok].item() for i, tok in enumerate(cont)))
        out.append(row)
    return out


@pytest.fixture(scope="module")
def evaluated(finished_run, tmp_path_factory) -> dict:
    """A copy of the session's trained run, evaluated once on three local tasks."""
    root = tmp_path_factory.mktemp("evaluate")
    run = root / "run"
    shutil.copytree(finished_run, run)
    export_main([str(run), str(root / "hf")])
    ref = reference_loglikelihoods(root / "hf")
    best = [max(range(len(r)), key=r.__getitem__) for r in ref]
    worst = [min(range(len(r)), key=r.__getitem__) for r in ref]
    tasks = root / "tasks"
    tasks.mkdir()
    write_task(tasks, "mc_given", GIVEN)
    write_task(tasks, "mc_best", best)
    write_task(tasks, "mc_worst", worst)
    path, opts = parse_args(
        [str(run), "tasks=[mc_given,mc_best,mc_worst]", f"include={tasks}", "batch_size=4"]
    )
    done = evaluate(path, opts)
    return {"run": run, "done": done, "best": best, "tasks": tasks}


def test_lm_eval_picks_the_answers_the_reference_picks(evaluated):
    results, best = evaluated["done"]["results"]["results"], evaluated["best"]
    assert sorted(results) == ["mc_best", "mc_given", "mc_worst"]
    want_given = sum(b == g for b, g in zip(best, GIVEN)) / len(GIVEN)
    assert results["mc_given"]["acc,none"] == pytest.approx(want_given)
    assert results["mc_best"]["acc,none"] == 1.0
    assert results["mc_worst"]["acc,none"] == 0.0
    for task in results:
        assert evaluated["done"]["results"]["n-samples"][task]["effective"] == len(QUESTIONS)


def test_results_land_in_the_run_directory(evaluated):
    run, done = evaluated["run"], evaluated["done"]
    step = done["step"]
    written = run / "downstream" / f"step_{step:08d}.json"
    assert done["file"] == written
    doc = json.loads(written.read_text())
    assert doc["step"] == step and doc["weights"] == "eval"
    assert set(doc["lm_eval"]["results"]) == {"mc_given", "mc_best", "mc_worst"}
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == step
    assert last["downstream/mc_best/acc"] == 1.0 and last["downstream/mc_worst/acc"] == 0.0
    assert 0.0 <= last["downstream/mc_given/acc"] <= 1.0


def test_the_table_has_a_line_per_task(evaluated):
    lines = format_table(evaluated["done"]["results"]).splitlines()
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[1:]}
    assert set(rows) == {"mc_given", "mc_best", "mc_worst"}
    assert rows["mc_best"][:2] == ["acc", "1.0000"] and rows["mc_best"][-1] == str(len(QUESTIONS))


def test_a_hub_task_without_network_fails_in_seconds_with_one_line(evaluated):
    """The module entry: a task whose dataset is on the hub (unreachable here: HF_ENDPOINT is a
    closed local port), not in the cache, fails with one line, without datasets' retries."""
    write_task(evaluated["tasks"], "mc_hub", None, dataset="snoo-train-tests/no-such-dataset")
    env = dict(entry_env(), HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [
        sys.executable,
        "-m",
        "snoo_train.evaluate",
        str(evaluated["run"]),
        f"include={evaluated['tasks']}",
        "tasks=[mc_hub]",
    ]
    t0 = time.time()
    bad = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    (line,) = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert (
        "mc_hub reads snoo-train-tests/no-such-dataset" in line
        and "127.0.0.1:9 is unreachable" in line
    )
    assert time.time() - t0 < 60  # a process start and lm-eval's import included; no retries


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["tasks=[]"], "tasks: give one or more task names"),
        (["tasks=[a]", "limit=0"], "limit: expected a positive integer"),
        (["tasks=[a]", "batch_size=x"], "batch_size: expected a positive integer"),
        (["tasks=[a]", "task=[a]"], "task: unknown option"),
        (["tasks=[a]", "weights=fast"], "weights: expected eval or params"),
        (["tasks=[a]", "include=/no/such/dir"], "include: /no/such/dir is not a directory"),
        (["tasks=[a]", "device=gpu0"], "device: 'gpu0' is not a torch device"),
    ],
)
def test_bad_options_name_their_key(args, fragment):
    with pytest.raises(EvalError, match=fragment.replace("[", r"\[")):
        parse_args(["run", *args])


def test_an_unknown_task_is_one_clear_error(evaluated):
    """Not in the include directory nor among lm-eval's own tasks (the full index is built)."""
    with pytest.raises(
        EvalError, match=r"tasks: unknown task 'no_such_task_xyz': not in lm-eval's tasks nor"
    ):
        evaluate(
            str(evaluated["run"]),
            {
                **parse_args(["r", "tasks=[no_such_task_xyz]"])[1],
                "include": str(evaluated["tasks"]),
            },
        )


def test_the_declared_cli_keys_are_the_parsed_ones():
    from snoo_train.evaluate import CLI_KEYS, DEFAULTS

    assert set(CLI_KEYS) == set(DEFAULTS)
