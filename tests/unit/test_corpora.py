import gzip
import json

import pytest

from kiln.config import DataConfig
from kiln.data.corpora import SkippedFile, read_texts, resolve_corpus
from kiln.errors import DataError


def texts_of(cfg: DataConfig) -> list[str]:
    out = []
    for f in resolve_corpus(cfg):
        out.extend(f.read())
    return out


def test_stdlib_corpus_is_not_empty():
    files = resolve_corpus(DataConfig(corpus="stdlib"))
    assert len(files) > 100
    names = {f.path.name for f in files}
    assert "os.py" in names
    assert all(f.path.suffix == ".py" for f in files)
    assert not any("site-packages" in f.path.parts or "test" in f.path.parts for f in files)
    first = next(iter(files[0].read()))
    assert isinstance(first, str) and first


@pytest.fixture
def mixed_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("plain text file")
    (d / "b.jsonl").write_text(json.dumps({"text": "jsonl one"}) + "\n\n" + json.dumps({"text": "jsonl two"}) + "\n")
    pq.write_table(pa.table({"text": ["parquet one", "parquet two", None, ""]}), d / "c.parquet")
    with gzip.open(d / "sub" / "d.txt.gz", "wt") as f:
        f.write("gzipped text")
    (d / "sub" / "e.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress((json.dumps({"text": "zstd jsonl"}) + "\n").encode())
    )
    (d / "f.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"zstd text"))
    (d / "ignored.csv").write_text("a,b\n1,2\n")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    return d


def test_directory_reads_every_supported_format(mixed_dir):
    files = resolve_corpus(DataConfig(corpus=str(mixed_dir)))
    assert [f.path.name for f in files] == ["a.txt", "b.jsonl", "c.parquet", "f.txt.zst", "d.txt.gz", "e.jsonl.zst"]
    assert texts_of(DataConfig(corpus=str(mixed_dir))) == [
        "plain text file",
        "jsonl one",
        "jsonl two",
        "parquet one",
        "parquet two",
        "zstd text",
        "gzipped text",
        "zstd jsonl",
    ]


def test_custom_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "r.jsonl").write_text(
        json.dumps({"body": "custom A", "text": "not me"}) + "\n" + json.dumps({"body": "custom B"}) + "\n"
    )
    pq.write_table(pa.table({"body": ["custom C"], "other": ["x"]}), tmp_path / "r.parquet")
    assert texts_of(DataConfig(corpus=str(tmp_path), text_field="body")) == ["custom A", "custom B", "custom C"]


def test_glob_and_comma_separated_specs(mixed_dir, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("other")
    files = resolve_corpus(DataConfig(corpus=f"{mixed_dir}/**/*.gz, {other}"))
    assert [f.path.name for f in files] == ["d.txt.gz", "other.txt"]
    files = resolve_corpus(DataConfig(corpus=f"{mixed_dir}/*.jsonl"))
    assert [f.path.name for f in files] == ["b.jsonl"]


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        resolve_corpus(DataConfig(corpus=f"{tmp_path}/*.txt"))


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="neither a registered corpus"):
        resolve_corpus(DataConfig(corpus=str(tmp_path / "nope")))


def test_directory_without_corpus_files(tmp_path):
    (tmp_path / "x.csv").write_text("1")
    with pytest.raises(DataError, match="holds no"):
        resolve_corpus(DataConfig(corpus=str(tmp_path)))


def test_unsupported_file_named_explicitly(tmp_path):
    (tmp_path / "x.csv").write_text("1")
    with pytest.raises(DataError, match="not a supported file"):
        resolve_corpus(DataConfig(corpus=str(tmp_path / "x.csv")))


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no text"}) + "\n")
    with pytest.raises(DataError, match=rf"{p}:2: no field 'text'; set data.text_field"):
        list(read_texts(p))


def test_jsonl_invalid_json_and_non_string(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=rf"{p}:3: not valid JSON"):
        list(read_texts(p))
    p.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=rf"{p}:1: field 'text' is not a string"):
        list(read_texts(p))


def test_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match="no column 'text' .*body"):
        list(read_texts(tmp_path / "t.parquet"))


def test_binary_and_non_utf8_files_are_skipped(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "broken.txt.gz").write_bytes(b"not really gzip")
    for name in ("bin.txt", "latin1.txt", "broken.txt.gz"):
        with pytest.raises(SkippedFile):
            list(read_texts(tmp_path / name))


def test_prepare_counts_skipped_files(tmp_path):
    from kiln.data.shards import prepare

    d = tmp_path / "c"
    d.mkdir()
    for i in range(6):
        (d / f"ok{i}.txt").write_text(f"document number {i} with some words in it. " * 10)
    (d / "bin.txt").write_bytes(b"\x00\x01\x02" * 10)
    (d / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10)
    messages = []
    data = prepare(DataConfig(corpus=str(d), vocab_size=300, cache_dir=str(tmp_path / "cache")), log=messages.append)
    assert data.manifest["skipped_files"] == 2
    assert data.manifest["corpus_files"] == 8
    assert data.manifest["splits"]["train"]["documents"] + data.manifest["splits"]["val"]["documents"] == 6
    assert any("skipped 2 file(s)" in m for m in messages)


def test_only_binary_files_is_a_data_error(tmp_path):
    from kiln.data.shards import prepare

    d = tmp_path / "c"
    d.mkdir()
    (d / "bin.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match=r"holds no text \(1 binary or non-UTF-8 file\(s\) skipped\)"):
        prepare(DataConfig(corpus=str(d), vocab_size=300, cache_dir=str(tmp_path / "cache")), log=lambda m: None)


@pytest.mark.parametrize("suffix", [".parquet.gz", ".parquet.zst"])
def test_compressed_parquet(tmp_path, suffix):
    """README: .parquet files may be plain or .gz/.zst like the others."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["first row", "second row"]}), buf)
    raw = buf.getvalue()
    data = gzip.compress(raw) if suffix.endswith(".gz") else zstandard.ZstdCompressor().compress(raw)
    (tmp_path / f"t{suffix}").write_bytes(data)
    assert list(read_texts(tmp_path / f"t{suffix}")) == ["first row", "second row"]
