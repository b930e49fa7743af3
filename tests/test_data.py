"""The data pipeline: packing, held-out split, per-rank sharding, resume, sources, tokenizers.

Expectations are built in the tests from first principles (UTF-8 bytes, the tokenizers
library called directly, sample indices that identify themselves) rather than by calling
the code under test a second time.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from snoo_train.config import DataConfig
from snoo_train.data import (
    BatchLoader,
    ByteTokenizer,
    PackedDataset,
    build_datasets,
    build_tokenizer,
    eval_batches,
)

EOS = 256


def byte_stream(texts: list[str]) -> list[int]:
    """The flat token stream the packer should produce for byte tokens: bytes, EOS, ..."""
    out: list[int] = []
    for t in texts:
        out += list(t.encode("utf-8")) + [EOS]
    return out


def expected_windows(stream: list[int], seq_len: int) -> list[list[int]]:
    n = (len(stream) - 1) // seq_len
    return [stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]


def indexed_dataset(num_windows: int, seq_len: int) -> PackedDataset:
    """Windows whose first token is `index * seq_len`: a sample names itself."""
    return PackedDataset(
        np.arange(num_windows * seq_len + 1, dtype=np.uint16), seq_len, num_documents=1
    )


def sample_ids(step: list[dict[str, torch.Tensor]], seq_len: int) -> list[int]:
    return [int(x) // seq_len for mb in step for x in mb["input_ids"][:, 0]]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Documents that each carry a unique marker, so a window names the documents it holds."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    return [
        f"<doc{i:04d}> " + " ".join(rng.choice(words, size=int(rng.integers(5, 30))))
        for i in range(n)
    ]


def markers(text: str) -> set[str]:
    import re

    return set(re.findall(r"<doc\d{4}>", text))


def write_jsonl(path, texts, field="text"):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({field: t, "other": 1}) + "\n")
    return path


def local_cfg(files, **kw) -> DataConfig:
    return DataConfig(source="local", files=[str(f) for f in files], **kw)


# ---- tokenizers ---------------------------------------------------------------------------


def test_byte_tokenizer():
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.encode("hé!") == [104, 0xC3, 0xA9, 33]
    assert tok.decode([104, 0xC3, 0xA9, 33, EOS]) == "hé!"


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"])
    backend.train_from_iterator(make_docs(50), trainer)
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]"
    ).save_pretrained(path)
    return path, backend


def test_hf_tokenizer_from_local_path(tmp_path, hf_tokenizer_dir):
    path, backend = hf_tokenizer_dir
    tok = build_tokenizer(str(path))
    assert tok.vocab_size == backend.get_vocab_size()
    assert tok.eos_id == backend.token_to_id("[EOS]")
    docs = make_docs(12, seed=3)
    assert tok.encode(docs[0]) == backend.encode(docs[0]).ids

    f = write_jsonl(tmp_path / "d.jsonl", docs)
    train, val = build_datasets(
        local_cfg([f], tokenizer=str(path), seq_len=8, val_fraction=0.0), tok, seed=0
    )
    stream = []
    for d in docs:
        stream += backend.encode(d).ids + [tok.eos_id]
    assert [list(train[i]) for i in range(len(train))] == expected_windows(stream, 8)
    assert len(val) == 0


def test_missing_tokenizer_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        build_tokenizer(str(tmp_path / "nope"))


# ---- sources and packing ------------------------------------------------------------------


def test_local_text_files_pack_each_file_as_a_document(tmp_path):
    texts = ["first file\nline two\n", "zweite Datei: äöü\n\nparagraph\n", "third"]
    files = []
    for i, t in enumerate(texts):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(t, encoding="utf-8")
    train, val = build_datasets(
        local_cfg([tmp_path / "*.txt"], seq_len=7, val_fraction=0.0), ByteTokenizer(), seed=0
    )
    assert [list(train[i]) for i in range(len(train))] == expected_windows(byte_stream(texts), 7)
    assert train.tokens.dtype == np.uint16 and train.num_documents == 3


def test_local_text_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\ntwo\n\nthree\n")
    train, _ = build_datasets(
        local_cfg([f], sample_by="line", seq_len=3, val_fraction=0.0), ByteTokenizer(), seed=0
    )
    assert list(train.tokens) == byte_stream(["one", "two", "three"])


def test_local_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(20)
    j = write_jsonl(tmp_path / "d.jsonl", docs, field="body")
    pq.write_table(pa.table({"body": docs, "n": list(range(20))}), tmp_path / "d.parquet")
    want = expected_windows(byte_stream(docs), 16)
    for f in (j, tmp_path / "d.parquet"):
        train, _ = build_datasets(
            local_cfg([f], text_field="body", seq_len=16, val_fraction=0.0), ByteTokenizer(), seed=0
        )
        assert [list(train[i]) for i in range(len(train))] == want, f


def test_max_documents(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", make_docs(20))
    train, _ = build_datasets(
        local_cfg([f], max_documents=5, val_fraction=0.0), ByteTokenizer(), seed=0
    )
    assert train.num_documents == 5 and list(train.tokens) == byte_stream(make_docs(20)[:5])


def test_missing_local_file_names_path_and_key(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match="data.files") as err:
        build_datasets(local_cfg([missing]), ByteTokenizer(), seed=0)
    assert str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"data.files.*\*.parquet"):
        build_datasets(local_cfg([tmp_path / "*.parquet"]), ByteTokenizer(), seed=0)


def test_bad_local_inputs_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    write_jsonl(empty, ["", ""])
    with pytest.raises(ValueError, match="no non-empty documents"):
        build_datasets(local_cfg([empty]), ByteTokenizer(), seed=0)
    with pytest.raises(ValueError, match="data.text_field"):
        build_datasets(local_cfg([empty], text_field="body"), ByteTokenizer(), seed=0)
    odd = tmp_path / "x.csv"
    odd.write_text("a,b\n")
    with pytest.raises(ValueError, match="data.format"):
        build_datasets(local_cfg([odd]), ByteTokenizer(), seed=0)


@pytest.fixture(scope="module")
def stdlib_small():
    cfg = DataConfig(seq_len=64, max_documents=150, val_fraction=0.1)
    return build_datasets(cfg, ByteTokenizer(), seed=0)


def split_documents(tokens: np.ndarray) -> list[bytes]:
    docs, start = [], 0
    for end in np.flatnonzero(np.asarray(tokens) == EOS):
        docs.append(bytes(np.asarray(tokens[start:end], dtype=np.uint8)))
        start = end + 1
    return docs


def test_stdlib_corpus_and_heldout_split(stdlib_small):
    import sysconfig

    train, val = stdlib_small
    assert train.num_documents + val.num_documents == 150
    assert 0 < val.num_documents < 150 and len(val) > 0
    train_docs, val_docs = split_documents(train.tokens), split_documents(val.tokens)
    assert len(train_docs) == train.num_documents and len(val_docs) == val.num_documents
    assert not set(train_docs) & set(val_docs)
    # The documents are the interpreter's own sources, byte for byte.
    root = sysconfig.get_paths()["stdlib"]
    with open(f"{root}/__future__.py", "rb") as f:
        future = f.read()
    assert future in set(train_docs) | set(val_docs)


def test_split_is_stable_across_seeds_and_documents_never_cross(tmp_path):
    docs = make_docs(200)
    f = write_jsonl(tmp_path / "d.jsonl", docs)
    cfg = local_cfg([f], seq_len=32, val_fraction=0.2)
    train, val = build_datasets(cfg, ByteTokenizer(), seed=0)
    train2, val2 = build_datasets(cfg, ByteTokenizer(), seed=7)
    assert np.array_equal(val.tokens, val2.tokens) and np.array_equal(train.tokens, train2.tokens)
    tok = ByteTokenizer()
    seen_in_train = set()
    loader = BatchLoader(train, global_batch_size=4, grad_accum=1, rank=0, world_size=1, seed=0)
    for _ in range(loader.steps_per_epoch):
        for row in loader.next_step()[0]["input_ids"]:
            seen_in_train |= markers(tok.decode(row.tolist()))
    val_markers = markers(tok.decode(val.tokens.tolist()))
    assert 10 < len(val_markers) < 80
    assert seen_in_train and not seen_in_train & val_markers


def test_tiny_corpus_still_holds_out_one_document(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", make_docs(3))
    train, val = build_datasets(
        local_cfg([f], seq_len=8, val_fraction=0.001), ByteTokenizer(), seed=0
    )
    assert (train.num_documents, val.num_documents) == (2, 1)
    single = write_jsonl(tmp_path / "one.jsonl", make_docs(1))
    with pytest.raises(ValueError, match="held out"):
        build_datasets(local_cfg([single], seq_len=8, val_fraction=0.5), ByteTokenizer(), seed=0)


def test_token_cache_round_trip(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", make_docs(40))
    cfg = local_cfg([f], seq_len=16, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    fresh = build_datasets(cfg, ByteTokenizer(), seed=0)
    cached = build_datasets(cfg, ByteTokenizer(), seed=0)
    assert isinstance(cached[0].tokens, np.memmap)
    for a, b in zip(fresh, cached):
        assert np.array_equal(a.tokens, b.tokens) and a.num_documents == b.num_documents
    # Another seq_len reuses the entry; new content makes a new one.
    other = build_datasets(
        local_cfg([f], seq_len=5, val_fraction=0.2, cache_dir=cfg.cache_dir),
        ByteTokenizer(),
        seed=0,
    )
    assert (
        np.array_equal(other[0].tokens, fresh[0].tokens)
        and len(list((tmp_path / "cache").iterdir())) == 1
    )
    write_jsonl(f, make_docs(41))
    build_datasets(cfg, ByteTokenizer(), seed=0)
    assert len(list((tmp_path / "cache").iterdir())) == 2


# ---- the training loader ------------------------------------------------------------------


def test_batches_shapes_and_shifted_labels(stdlib_small):
    train, _ = stdlib_small
    loader = BatchLoader(train, global_batch_size=8, grad_accum=2, rank=0, world_size=2, seed=0)
    step = loader.next_step()
    assert len(step) == 2 and loader.tokens_per_step == 8 * 64
    for mb in step:
        assert mb["input_ids"].shape == mb["labels"].shape == (2, 64)
        assert mb["input_ids"].dtype == torch.long
        assert torch.equal(mb["input_ids"][:, 1:], mb["labels"][:, :-1])


def test_order_is_deterministic_for_a_seed_and_a_permutation_per_epoch():
    data = indexed_dataset(40, 4)

    def run(seed, steps):
        loader = BatchLoader(
            data, global_batch_size=8, grad_accum=1, rank=0, world_size=1, seed=seed
        )
        return [sample_ids(loader.next_step(), 4) for _ in range(steps)]

    a, b, c = run(0, 10), run(0, 10), run(1, 10)
    assert a == b and a != c
    epoch0 = sum(a[:5], [])
    epoch1 = sum(a[5:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(40))  # each epoch: every window once
    assert epoch0 != epoch1  # reshuffled


@pytest.mark.parametrize("world_size,grad_accum", [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_rank_shards_are_disjoint_and_union_is_the_global_batch(world_size, grad_accum):
    data = indexed_dataset(100, 4)
    B = 16
    single = BatchLoader(data, global_batch_size=B, grad_accum=1, rank=0, world_size=1, seed=3)
    ranks = [
        BatchLoader(
            data, global_batch_size=B, grad_accum=grad_accum, rank=r, world_size=world_size, seed=3
        )
        for r in range(world_size)
    ]
    for _ in range(9):  # crosses an epoch boundary (6 steps per epoch)
        want = sample_ids(single.next_step(), 4)
        got = [sample_ids(r.next_step(), 4) for r in ranks]
        assert all(len(g) == B // world_size for g in got)
        assert not set(got[0]).intersection(*got[1:])
        assert sum(got, []) == want  # rank-major concatenation is the single-process order


def test_state_dict_resume_continues_exactly_even_on_another_world_size():
    data = indexed_dataset(50, 4)
    first = BatchLoader(data, global_batch_size=8, grad_accum=1, rank=0, world_size=1, seed=5)
    for _ in range(4):
        first.next_step()
    state = first.state_dict()
    assert all(type(v) is int for v in state.values())
    expected = [sample_ids(first.next_step(), 4) for _ in range(6)]

    resumed = BatchLoader(data, global_batch_size=8, grad_accum=1, rank=0, world_size=1, seed=5)
    resumed.load_state_dict(state)
    assert [sample_ids(resumed.next_step(), 4) for _ in range(6)] == expected

    halves = [
        BatchLoader(data, global_batch_size=8, grad_accum=2, rank=r, world_size=2, seed=5)
        for r in (0, 1)
    ]
    for h in halves:
        h.load_state_dict(state)
    assert [sum((sample_ids(h.next_step(), 4) for h in halves), []) for _ in range(6)] == expected

    other_seed = BatchLoader(data, global_batch_size=8, grad_accum=1, rank=0, world_size=1, seed=6)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(state)


def test_loader_rejects_bad_layouts():
    data = indexed_dataset(10, 4)
    with pytest.raises(ValueError, match="trainer.batch_size"):
        BatchLoader(data, global_batch_size=6, grad_accum=1, rank=0, world_size=4, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchLoader(data, global_batch_size=16, grad_accum=1, rank=0, world_size=1, seed=0)


# ---- evaluation batches -------------------------------------------------------------------


def test_eval_batches_fixed_sharded_and_cycled():
    data = indexed_dataset(20, 4)

    def ids(batches):
        return [[int(x) // 4 for x in b["input_ids"][:, 0]] for b in batches]

    single = ids(eval_batches(data, batch_size=8, num_batches=3, rank=0, world_size=1))
    assert single == ids(eval_batches(data, batch_size=8, num_batches=3, rank=0, world_size=1))
    flat = sum(single, [])
    assert len(set(flat[:20])) == 20 and flat[20:] == flat[:4]  # 24 asked of 20: cycles
    for ws in (2, 4):
        per_rank = [
            ids(eval_batches(data, batch_size=8, num_batches=3, rank=r, world_size=ws))
            for r in range(ws)
        ]
        assert [sum((p[g] for p in per_rank), []) for g in range(3)] == single
    # Smaller batches, more of them: the same sequences (the trainer's micro-batched eval).
    assert (
        sum(ids(eval_batches(data, batch_size=4, num_batches=6, rank=0, world_size=1)), []) == flat
    )
    empty = PackedDataset(np.empty(0, dtype=np.uint16), 4, num_documents=0)
    assert list(eval_batches(empty, batch_size=8, num_batches=3, rank=0, world_size=1)) == []


# ---- streaming (the hf code path, on a local dataset directory) ---------------------------


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_ds")
    docs = make_docs(120, seed=1)
    write_jsonl(root / "train.jsonl", docs)
    return root, docs


def stream_cfg(root, **kw) -> DataConfig:
    base = dict(
        source="hf",
        path=str(root),
        split="train",
        streaming=True,
        seq_len=16,
        val_fraction=0.2,
        shuffle_buffer=8,
    )
    base.update(kw)
    return DataConfig(**base)


def test_streaming_heldout_documents_never_reach_training(stream_dir):
    root, docs = stream_dir
    tok = ByteTokenizer()
    train, val = build_datasets(stream_cfg(root, shuffle_buffer=4), tok, seed=0)
    loader = BatchLoader(train, global_batch_size=4, grad_accum=1, rank=0, world_size=1, seed=0)
    seen = set()
    for _ in range(200):  # 800 windows: more than one pass over the ~600 training windows
        for row in loader.next_step()[0]["input_ids"]:
            seen |= markers(tok.decode(row.tolist()))
    held_out = set()
    for b in eval_batches(val, batch_size=4, num_batches=200, rank=0, world_size=1):
        for row in b["input_ids"]:
            held_out |= markers(tok.decode(row.tolist()))
    assert seen and held_out and not seen & held_out
    all_markers = {f"<doc{i:04d}>" for i in range(len(docs))}
    assert held_out < all_markers
    first = [
        b["input_ids"] for b in eval_batches(val, batch_size=4, num_batches=3, rank=0, world_size=1)
    ]
    second = [
        b["input_ids"] for b in eval_batches(val, batch_size=4, num_batches=3, rank=0, world_size=1)
    ]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_hf_named_validation_split_non_streaming(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    root = tmp_path / "ds"
    root.mkdir()
    train_docs, val_docs = make_docs(30, seed=4), make_docs(6, seed=5)
    write_jsonl(root / "train.jsonl", train_docs)
    write_jsonl(root / "validation.jsonl", val_docs)
    cfg = DataConfig(source="hf", path=str(root), split="train", val_split="validation", seq_len=16)
    train, val = build_datasets(cfg, ByteTokenizer(), seed=0)
    assert list(train.tokens) == byte_stream(train_docs)
    assert list(val.tokens) == byte_stream(val_docs)
