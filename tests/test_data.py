"""Data: tokenizers, corpus sources and splits, packing, and the loader's determinism and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lh_cp.data.corpus import in_split, stdlib_files
from lh_cp.data.loader import BatchLoader, DataConfig, make_tokenizer, token_stream
from lh_cp.data.tokenizer import ByteTokenizer, load_tokenizer


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "déf f(x):\n    return x  # ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_document(text.encode()).tolist() == tok.encode(text)
    assert (tok.eod_id, tok.pad_id, tok.vocab_size) == (256, 257, 258)
    assert tok.decode([104, 105, 256, 257]) == "hi"


def test_stdlib_corpus_is_sorted_split_by_file_and_packed_with_end_of_document():
    files = stdlib_files()
    assert len(files) > 500 and list(files) == sorted(files)
    assert not any("site-packages" in f for f in files)
    validation = [f for f in files if in_split(f, "validation", 0.02)]
    train = [f for f in files if in_split(f, "train", 0.02)]
    assert set(validation).isdisjoint(train) and len(validation) + len(train) == len(files)
    assert 0.005 < len(validation) / len(files) < 0.05
    cfg = DataConfig(source="stdlib")
    tok = make_tokenizer(cfg)
    stream = token_stream(cfg, tok, "validation")
    assert int((stream == tok.eod_id).sum()) == len(validation)  # one end-of-document per file
    assert stream[-1] == tok.eod_id


def _stream(n: int = 5000) -> np.ndarray:
    return (np.arange(n) % 251).astype(np.uint16)


def test_loader_is_deterministic_and_resumes_exactly():
    """Two loaders with one seed agree; a loader restored from a state_dict continues exactly
    where the first one was, across an epoch boundary (the order is reshuffled per epoch)."""
    a = BatchLoader(_stream(), 64, 3, 0, 1, seed=7, shuffle=True)
    b = BatchLoader(_stream(), 64, 3, 0, 1, seed=7, shuffle=True)
    first = [a.next_batch()[0] for _ in range(40)]  # 40 * 3 = 120 windows > 78 per epoch
    assert all(torch.equal(x, b.next_batch()[0]) for x in first)
    c = BatchLoader(_stream(), 64, 3, 0, 1, seed=7, shuffle=True)
    c.load_state_dict(
        BatchLoader(_stream(), 64, 3, 0, 1, 7, True).state_dict() | {"consumed": torch.tensor(60)}
    )
    assert all(torch.equal(first[20 + i], c.next_batch()[0]) for i in range(20))
    other_seed = BatchLoader(_stream(), 64, 3, 0, 1, seed=8, shuffle=True)
    assert not torch.equal(other_seed.next_batch()[0], first[0])


def test_targets_are_inputs_shifted_by_one():
    loader = BatchLoader(_stream(), 64, 2, 0, 1, seed=0, shuffle=True)
    inputs, targets, documents = loader.next_batch()
    assert documents is None
    assert inputs.shape == targets.shape == (2, 64) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_data_parallel_ranks_read_disjoint_slices_of_one_global_batch():
    single = BatchLoader(_stream(), 32, 4, 0, 1, seed=1, shuffle=True)
    ranks = [BatchLoader(_stream(), 32, 2, r, 2, seed=1, shuffle=True) for r in range(2)]
    for _ in range(3):
        whole = single.next_batch()[0]
        parts = torch.cat([r.next_batch()[0] for r in ranks])
        assert torch.equal(whole, parts)
    assert all(r.consumed == single.consumed for r in ranks)


def test_too_small_split_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"fewer than one global batch of data.batch_size \* dp = 4 \* 2"
    ):
        BatchLoader(_stream(300), 64, 4, 0, 2, seed=0, shuffle=True)


def test_local_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": f"doc {i}", "id": i}) for i in range(50)) + "\n"
    )
    cfg = DataConfig(source="files", path=str(tmp_path), format="jsonl", validation_fraction=0.2)
    tok = make_tokenizer(cfg)
    train, val = token_stream(cfg, tok, "train"), token_stream(cfg, tok, "validation")
    docs = [
        tok.decode(d)
        for d in np.split(
            np.concatenate([train, val]), np.where(np.concatenate([train, val]) == 256)[0] + 1
        )
        if len(d)
    ]
    assert sorted(docs) == sorted(f"doc {i}" for i in range(50))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "one.txt").write_text("hello")
    text_cfg = DataConfig(
        source="files", path=str(tmp_path / "t"), format="text", validation_fraction=0.01
    )
    assert tok.decode(token_stream(text_cfg, tok, "train")) == "hello"


def test_local_files_split_does_not_depend_on_where_the_dataset_lies(tmp_path):
    """Documents are named relative to data.path: the same folder copied elsewhere (as every
    test's tmp_path differs) splits the same, so runs on copies of a dataset see the same data."""
    tok = ByteTokenizer()
    streams = []
    for place in ("here", "elsewhere/deeper"):
        folder = tmp_path / place / "corpus"
        (folder / "sub").mkdir(parents=True)
        for i in range(40):
            (folder / ("sub" if i % 2 else ".") / f"doc_{i:02d}.txt").write_text(f"document {i}")
        (folder / "records.jsonl").write_text(
            "\n".join(json.dumps({"text": f"record {i}"}) for i in range(40)) + "\n"
        )
        text = DataConfig(source="files", path=str(folder), format="text", validation_fraction=0.3)
        jsonl = DataConfig(
            source="files",
            path=str(folder / "records.jsonl"),
            format="jsonl",
            validation_fraction=0.3,
        )
        streams.append(
            [
                token_stream(cfg, tok, split)
                for cfg in (text, jsonl)
                for split in ("train", "validation")
            ]
        )
    for first, second in zip(*streams):
        assert len(first) > 0 and np.array_equal(first, second)


def test_missing_paths_and_fields_are_clear_errors(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(FileNotFoundError, match=r"data.path='/nonexistent/corpus' does not exist"):
        token_stream(
            DataConfig(source="files", path="/nonexistent/corpus", format="text"), tok, "train"
        )
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KeyError, match=r"no field data.text_field='text'"):
        token_stream(
            DataConfig(
                source="files", path=str(tmp_path), format="jsonl", validation_fraction=0.001
            ),
            tok,
            "train",
        )
    with pytest.raises(FileNotFoundError, match=r"no tokenizer file at"):
        load_tokenizer(str(tmp_path / "missing"), "<eod>")


def test_token_stream_cache_is_reused(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "x.txt").write_text("abc" * 100)
    cfg = DataConfig(
        source="files",
        path=str(corpus),
        format="text",
        validation_fraction=0.001,
        cache_dir=str(tmp_path / "cache"),
    )
    first = token_stream(cfg, ByteTokenizer(), "train")
    cached = list((tmp_path / "cache").glob("train-*.npy"))
    assert len(cached) == 1
    again = token_stream(cfg, ByteTokenizer(), "train")
    assert isinstance(again, np.memmap) and np.array_equal(first, again)


def test_hf_tokenizer_from_a_local_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<eod>": 1, "<pad>": 2, "hello": 3, "world": 4, "1": 5, "2": 6}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path), "<eod>", "<pad>")
    assert (loaded.eod_id, loaded.pad_id, loaded.vocab_size) == (1, 2, 7)
    assert loaded.encode("hello world 1") == [3, 4, 5]
    assert loaded.encode_document(b"world hello").tolist() == [4, 3]
    with pytest.raises(ValueError, match=r"data.eod_token='</s>' is not a token of this tokenizer"):
        load_tokenizer(str(tmp_path), "</s>")


def test_hf_datasets_from_local_jsonl(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "d.jsonl").write_text(
        "\n".join(json.dumps({"text": f"record {i}"}) for i in range(40)) + "\n"
    )
    cfg = DataConfig(source="hf", path=str(tmp_path), format="jsonl", validation_fraction=0.25)
    tok = ByteTokenizer()
    total = np.concatenate([token_stream(cfg, tok, "train"), token_stream(cfg, tok, "validation")])
    assert int((total == tok.eod_id).sum()) == 40


def test_hf_source_without_datasets_names_the_package(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    cfg = DataConfig(source="hf", path=str(tmp_path), format="jsonl")
    with pytest.raises(ImportError, match=r"needs the Python package 'datasets'"):
        token_stream(cfg, ByteTokenizer(), "train")


def test_python_corpus_dedupes_by_content_and_splits_by_whole_unit():
    """Every kept file's content is distinct; a unit (distribution or standard-library module)
    lies wholly on one side; the held-out bytes stay within the fraction; two builds agree."""
    import hashlib

    from lh_cp.data.corpus import python_corpus

    corpus = python_corpus(0.02)
    names = [unit.name for unit in corpus.units]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert any(n.startswith("dist/torch") for n in names) and any(
        n.startswith("stdlib/") for n in names
    )
    digests = [
        hashlib.blake2b(f.read_bytes(), digest_size=16).digest()
        for u in corpus.units
        for f in u.files
    ]
    assert len(set(digests)) == len(digests)
    files = [f for u in corpus.units for f in u.files]
    assert len(set(files)) == len(files)  # no file in two units
    total = sum(corpus.sizes)
    assert 0 < corpus.split_bytes("validation") <= 0.02 * total
    assert corpus.split_bytes("train") + corpus.split_bytes("validation") == total
    python_corpus.cache_clear()
    again = python_corpus(0.02)
    assert again.validation == corpus.validation and again.units == corpus.units


def test_python_source_streams_both_splits_and_caches_by_the_file_list(tmp_path):
    from lh_cp.data.corpus import python_corpus

    cfg = DataConfig(source="python", cache_dir=str(tmp_path))
    tok = make_tokenizer(cfg)
    validation = token_stream(cfg, tok, "validation")
    corpus = python_corpus(0.02)
    held_out = [u for u in corpus.units if u.name in corpus.validation]
    assert int((validation == tok.eod_id).sum()) == sum(len(u.files) for u in held_out)
    assert len(validation) == corpus.split_bytes("validation") + sum(len(u.files) for u in held_out)
    assert len(list(tmp_path.glob("validation-*.npy"))) == 1
    cfg.validate()  # no data.path needed


def test_a_run_that_would_repeat_data_is_refused_with_the_numbers(tmp_path):
    from lh_cp.train.recipe import RecipeError, recipe_from_dict
    from lh_cp.train.trainer import check_data_volume

    recipe = recipe_from_dict(
        {
            "data": {"seq_len": 128, "batch_size": 2},
            "eval": {"val_batches": 3},
            "stages": [{"name": "a", "attention": "dense", "steps": 10}],
        }
    )
    check_data_volume(recipe, train_windows=20, val_windows=6, dp=1)  # exactly one pass, no wrap
    with pytest.raises(
        RecipeError,
        match=r"10 steps x 2 sequences = 20 sequences.*holds 19 \(1.05 passes; data.max_epochs=1\)",
    ):
        check_data_volume(recipe, train_windows=19, val_windows=6, dp=1)
    with pytest.raises(
        RecipeError, match=r"eval.val_batches=3 x 4 = 12 sequences.*the validation split holds 6"
    ):
        check_data_volume(recipe, train_windows=100, val_windows=6, dp=2)
    recipe.data.max_epochs = 0.0  # no limit
    check_data_volume(recipe, train_windows=1, val_windows=6, dp=1)
