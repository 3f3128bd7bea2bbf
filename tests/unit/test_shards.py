import json
import math
import os

import numpy as np
import pytest

from kiln.config import DataConfig
from kiln.data import shards as shards_mod
from kiln.data.shards import open_prepared, prepare, unigram_entropy
from kiln.errors import DataError
from kiln.fileio import sha256_file


def data_cfg(corpus, cache, **kw) -> DataConfig:
    return DataConfig(
        corpus=str(corpus),
        cache_dir=str(cache),
        vocab_size=kw.pop("vocab_size", 320),
        val_fraction=kw.pop("val_fraction", 0.15),
        **kw,
    )


def quiet(*_):
    pass


def documents(prepared, split: str) -> list[str]:
    """Decode a split back into its documents (EOS-separated)."""
    tok = prepared.tokenizer
    ids = np.concatenate(prepared.split(split)).tolist()
    assert ids[-1] == tok.eos_id
    docs, cur = [], []
    for i in ids:
        if i == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    return docs


def test_manifest_fields(shared_prepared, shared_corpus):
    p = shared_prepared
    m = p.manifest
    assert m["dtype"] == "uint16"
    assert m["tokenizer_sha256"] == p.tokenizer.sha256
    assert m["eos_id"] == p.tokenizer.eos_id == 1
    assert m["vocab_size"] == p.vocab_size == p.tokenizer.vocab_size
    assert m["corpus_files"] == 30
    tr, va = m["splits"]["train"], m["splits"]["val"]
    assert tr["documents"] + va["documents"] == 30
    assert tr["documents"] > 0 and va["documents"] > 0
    for split in (tr, va):
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"])
        for s in split["shards"]:
            path = p.path / s["file"]
            assert path.stat().st_size == 2 * s["tokens"]
            assert sha256_file(path) == s["sha256"]
    for name in ("train", "val"):
        arrays = p.split(name)
        assert all(a.dtype == np.uint16 for a in arrays)
        assert int(sum((a == p.tokenizer.eos_id).sum() for a in arrays)) == m["splits"][name]["documents"]
    assert json.loads((p.path / "manifest.json").read_text()) == m
    expected_entropy = unigram_entropy(p.split("val"), p.vocab_size)
    assert m["val_unigram_entropy"] == pytest.approx(expected_entropy)
    assert 0 < expected_entropy < math.log(p.vocab_size)


def test_split_is_disjoint_and_complete(shared_prepared, shared_corpus):
    originals = sorted(f.read_text() for f in shared_corpus.glob("*.txt"))
    train, val = documents(shared_prepared, "train"), documents(shared_prepared, "val")
    assert sorted(train + val) == originals
    assert not set(train) & set(val)


def test_split_is_deterministic_for_a_seed(shared_corpus, tmp_path):
    a = prepare(data_cfg(shared_corpus, tmp_path / "a"), log=quiet)
    b = prepare(data_cfg(shared_corpus, tmp_path / "b"), log=quiet)
    assert a.path.name == b.path.name
    for split in ("train", "val"):
        assert [s["sha256"] for s in a.manifest["splits"][split]["shards"]] == [
            s["sha256"] for s in b.manifest["splits"][split]["shards"]
        ]
    c = prepare(data_cfg(shared_corpus, tmp_path / "a", split_seed=99, val_fraction=0.3), log=quiet)
    assert c.path != a.path
    assert sorted(documents(c, "val")) != sorted(documents(a, "val"))


def test_second_prepare_reuses_the_cache(shared_corpus, tmp_path, monkeypatch):
    cfg = data_cfg(shared_corpus, tmp_path / "cache")
    first = prepare(cfg, log=quiet)
    shard = first.path / first.manifest["splits"]["train"]["shards"][0]["file"]
    mtime = shard.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(shards_mod, "train_tokenizer", no_training)
    second = prepare(cfg, log=quiet)
    assert second.path == first.path
    assert second.manifest == first.manifest
    assert shard.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.path.name]  # no temp folders left


def test_changed_inputs_make_a_new_dataset(make_corpus, tmp_path):
    corpus = make_corpus(n_files=8)
    first = prepare(data_cfg(corpus, tmp_path / "cache"), log=quiet)
    assert prepare(data_cfg(corpus, tmp_path / "cache", vocab_size=300), log=quiet).path != first.path
    (corpus / "doc000.txt").write_text("changed contents entirely\n")
    assert prepare(data_cfg(corpus, tmp_path / "cache"), log=quiet).path != first.path


def test_tampered_shard_is_detected_and_left_alone(make_corpus, tmp_path):
    corpus = make_corpus(n_files=8)
    cfg = data_cfg(corpus, tmp_path / "cache")
    prepared = prepare(cfg, log=quiet)
    shard = prepared.path / prepared.manifest["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum does not match"):
        open_prepared(prepared.path)
    with pytest.raises(DataError, match="checksum does not match"):
        prepare(cfg, log=quiet)
    assert shard.read_bytes() == bytes(raw)  # never silently rewritten
    assert open_prepared(prepared.path, verify=False).manifest == prepared.manifest


def test_tampered_tokenizer_is_detected(make_corpus, tmp_path):
    corpus = make_corpus(n_files=8)
    prepared = prepare(data_cfg(corpus, tmp_path / "cache"), log=quiet)
    tok_path = prepared.path / "tokenizer.json"
    doc = json.loads(tok_path.read_text())
    doc["model"]["merges"] = doc["model"]["merges"][:-1]  # a different tokenizer, still a valid file
    tok_path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="does not match the tokenizer"):
        open_prepared(prepared.path)


def test_not_a_prepared_dataset(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        open_prepared(tmp_path)


def test_empty_corpus(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "a.txt").write_text("")
    (d / "b.txt").write_text("   \n\n")
    with pytest.raises(DataError, match="holds no text"):
        prepare(data_cfg(d, tmp_path / "cache"), log=quiet)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_single_short_document_corpus(tmp_path):
    (tmp_path / "one.txt").write_text("only one document here")
    with pytest.raises(DataError, match="one short document .* lower data.piece_chars"):
        prepare(data_cfg(tmp_path / "one.txt", tmp_path / "cache"), log=quiet)


def book(n_lines: int = 32000, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    words = "the of and to a in that it was he for on are with as his they be at one have this".split()
    return "".join(
        " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + ".\n" for _ in range(n_lines)
    )


def test_one_big_text_file_is_cut_into_pieces_and_split(tmp_path):
    """The most common first corpus: one plain-text file (here ~1 MB)."""
    text = book()
    assert len(text) > 900_000
    (tmp_path / "book.txt").write_text(text)
    p = prepare(data_cfg(tmp_path / "book.txt", tmp_path / "cache", val_fraction=0.1), log=quiet)
    train, val = documents(p, "train"), documents(p, "val")
    assert val and train
    share = sum(map(len, val)) / len(text)
    assert 0.03 < share < 0.25  # about val_fraction of the text, in pieces
    assert all(len(v) <= p.manifest["piece_chars"] * 3 for v in val)
    # every line of the book is in exactly one split, in order within each piece
    assert sorted("".join(train + val).splitlines()) == sorted(text.splitlines())


def test_split_pieces_cut_at_line_breaks():
    text = "".join(f"line {i}\n" for i in range(1000))
    pieces = shards_mod.split_pieces(text, 300)
    assert "".join(pieces) == text
    assert all(len(x) <= 300 and x.endswith("\n") for x in pieces)
    assert shards_mod.split_pieces("x" * 1000, 300) == ["x" * 300] * 3 + ["x" * 100]  # no line break: hard cuts
    assert shards_mod.split_pieces(text, 0) == [text]


def test_the_split_depends_on_content_not_on_the_corpus_path(tmp_path):
    """The same files copied to two folders give the same split and the same tokenizer."""
    import shutil

    from conftest import write_corpus

    a = write_corpus(tmp_path / "here" / "corpus", n_files=60)
    b = tmp_path / "elsewhere" / "deeper" / "copy"
    shutil.copytree(a, b)
    pa = prepare(data_cfg(a, tmp_path / "cache", val_fraction=0.1), log=quiet)
    pb = prepare(data_cfg(b, tmp_path / "cache", val_fraction=0.1), log=quiet)
    assert pa.path != pb.path  # two cache entries (the cache key knows the paths) ...
    assert pa.manifest["tokenizer_sha256"] == pb.manifest["tokenizer_sha256"]  # ... with the same contents
    assert pa.manifest["splits"] == pb.manifest["splits"]
    assert pa.manifest["content_key"] == pb.manifest["content_key"]
    assert documents(pa, "val") == documents(pb, "val")


def test_identical_documents_land_in_the_same_split(tmp_path):
    train, val = shards_mod.split_documents(
        ["same text\n"] * 50 + [f"doc {i}\n" for i in range(200)], seed=3, fraction=0.2, piece_chars=0
    )
    assert ("same text\n" in train) != ("same text\n" in val)


def test_tiny_corpus_still_gets_a_validation_document(tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    (d / "a.txt").write_text("first document " * 20)
    (d / "b.txt").write_text("second document " * 20)
    p = prepare(data_cfg(d, tmp_path / "cache", val_fraction=0.01), log=quiet)
    assert (p.manifest["splits"]["train"]["documents"], p.manifest["splits"]["val"]["documents"]) == (1, 1)


def test_max_docs(make_corpus, tmp_path):
    corpus = make_corpus(n_files=12)
    p = prepare(data_cfg(corpus, tmp_path / "cache", max_docs=5), log=quiet)
    assert p.manifest["splits"]["train"]["documents"] + p.manifest["splits"]["val"]["documents"] == 5


def test_given_tokenizer_is_used(shared_prepared, make_corpus, tmp_path):
    corpus = make_corpus(n_files=6, seed=3)
    tok_file = tmp_path / "tok.json"
    shared_prepared.tokenizer.save(tok_file)
    p = prepare(data_cfg(corpus, tmp_path / "cache", tokenizer=str(tok_file)), log=quiet)
    assert p.manifest["tokenizer_sha256"] == shared_prepared.tokenizer.sha256


def test_unwritable_cache_dir(make_corpus, tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        cache = blocker / "sub"  # a path under a regular file cannot be created, even by root
    else:
        cache = tmp_path / "ro"
        cache.mkdir(mode=0o500)
    with pytest.raises(DataError, match="data.cache_dir"):
        prepare(data_cfg(make_corpus(n_files=4), cache), log=quiet)


def test_unigram_entropy_by_hand():
    assert unigram_entropy([np.array([5, 5, 6, 6], dtype=np.uint16)], 10) == pytest.approx(math.log(2))
    assert unigram_entropy([np.array([7, 7], dtype=np.uint16), np.array([7], dtype=np.uint16)], 10) == 0.0
    p = np.array([0.5, 0.25, 0.25])
    tokens = np.array([1, 1, 2, 3], dtype=np.uint16)
    assert unigram_entropy([tokens], 4) == pytest.approx(float(-(p * np.log(p)).sum()))


def test_a_start_checks_sizes_and_ends_and_verify_hashes_everything(make_corpus, tmp_path, monkeypatch):
    """Opening a dataset reads a constant amount per shard (its size, a digest of its first and
    last MiB); a flipped byte in the middle of a large shard passes that and is caught by the
    full check (`kiln prepare --verify`), which hashes every shard."""
    import kiln.fileio as fileio

    monkeypatch.setattr(fileio, "QUICK_BYTES", 64)  # small shards: a "middle" exists
    corpus = make_corpus(n_files=8)
    prepared = prepare(data_cfg(corpus, tmp_path / "cache"), log=quiet)
    shard = prepared.path / prepared.manifest["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    assert len(raw) > 1000
    middle = bytearray(raw)
    middle[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(middle))
    assert open_prepared(prepared.path).manifest == prepared.manifest  # quick: not read
    with pytest.raises(DataError, match="checksum does not match"):
        open_prepared(prepared.path, verify="full")
    shard.write_bytes(bytes(raw[:-2]))  # truncated: the size says so
    with pytest.raises(DataError, match="checksum does not match"):
        open_prepared(prepared.path)
    tail = bytearray(raw)
    tail[-3] ^= 0xFF
    shard.write_bytes(bytes(tail))
    with pytest.raises(DataError, match="checksum does not match"):
        open_prepared(prepared.path)
    shard.write_bytes(bytes(raw))
    assert open_prepared(prepared.path, verify="full").manifest == prepared.manifest


def test_prepare_verify_on_the_command_line(make_corpus, tmp_path, capsys):
    from kiln.cli import main

    corpus = make_corpus(n_files=8)
    sets = [f"data.corpus={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=300"]
    assert main(["prepare", "--preset", "tiny", *[a for s in sets for a in ("--set", s)], "--verify"]) == 0
    assert "verified 2 shard(s)" in capsys.readouterr().out


def test_a_config_file_layers_over_a_preset_on_the_command_line(make_corpus, tmp_path, capsys):
    """`--preset tiny --config mix.toml --set ...`: preset < file < --set, as load_config merges."""
    from kiln.cli import main

    corpus = make_corpus(n_files=8)
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[data]\ncorpus = "{corpus}"\nvocab_size = 280\ncache_dir = "{tmp_path / "cache"}"\n')
    assert main(["prepare", "--preset", "tiny", "--config", str(mix)]) == 0
    assert "vocabulary 280" in capsys.readouterr().out
    assert main(["prepare", "--preset", "tiny", "--config", str(mix), "--set", "data.vocab_size=300"]) == 0
    assert "vocabulary 300" in capsys.readouterr().out


def _stream(prepared) -> dict[str, list[int]]:
    return {name: [int(t) for a in prepared.split(name) for t in a] for name in ("train", "val")}


def test_streaming_in_a_tiny_buffer_gives_the_same_tokens(make_corpus, tmp_path, monkeypatch):
    """Encoding 100 characters at a time into shards of 500 tokens gives the token streams of a
    build with the default buffers, and those of the in-memory split the streaming one replaces."""
    from kiln.data import stream

    corpus = make_corpus(n_files=12)
    whole = prepare(data_cfg(corpus, tmp_path / "a"), log=quiet)
    monkeypatch.setattr(stream, "ENCODE_BYTES", 100)
    monkeypatch.setattr(shards_mod, "SHARD_TOKENS", 500)
    small = prepare(data_cfg(corpus, tmp_path / "b"), log=quiet)
    assert len(small.manifest["splits"]["train"]["shards"]) > 1
    assert _stream(small) == _stream(whole)
    assert small.manifest["tokenizer_sha256"] == whole.manifest["tokenizer_sha256"]
    docs = [f.read_text() for f in sorted(corpus.iterdir())]
    train, val = shards_mod.split_documents(docs, 1234, 0.15, 8192)
    eos = whole.tokenizer.eos_id
    expected = [t for text in train for t in whole.tokenizer.encode_batch([text])[0] + [eos]]
    assert _stream(whole)["train"] == expected
    assert whole.manifest["splits"]["val"]["documents"] == len(val)


def test_the_tokenizer_learns_from_a_bounded_sample(make_corpus, tmp_path):
    """Below data.tokenizer_sample_mb the tokenizer sees all the training text; above it, a sample
    chosen by content: the same tokenizer from the same corpus, another from more text."""
    corpus = make_corpus(n_files=12)
    full = prepare(data_cfg(corpus, tmp_path / "a"), log=quiet)
    sampled = prepare(data_cfg(corpus, tmp_path / "b", tokenizer_sample_mb=0.002), log=quiet)
    again = prepare(data_cfg(corpus, tmp_path / "c", tokenizer_sample_mb=0.002), log=quiet)
    assert sampled.manifest["tokenizer_sha256"] != full.manifest["tokenizer_sha256"]
    assert sampled.manifest["tokenizer_sha256"] == again.manifest["tokenizer_sha256"]
    assert sampled.manifest["splits"]["train"]["documents"] == full.manifest["splits"]["train"]["documents"]


def test_an_interrupted_prepare_resumes_from_its_finished_shards(make_corpus, tmp_path, monkeypatch):
    """Killed after its third finished shard, `prepare` keeps `<key>.partial`; the next one
    continues from there (no new tokenizer, the finished shards untouched) and gives the shards
    and manifest of a build that was never interrupted."""
    from kiln.data import stream

    corpus = make_corpus(n_files=16)
    monkeypatch.setattr(stream, "ENCODE_BYTES", 200)
    monkeypatch.setattr(shards_mod, "SHARD_TOKENS", 400)
    whole = prepare(data_cfg(corpus, tmp_path / "whole"), log=quiet)
    assert len(whole.manifest["splits"]["train"]["shards"]) > 4

    closes, real_close = [], stream.ShardWriter._close_shard

    def close_then_die(self):
        real_close(self)
        closes.append(self.prefix)
        if len(closes) == 3:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(stream.ShardWriter, "_close_shard", close_then_die)
    cfg = data_cfg(corpus, tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, log=quiet)
    (partial,) = (tmp_path / "cut").glob("*.partial")
    progress = json.loads((partial / "progress.json").read_text())
    assert len(progress["train"]["shards"]) + len(progress["val"]["shards"]) == 2  # the third died before its record
    finished = {s["file"]: (partial / s["file"]).stat().st_mtime_ns for s in progress["train"]["shards"]}

    monkeypatch.setattr(stream.ShardWriter, "_close_shard", real_close)
    monkeypatch.setattr(shards_mod, "train_tokenizer", lambda *a, **k: pytest.fail("the tokenizer was trained again"))
    said: list[str] = []
    resumed = prepare(cfg, log=said.append)
    assert any("resuming an interrupted prepare" in line for line in said)
    assert not partial.exists() and not list((tmp_path / "cut").glob("*.lock"))
    assert {f: (resumed.path / f).stat().st_mtime_ns for f in finished} == finished  # kept, not rewritten
    assert _stream(resumed) == _stream(whole)
    strip = ("seconds",)
    assert {k: v for k, v in resumed.manifest.items() if k not in strip} == {
        k: v for k, v in whole.manifest.items() if k not in strip
    }
