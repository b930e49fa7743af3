"""`python -m snoo_train.data.train_tokenizer`: a byte-level BPE tokenizer trained on the
training documents of a data config, saved where AutoTokenizer and training load it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from snoo_train.config import ConfigError, DataConfig, TokenizerJob
from snoo_train.configs import compose_job
from snoo_train.data import build_datasets, build_tokenizer
from snoo_train.data.split import is_validation
from snoo_train.data.train_tokenizer import META_FILE, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 400
EOS = "<|endoftext|>"
# 40 standard-library files: about 0.9 M characters, under a second to train on.
STDLIB = ["data.max_documents=40", f"tokenizer.vocab_size={VOCAB}"]


def job(overrides: list[str]) -> TokenizerJob:
    return compose_job("train_tokenizer", overrides, TokenizerJob)


def run_entry(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "snoo_train.data.train_tokenizer", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def stdlib_tok(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "stdlib400"
    assert train_tokenizer(job(STDLIB + [f"tokenizer.out={out}"])) == str(out)
    return out


def test_round_trips_text_and_compresses(stdlib_tok):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stdlib_tok))
    texts = [
        "def f(x):\n    return x + 1\n",
        "  leading spaces, trailing spaces  ",
        "tabs\tand\r\nwindows line ends\n\n\n",
        "unicode: héllo wörld, Ελληνικά, 日本語, emoji 🐍🚀, combining e\u0301",
        " ",
        "",
    ]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # Code the tokenizer never saw (not one of the first 40 stdlib files) still compresses.
    held_out = (
        "class Cache:\n    def __init__(self, size):\n        self.size = size\n        self.items = {}\n\n"
        "    def get(self, key, default=None):\n        return self.items.get(key, default)\n"
    )
    n_tokens = len(tok.encode(held_out, add_special_tokens=False))
    assert n_tokens < 0.6 * len(held_out.encode("utf-8"))


def test_eos_is_one_special_token_and_vocab_is_exact(stdlib_tok):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stdlib_tok))
    assert len(tok) == VOCAB
    assert tok.eos_token == EOS and EOS in tok.all_special_tokens
    assert tok.encode(EOS, add_special_tokens=False) == [tok.eos_token_id]
    # No other special token: a BOS or pad would be ids the packed data never holds.
    assert tok.bos_token is None and tok.pad_token is None and tok.unk_token is None
    ours = build_tokenizer(str(stdlib_tok))
    assert ours.eos_id == tok.eos_token_id
    meta = json.loads((stdlib_tok / META_FILE).read_text())
    assert meta["documents"] + meta["held_out_documents"] == 40 and meta["vocab_size"] == VOCAB
    assert meta["characters"] > 0 and meta["data"]["source"] == "stdlib"


def test_training_takes_it_as_data_tokenizer(stdlib_tok):
    tokenizer = build_tokenizer(str(stdlib_tok))
    assert tokenizer.vocab_size == VOCAB
    cfg = DataConfig(tokenizer=str(stdlib_tok), seq_len=64, max_documents=40)
    train, val = build_datasets(cfg, tokenizer, seed=0)
    assert len(train) > 0 and len(val) > 0
    window = train[0]
    assert len(window) == 65 and int(window.max()) < VOCAB


def _corpus(path: Path, val_fraction: float) -> tuple[int, int]:
    """A jsonl of prose plus 'marker' documents (a nonsense string repeated) that all hash into
    validation; (training documents, validation documents)."""
    rng = random.Random(0)
    words = "the a model data train token merge byte over under river stone light green über café naïve".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 80))) for _ in range(120)]
    markers = [f"QXJV{i} " + "QXJV" * 300 for i in range(200)]
    docs += [m for m in markers if is_validation(m, val_fraction)][:5]
    val = sum(is_validation(d, val_fraction) for d in docs)
    assert 5 < val < len(docs)  # some prose is validation too; the rule must be exercised
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    return len(docs) - val, val


def test_validation_documents_never_shape_the_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    n_train, n_val = _corpus(corpus, 0.25)
    out = tmp_path / "tok"
    overrides = [
        "data=local",
        f"data.files=[{corpus}]",
        "data.val_fraction=0.25",
        "tokenizer.vocab_size=300",
    ]
    train_tokenizer(job(overrides + [f"tokenizer.out={out}"]))
    meta = json.loads((out / META_FILE).read_text())
    assert (meta["documents"], meta["held_out_documents"]) == (n_train, n_val)
    assert meta["characters"] < sum(len(json.loads(line)["text"]) for line in corpus.open())
    # The marker is over 1000 times in validation and nowhere in training: had it been trained
    # on, its pairs would be the most frequent of all. Here it stays single bytes.
    tok = build_tokenizer(str(out))
    assert len(tok.encode("QXJVQXJV")) == 8


@pytest.mark.parametrize("case", ["missing_out", "existing_out"])
def test_bad_input_is_one_error_line_and_touches_nothing(tmp_path, case):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "tokenizer.json").write_text('{"precious": true}\n')
    (out / "sub").mkdir()
    (out / "sub" / "notes.txt").write_bytes(b"\x00\x01 keep me")
    before = snapshot(out)
    args = STDLIB + ([] if case == "missing_out" else [f"tokenizer.out={out}"])
    proc = run_entry(args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert ("tokenizer.out" if case == "missing_out" else "tokenizer.overwrite=true") in lines[0]
    if case == "existing_out":
        assert str(out) in lines[0]
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no partial directory left


@pytest.mark.parametrize(
    "override, key",
    [
        ("tokenizer.vocab_size=257", "tokenizer.vocab_size"),
        ("tokenizer.min_frequency=0", "tokenizer.min_frequency"),
        ("data.val_fraction=1.0", "data.val_fraction"),
    ],
)
def test_bad_values_name_their_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        train_tokenizer(job(STDLIB + [f"tokenizer.out={tmp_path / 'tok'}", override]))
    assert not (tmp_path / "tok").exists()


def test_a_prepared_store_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="already tokenized"):
        train_tokenizer(
            job(["data=prepared", f"data.path={tmp_path}", f"tokenizer.out={tmp_path / 'tok'}"])
        )


def test_overwrite_replaces_and_leaves_no_temporary(tmp_path, stdlib_tok):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    train_tokenizer(job(STDLIB + [f"tokenizer.out={out}", "tokenizer.overwrite=true"]))
    assert not (out / "stale.txt").exists()
    assert (out / "tokenizer.json").read_bytes() == (stdlib_tok / "tokenizer.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_deterministic_in_process_and_from_the_command_line(tmp_path, stdlib_tok):
    again = tmp_path / "again"
    train_tokenizer(job(STDLIB + [f"tokenizer.out={again}"]))
    cli = tmp_path / "cli"
    proc = run_entry(STDLIB + [f"tokenizer.out={cli}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "tokenizer: " in proc.stderr and f"vocab {VOCAB}" in proc.stderr
    for name in ("tokenizer.json", "tokenizer_config.json", META_FILE):
        reference = (stdlib_tok / name).read_bytes()
        assert (again / name).read_bytes() == reference, name
        assert (cli / name).read_bytes() == reference, name
