"""Downstream evaluation in the loop (trainer.downstream_eval) against the CLI.

The reference is `python -m snoo_train.evaluate` on the run's own checkpoints (test_evaluate.py
checks it against log-likelihoods computed by hand with transformers): the loop must report the
same scores at the same steps, in metrics.jsonl, the summary and <run>/downstream/. The task
scores accuracy and the Brier score, which moves with every choice's probability, so equal
numbers mean equal log-likelihoods, not merely the same argmax. A 2-rank FSDP run gives the
1-process numbers (within float reduction order).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from snoo_train.config import ConfigError
from snoo_train.dist import init_distributed
from snoo_train.evaluate import evaluate, parse_args
from snoo_train.trainer import Trainer
from tests.conftest import make_config, read_records
from tests.dist_utils import fit_layout, run_distributed
from tests.test_evaluate import GIVEN, QUESTIONS, TASK_YAML

TASK = "mc_loop"
# test_evaluate's multiple-choice task, scoring the Brier score too.
BRIER = "  - metric: brier_score\n    higher_is_better: false\n"
INTERVAL = 6  # TINY runs 12 steps: evaluations after steps 6 and 12
SCORES = (f"downstream/{TASK}/acc", f"downstream/{TASK}/brier_score")


def write_tasks(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{TASK}.jsonl"
    rows = [{"question": q, "choices": c, "answer": a} for (q, c), a in zip(QUESTIONS, GIVEN)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kwargs = f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
    (directory / f"{TASK}.yaml").write_text(TASK_YAML.format(name=TASK, dataset="json", kwargs=kwargs) + BRIER)
    return directory


def overrides(tasks: Path) -> list[str]:
    return [
        "checkpoint.interval=6",
        f"trainer.downstream_eval.tasks=[{TASK}]",
        f"trainer.downstream_eval.interval={INTERVAL}",
        f"trainer.downstream_eval.include={tasks}",
        "trainer.downstream_eval.batch_size=4",
    ]


@pytest.fixture(scope="module")
def looped(tmp_path_factory) -> dict:
    """One 1-process TINY run with downstream evaluation every 6 steps."""
    root = tmp_path_factory.mktemp("downstream")
    tasks = write_tasks(root / "tasks")
    cfg = make_config(root / "run", overrides(tasks))
    summary = Trainer(cfg, init_distributed("cpu")).fit()
    return {"root": root, "run": root / "run", "tasks": tasks, "summary": summary}


def downstream_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_records(run) if any(k.startswith("downstream/") for k in r)}


def test_the_loop_records_its_scores_at_its_steps(looped):
    run, summary = looped["run"], looped["summary"]
    records = downstream_records(run)
    assert sorted(records) == [6, 12]
    for step, rec in records.items():
        assert set(rec) == {"step", *SCORES}  # the CLI's record: the step and the scores
        written = run / "downstream" / f"step_{step:08d}.json"
        doc = json.loads(written.read_text())
        assert doc["step"] == step and doc["weights"] == "eval"
        assert doc["lm_eval"]["n-samples"][TASK]["effective"] == len(QUESTIONS)
        assert doc["lm_eval"]["results"][TASK]["acc,none"] == rec[SCORES[0]]
        assert summary["downstream"][str(step)] == {**{k: rec[k] for k in SCORES}, "results_file": str(written)}
    assert sorted(p.name for p in (run / "downstream").iterdir()) == ["step_00000006.json", "step_00000012.json"]


def test_the_loop_scores_what_the_cli_scores_on_the_checkpoint(looped, tmp_path):
    """The checkpoints at steps 6 and 12 hold the slow weights the loop evaluated."""
    run = tmp_path / "run"
    shutil.copytree(looped["run"], run)  # the CLI appends to the run's metrics
    loop = downstream_records(looped["run"])
    for step in (6, 12):
        path, opts = parse_args(
            [str(run / "checkpoints" / f"step_{step:08d}"), f"tasks=[{TASK}]", f"include={looped['tasks']}"]
        )
        cli = evaluate(path, opts)["scores"]
        assert cli[SCORES[0]] == loop[step][SCORES[0]]
        assert cli[SCORES[1]] == pytest.approx(loop[step][SCORES[1]], rel=1e-6, abs=1e-9)


def _two_ranks(rank: int, world_size: int, run_dir: str, tasks: str) -> None:
    import torch.distributed as dist

    from snoo_train import dist as sdist
    from snoo_train.evaluate import _manager

    # A fresh process that imported the trainer (and evaluate.py): lm-eval's import takes
    # seconds, and only runs with trainer.downstream_eval.tasks pay for it.
    assert "lm_eval" not in sys.modules

    # An error on one rank is raised on both, as the error itself where it is kept by type.
    def fail_on(bad_rank, error):
        if dist.get_rank() == bad_rank:
            raise error
        return "fine"

    with pytest.raises(sdist.RankFailed, match="ValueError on rank 1: boom") as caught:
        sdist.together(lambda: fail_on(1, ValueError("boom")))
    assert sdist.raised_on_every_rank(caught.value)
    with pytest.raises(ConfigError, match="^bad key$"):
        sdist.together(lambda: fail_on(0, ConfigError("bad key")), keep=(ConfigError,))
    # An unknown task: one ConfigError on both ranks before anything is built (lm-eval's own
    # ~15k tasks are left out of the index here: building it takes a minute).
    _manager.cache_clear()
    real = _manager.__wrapped__
    sys.modules["snoo_train.evaluate"]._manager = lambda include, defaults: real(include, False)
    cfg = make_config(Path(run_dir), [*overrides(Path(tasks)), "trainer.downstream_eval.tasks=[no_such_task]"], world_size=2)
    with pytest.raises(ConfigError, match="trainer.downstream_eval: tasks: unknown task 'no_such_task'") as caught:
        Trainer(cfg, init_distributed("cpu"))
    assert sdist.raised_on_every_rank(caught.value)
    sys.modules["snoo_train.evaluate"]._manager = _manager
    fit_layout(run_dir, overrides(Path(tasks)))


def test_two_fsdp_ranks_score_what_one_process_scores(looped):
    run = looped["root"] / "fsdp2"
    run_distributed(_two_ranks, 2, str(run), str(looped["tasks"]))
    one, two = downstream_records(looped["run"]), downstream_records(run)
    assert sorted(two) == [6, 12]
    for step in (6, 12):
        assert two[step][SCORES[0]] == one[step][SCORES[0]]
        assert two[step][SCORES[1]] == pytest.approx(one[step][SCORES[1]], rel=1e-4)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trainer.downstream_eval.interval=-1", "trainer.downstream_eval.interval=-1 must be >= 0"),
        ("trainer.downstream_eval.batch_size=0", "trainer.downstream_eval.batch_size=0 must be > 0"),
        ("trainer.downstream_eval.limit=0", "trainer.downstream_eval.limit=0 must be > 0"),
        ("trainer.downstream_eval.num_fewshot=-1", "trainer.downstream_eval.num_fewshot=-1 must be >= 0"),
        ("trainer.downstream_eval.include=/no/such/dir", "trainer.downstream_eval.include=/no/such/dir: not a directory"),
        ("trainer.downstream_eval.tasks=[a,' ']", "trainer.downstream_eval.tasks=.* must be a list of lm-eval task names"),
    ],
)
def test_bad_values_are_one_config_error(tmp_path, override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make_config(tmp_path, [override])


def test_without_lm_eval_the_run_is_refused_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    cfg = make_config(tmp_path / "run", overrides(write_tasks(tmp_path / "tasks")))
    with pytest.raises(ConfigError, match="trainer.downstream_eval: lm-eval is not installed"):
        Trainer(cfg, init_distributed("cpu"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()



class FakeWandb:
    """Records what the CLI asks of wandb (the real one would write binary offline logs)."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, data, **kwargs):
        self.logged.append((data, kwargs))

    def finish(self):
        self.finished += 1


def test_the_cli_logs_to_the_runs_wandb_run(looped, tmp_path, monkeypatch):
    import snoo_train.export as export

    run = tmp_path / "run"
    shutil.copytree(looped["run"], run)
    (run / "wandb_run_id").write_text("abc123\n")  # what the trainer writes with wandb on
    real = export.load_model

    def offline_run(*args, **kwargs):
        model, cfg = real(*args, **kwargs)
        cfg.logging.wandb.mode = "offline"
        return model, cfg

    monkeypatch.setattr(export, "load_model", offline_run)
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    path, opts = parse_args([str(run), f"tasks=[{TASK}]", f"include={looped['tasks']}"])
    done = evaluate(path, opts)
    (init,) = fake.inits
    assert init["id"] == "abc123" and init["resume"] == "allow" and init["mode"] == "offline"
    assert Path(init["dir"]) == run
    assert fake.logged == [({"step": 12, **done["scores"]}, {})] and fake.finished == 1
