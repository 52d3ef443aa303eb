"""Tests of smoe.data: tokenizers, corpora, the split, streams, batching and the R reader."""

from __future__ import annotations

import gzip
import json
import math
import struct
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smoe.data import (
    AUSTEN_INSTALL_COMMAND,
    PROVENANCE,
    Batcher,
    BPETokenizer,
    ByteTokenizer,
    Corpus,
    DataConfig,
    Document,
    bits_per_byte,
    code_corpus,
    default_corpus,
    find_austen,
    load_path,
    load_paths,
    load_tokenizer,
    prepare_data,
    prose_corpus,
    split_corpus,
    tokenize_blocks,
    val_batches,
)
from smoe.data.rdata import read_lazyload_db, unserialize

PROSE = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife.\n"
    "However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families.\n"
)
CODE = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"


def small_corpus() -> Corpus:
    docs = [Document(PROSE * (3 + i), "prose", f"novel{i}.txt") for i in range(3)]
    docs += [Document(CODE * (2 + i), "code", f"mod{i}.py") for i in range(4)]
    return Corpus(tuple(docs))


# ---------------------------------------------------------------- tokenizers


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode_batch([text])[0].tolist() == ids


def test_byte_tokenizer_values():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.encode("é!") == [0xC3, 0xA9, 0x21]
    assert tok.decode([0x68, 0x69, 256, 0x21]) == "hi!"  # eos is dropped
    assert tok.decode([0xC3]) == "\ufffd"  # broken UTF-8 is replaced, not an error
    with pytest.raises(ValueError, match="ids"):
        tok.decode([257])
    batch = tok.encode_batch(["ab", ""])
    assert [t.dtype for t in batch] == [torch.int32, torch.int32]
    assert [t.tolist() for t in batch] == [[97, 98], []]


def test_bpe_train_save_load_round_trip(tmp_path):
    texts = [PROSE * 20, CODE * 40]
    tok = BPETokenizer.train(texts, vocab_size=320)
    assert tok.kind == "bpe" and tok.eos_id == 0
    assert 257 < tok.vocab_size <= 320
    # Deterministic training: the same texts give the same tokenizer.
    assert BPETokenizer.train(texts, vocab_size=320).to_json() == tok.to_json()
    sample = "It is a truth; def add(a, b): ü 日本語 🙂\n\ttabs  and  spaces\n"
    ids = tok.encode(sample)
    assert len(ids) < len(sample.encode("utf-8"))  # merges were learned and used
    assert tok.decode(ids) == sample  # byte-level: exact even for unseen characters
    assert tok.decode(ids + [tok.eos_id]) == sample

    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.encode(sample) == ids
    assert loaded.vocab_size == tok.vocab_size
    assert load_tokenizer(path).fingerprint() == tok.fingerprint()
    assert [t.tolist() for t in loaded.encode_batch([sample, "x"])] == [ids, tok.encode("x")]
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(texts, vocab_size=100)


def test_load_tokenizer_byte_and_errors(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    ByteTokenizer().save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["type"] == "smoe-byte"
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)


# ---------------------------------------------------------------- corpora and errors


def test_load_path_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_path(tmp_path / "does-not-exist")
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    (empty_dir / "blank.txt").write_text("  \n")
    (empty_dir / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="emptydir"):
        load_path(empty_dir)
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        load_path(empty_file)
    with pytest.raises(ValueError, match="paths"):
        load_paths([])
    with pytest.raises(FileNotFoundError, match="missing-data"):
        prepare_data(DataConfig(paths=(str(tmp_path / "missing-data"),), use_cache=False))


def test_load_path_folder_order_domains_and_decoding(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.py").write_text("x = 1\n")
    (tmp_path / "a.md").write_bytes(b"caf\xc3\xa9 \xff\n")  # one bad byte
    (tmp_path / ".hidden.txt").write_text("secret\n")
    (tmp_path / "c.txt").write_text("prose\n")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01")
    docs = load_path(tmp_path)
    assert [Path(d.source).name for d in docs] == ["a.md", "z.py", "c.txt"]
    assert [d.domain for d in docs] == ["prose", "code", "prose"]
    assert docs[0].text == "café \ufffd\n"
    assert [d.domain for d in load_path(tmp_path, domain="mine")] == ["mine"] * 3
    single = load_path(tmp_path / "b" / "z.py")
    assert single == [Document("x = 1\n", "code", str(tmp_path / "b" / "z.py"))]


def test_default_corpus_has_two_domains_with_provenance():
    if find_austen() is None:
        pytest.fail(f"default prose corpus missing; setup must run: {AUSTEN_INSTALL_COMMAND}")
    corpus = default_corpus()
    assert corpus.domains == ("prose", "code")
    prose, code = corpus.num_bytes("prose"), corpus.num_bytes("code")
    assert 3_500_000 < prose < 5_000_000  # six novels, about 4.0 MB
    assert 0.9 * prose <= code <= prose + 300_000  # code is sized to match the prose
    by_domain = {s.domain: s for s in corpus.sources}
    assert by_domain["prose"].name == "r-cran-janeaustenr"
    assert "public domain" in by_domain["prose"].licence
    assert by_domain["code"].licence.startswith("PSF")
    assert by_domain["code"].version.startswith("Python 3.")
    assert by_domain["prose"].num_bytes == prose and by_domain["code"].num_bytes == code
    titles = [d.source for d in corpus.documents if d.domain == "prose"]
    assert len(titles) == 6 and "Pride and Prejudice" in titles[1]
    assert corpus.documents[1].text.startswith("PRIDE AND PREJUDICE")
    code_sources = [d.source for d in corpus.documents if d.domain == "code"]
    assert code_sources == sorted(code_sources)
    excluded = {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data"}
    assert not any(set(s.removeprefix("stdlib:").split("/")[:-1]) & excluded for s in code_sources)
    folders = {s.removeprefix("stdlib:").split("/")[0] for s in code_sources if "/" in s}
    assert len(folders) >= 8  # a spread over the library, not its first files alphabetically
    assert "r-cran-janeaustenr" in PROVENANCE and "PSF" in PROVENANCE


def test_missing_prose_package_error_gives_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y --no-install-recommends"):
        prose_corpus(tmp_path / "janeaustenr")


def test_prepare_data_on_the_default_corpus():
    if find_austen() is None:
        pytest.fail(f"default prose corpus missing; setup must run: {AUSTEN_INSTALL_COMMAND}")
    data = prepare_data(DataConfig(use_cache=False))
    for stream in (data.train, data.val):
        assert stream.domain_names == ("prose", "code")
        assert stream.num_tokens("prose") > 0 and stream.num_tokens("code") > 0
        assert 0.999 < stream.bytes_per_token() <= 1.0  # bytes, and a few eos tokens
    assert 0.04 < len(data.val) / (len(data.train) + len(data.val)) < 0.07
    eos = int((data.train.tokens_N == 256).sum() + (data.val.tokens_N == 256).sum())
    assert eos == len(data.corpus.documents)  # one eos per document, in one split or the other


def test_code_corpus_is_deterministic_and_capped():
    docs_a, source = code_corpus(max_bytes=150_000)
    docs_b, _ = code_corpus(max_bytes=150_000)
    assert docs_a == docs_b
    total = sum(len(d.text.encode()) for d in docs_a)
    assert total == source.num_bytes >= 150_000
    assert total - max(len(d.text.encode()) for d in docs_a) < 150_000  # stopped at the cap
    with pytest.raises(ValueError, match="max_bytes"):
        code_corpus(max_bytes=0)


# ---------------------------------------------------------------- split and streams


def test_split_is_deterministic_disjoint_and_complete():
    corpus = small_corpus()
    train, val = split_corpus(corpus, val_fraction=0.1, block_chars=200)
    assert (train, val) == split_corpus(corpus, val_fraction=0.1, block_chars=200)
    keys_train = {(b.source, b.index) for b in train}
    keys_val = {(b.source, b.index) for b in val}
    assert keys_train.isdisjoint(keys_val)
    for doc in corpus.documents:  # the blocks of each document rebuild it exactly
        blocks = sorted((b for b in train + val if b.source == doc.source), key=lambda b: b.index)
        assert "".join(b.text for b in blocks) == doc.text
        assert [b.last for b in blocks] == [False] * (len(blocks) - 1) + [True]
    for domain in ("prose", "code"):
        held = sum(len(b.text) for b in val if b.domain == domain)
        total = sum(len(d.text) for d in corpus.documents if d.domain == domain)
        assert 0.1 * total <= held < 0.1 * total + 200  # the share, to within one block
    other = split_corpus(corpus, val_fraction=0.3, block_chars=200)[1]
    assert len(other) > len(val)


def test_stream_domain_ids_align_with_tokens():
    corpus = small_corpus()
    train, val = split_corpus(corpus, val_fraction=0.1, block_chars=200)
    tok = ByteTokenizer()
    stream = tokenize_blocks(train, tok, corpus.domains)
    assert stream.tokens_N.dtype == torch.int32 and stream.domains_N.dtype == torch.uint8
    assert stream.tokens_N.shape == stream.domains_N.shape
    for d, name in enumerate(stream.domain_names):
        ids = stream.tokens_N[stream.domains_N == d].tolist()
        expected = []
        for b in train:
            if b.domain == name:
                expected += tok.encode(b.text) + ([tok.eos_id] if b.last else [])
        assert ids == expected
    eos = int((stream.tokens_N == tok.eos_id).sum())
    assert eos == sum(b.last for b in train)
    assert stream.num_bytes[0] == sum(len(b.text.encode()) for b in train if b.domain == "prose")
    # bytes per token: 1 byte per token except eos
    assert stream.bytes_per_token() == pytest.approx(sum(stream.num_bytes) / len(stream))
    assert stream.bytes_per_token("code") < 1.0
    by_domain = stream.bytes_per_token_by_domain()
    assert set(by_domain) == {None, "prose", "code"}
    assert by_domain["prose"] == stream.bytes_per_token("prose")
    assert bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_byte(2 * math.log(2), 4.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="domain"):
        stream.bytes_per_token("poetry")


# ---------------------------------------------------------------- batching


def _stream():
    corpus = small_corpus()
    train, _ = split_corpus(corpus, val_fraction=0.1, block_chars=200)
    return tokenize_blocks(train, ByteTokenizer(), corpus.domains)


def test_batcher_is_deterministic_and_resumes_exactly():
    stream = _stream()
    a = Batcher(stream, batch_size=4, seq_len=16, seed=7)
    b = Batcher(stream, batch_size=4, seq_len=16, seed=7)
    first = [next(a) for _ in range(8)]
    for x in first:
        y = next(b)
        assert all(torch.equal(p, q) for p, q in zip(x, y))
    assert not torch.equal(next(Batcher(stream, 4, 16, seed=8)).x_BT, first[0].x_BT)

    x_BT, y_BT, domain_BT = first[0]
    assert x_BT.shape == y_BT.shape == domain_BT.shape == (4, 16)
    assert x_BT.dtype == y_BT.dtype == domain_BT.dtype == torch.int64
    assert torch.equal(x_BT[:, 1:], y_BT[:, :-1])  # targets are the inputs shifted by one

    # Resume mid-stream from a JSON round trip of the state.
    run = Batcher(stream, batch_size=4, seq_len=16, seed=7)
    for _ in range(5):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))
    assert state == {
        "seed": 7, "step": 5, "batch_size": 4, "seq_len": 16, "num_tokens": len(stream)
    }
    resumed = Batcher(stream, batch_size=4, seq_len=16, seed=0)
    resumed.load_state_dict(state)
    for k in range(5, 8):
        assert torch.equal(next(resumed).x_BT, first[k].x_BT)
        assert torch.equal(run.batch_at(k).y_BT, first[k].y_BT)
    assert resumed.step == 8

    with pytest.raises(ValueError, match="batch_size"):
        Batcher(stream, batch_size=2, seq_len=16).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        Batcher(stream, batch_size=4, seq_len=len(stream))


def test_batch_domains_match_the_stream():
    stream = _stream()
    batcher = Batcher(stream, batch_size=64, seq_len=32, seed=1)
    x_BT, _, domain_BT = next(batcher)
    # Recover each row's start by searching the stream, then compare domain ids there.
    tokens = stream.tokens_N.tolist()
    for row in range(4):
        row_ids = x_BT[row].tolist()
        starts = [i for i in range(len(tokens) - 32) if tokens[i : i + 32] == row_ids]
        assert any(
            stream.domains_N[s : s + 32].long().tolist() == domain_BT[row].tolist() for s in starts
        )
    assert set(domain_BT.unique().tolist()) == {0, 1}  # 64 windows reach both domains


def test_val_batches_are_fixed_and_cover_both_domains():
    stream = _stream()
    full = val_batches(stream, batch_size=8, seq_len=16)
    n_windows = (len(stream) - 1) // 16
    assert sum(b.x_BT.shape[0] for b in full) == n_windows
    scored = torch.cat([b.x_BT for b in full]).flatten()
    assert torch.equal(scored, stream.tokens_N[: n_windows * 16].long())
    some = val_batches(stream, batch_size=4, seq_len=16, max_batches=2)
    again = val_batches(stream, batch_size=4, seq_len=16, max_batches=2)
    assert len(some) == 2 and all(torch.equal(p.x_BT, q.x_BT) for p, q in zip(some, again))
    assert some[0].x_BT[0].tolist() == stream.tokens_N[:16].tolist()  # first window at 0
    assert some[-1].y_BT[-1, -1].item() == stream.tokens_N[-1].item()  # last window at the end
    domains = torch.cat([b.domain_BT for b in some])
    assert set(domains.unique().tolist()) == {0, 1}


# ---------------------------------------------------------------- prepare_data


def test_prepare_data_from_user_files_and_run_dir(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "story.txt").write_text(PROSE * 30)
    (data_dir / "lib.py").write_text(CODE * 60)
    run_dir = tmp_path / "run"
    config = DataConfig(
        paths=(str(data_dir),), tokenizer="bpe", bpe_vocab_size=300, cache_dir=str(tmp_path / "c")
    )
    data = prepare_data(config, run_dir=run_dir)
    assert (run_dir / "tokenizer.json").is_file()
    assert data.train.domain_names == ("prose", "code") and len(data.val) > 0
    assert data.train.bytes_per_token() > 1.5  # BPE merges several bytes per token
    again = prepare_data(config, run_dir=run_dir)  # reuses run_dir's tokenizer and the cache
    assert torch.equal(again.train.tokens_N, data.train.tokens_N)
    assert torch.equal(again.val.domains_N, data.val.domains_N)
    assert again.tokenizer.encode("def add") == data.tokenizer.encode("def add")
    with pytest.raises(ValueError, match="tokenizer"):
        prepare_data(DataConfig(paths=(str(data_dir),), use_cache=False), run_dir=run_dir)
    byte = prepare_data(DataConfig(paths=(str(data_dir),), use_cache=False))
    assert byte.train.bytes_per_token() == pytest.approx(1.0, abs=1e-3)


def test_token_cache_is_safetensors_written_atomically(tmp_path, monkeypatch):
    """The BPE token streams are cached as safetensors (never pickle), read back identical;
    without the safetensors package nothing is cached and nothing fails."""
    import smoe.data.dataset as dataset
    from safetensors import safe_open

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "story.txt").write_text(PROSE * 30)
    (data_dir / "lib.py").write_text(CODE * 60)
    cache = tmp_path / "c"
    config = DataConfig(paths=(str(data_dir),), tokenizer="bpe", bpe_vocab_size=300,
                        cache_dir=str(cache))
    data = prepare_data(config)
    (stream_file,) = cache.glob("tokens-*")
    assert stream_file.name.startswith("tokens-v3-") and stream_file.suffix == ".safetensors"
    assert not list(cache.glob("*.pt")) and not list(cache.glob(".*.tmp"))
    with safe_open(str(stream_file), framework="pt") as f:
        assert f.get_tensor("train/tokens_N").dtype == torch.uint16
    monkeypatch.setattr(dataset, "tokenize_blocks", None)  # a cache hit tokenizes nothing
    again = prepare_data(config)
    for a, b in ((again.train, data.train), (again.val, data.val)):
        assert torch.equal(a.tokens_N, b.tokens_N) and a.tokens_N.dtype == torch.int32
        assert torch.equal(a.domains_N, b.domains_N) and a.domains_N.dtype == torch.uint8
        assert (a.domain_names, a.num_bytes) == (b.domain_names, b.num_bytes)
    monkeypatch.undo()

    stream_file.write_bytes(b"not a safetensors file")  # unreadable: rebuilt
    assert torch.equal(prepare_data(config).train.tokens_N, data.train.tokens_N)
    with safe_open(str(stream_file), framework="pt") as f:
        assert "val/tokens_N" in f.keys()

    other = tmp_path / "c2"
    monkeypatch.setattr(dataset, "_has_safetensors", lambda: False)
    no_st = prepare_data(DataConfig(paths=(str(data_dir),), tokenizer="bpe",
                                    bpe_vocab_size=300, cache_dir=str(other)))
    assert torch.equal(no_st.train.tokens_N, data.train.tokens_N)
    assert not list(other.glob("tokens-*"))


def test_split_does_not_depend_on_where_the_corpus_folder_is(tmp_path):
    """The split hashes each file's path relative to the data path given: the same folder
    copied to two places gives the same train and validation streams."""
    import shutil

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(4):
        (src / f"chapter{i}.txt").write_text(PROSE * (5 + i))
    (src / "sub" / "tool.py").write_text(CODE * 40)
    (src / "sub" / "more.py").write_text(CODE * 25)
    a = tmp_path / "one" / "corpus"
    b = tmp_path / "elsewhere" / "deeper" / "renamed"
    shutil.copytree(src, a)
    shutil.copytree(src, b)
    streams = []
    for root in (a, b):
        data = prepare_data(DataConfig(paths=(str(root),), val_fraction=0.2, block_chars=300,
                                       use_cache=False))
        streams.append(data)
    x, y = streams
    assert len(x.val) > 0 and len(x.train) > len(x.val)
    assert torch.equal(x.train.tokens_N, y.train.tokens_N)
    assert torch.equal(x.val.tokens_N, y.val.tokens_N)
    assert torch.equal(x.val.domains_N, y.val.domains_N)
    # a file given directly is keyed by its name
    one = prepare_data(DataConfig(paths=(str(a / "chapter3.txt"),), block_chars=300,
                                  use_cache=False))
    two = prepare_data(DataConfig(paths=(str(b / "chapter3.txt"),), block_chars=300,
                                  use_cache=False))
    assert torch.equal(one.val.tokens_N, two.val.tokens_N)


def test_data_config_validates_fields():
    with pytest.raises(ValueError, match="tokenizer"):
        DataConfig(tokenizer="wordpiece")
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=0.0)
    with pytest.raises(ValueError, match="bpe_vocab_size"):
        DataConfig(bpe_vocab_size=10)
    with pytest.raises(ValueError, match="code_bytes"):
        DataConfig(code_bytes=-1)
    assert DataConfig(paths="a.txt").paths == ("a.txt",)


# ---------------------------------------------------------------- R data reader


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _chars(s: str) -> bytes:
    raw = s.encode()
    return _i(9 | (1 << 3) << 12) + _i(len(raw)) + raw  # CHARSXP, UTF-8


def _strs(*items: str | None) -> bytes:
    body = b"".join(_i(9) + _i(-1) if s is None else _chars(s) for s in items)
    return _i(16) + _i(len(items)) + body


def _named_list(**values: bytes) -> bytes:
    head = _i(19 | 1 << 9) + _i(len(values)) + b"".join(values.values())
    names = _i(2 | 1 << 10) + _i(1) + _chars("names") + _strs(*values) + _i(254)
    return head + names


def _serialized(item: bytes) -> bytes:
    return b"X\n" + _i(3) + _i(0x040202) + _i(0x030500) + _i(5) + b"UTF-8" + item


def test_r_reader_unserializes_vectors_and_lazyload_db(tmp_path):
    ints = _i(13) + _i(3) + _i(1) + _i(-(2**31)) + _i(7)
    value = unserialize(_serialized(_named_list(text=_strs("Emma", None, "ü"), n=ints)))
    assert value == {"text": ["Emma", None, "ü"], "n": [1, None, 7]}
    with pytest.raises(ValueError, match="header"):
        unserialize(b"RDX2\n")

    entry = _serialized(_strs("It is a truth", "universally acknowledged"))
    blob = struct.pack(">I", len(entry)) + zlib.compress(entry)
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    index = _named_list(
        variables=_named_list(novel=_i(13) + _i(2) + _i(0) + _i(len(blob))),
        references=_i(19) + _i(0),
        compressed=_i(10) + _i(1) + _i(1),
    )
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_serialized(index)))
    assert read_lazyload_db(tmp_path / "Rdata") == {
        "novel": ["It is a truth", "universally acknowledged"]
    }
    with pytest.raises(FileNotFoundError, match="Other.rdx"):
        read_lazyload_db(tmp_path / "Other")
