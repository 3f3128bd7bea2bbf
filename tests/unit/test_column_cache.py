"""The columnar reader of JSONL logs (kiln.runfolder.columns) and its copy beside a long log
(kiln.runfolder.column_cache): the records read back as RunDir.read_jsonl reads them, whatever they
hold; the copy extended with only what was appended (never a line still being written),
started again when the log was replaced or rewritten, and kept in the user's cache folder when
the run folder is read-only. Plus the tail reader of `kiln runs` and the plots' thinning."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from kiln.runfolder import column_cache, columns, jsonl_tail
from kiln.runfolder.column_cache import read_in_memory, read_table
from kiln.runfolder.downsample import minmax
from kiln.runs.rundir import RunDir


def same(a, b) -> bool:
    """Equal records, NaN equal to NaN."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def line(step: int, **extra) -> str:
    return json.dumps({"step": step, "loss": 3.0 - step * 1e-3, "tokens": 64 * step, **extra}) + "\n"


ODD = [  # values a log may hold, each in its own record
    {"loss": math.nan},
    {"loss": math.inf, "grad_norm": -math.inf},
    {"flag": True, "off": False},
    {"phase": "warmup", "tags": ["a", 1], "cfg": {"x": None}, "none": None},
    {"big": 2**60, "neg": -(2**70)},
    {"late": 1.5},
    {},
]


@pytest.fixture
def log(tmp_path):
    return tmp_path / "run" / "metrics.jsonl"


def write(path: Path, text: str, mode: str = "w") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        f.write(text)


@pytest.mark.parametrize("chunk", [1 << 20, 97])  # the log read whole, or a few lines at a time
@pytest.mark.parametrize("cached", [True, False])
def test_a_table_holds_the_records_read_jsonl_reads(log, cached, chunk, monkeypatch):
    monkeypatch.setattr(column_cache, "CHUNK_BYTES", chunk)
    write(log, "".join(line(i, **ODD[i % len(ODD)]) for i in range(1, 60)) + line(60)[:-1])  # no final newline
    table = read_table(log, min_bytes=0) if cached else read_in_memory(log)
    records = RunDir.read_jsonl(log)
    assert len(records) == 60 and table.rows == 60  # a last line without its newline counts when whole
    assert same(table.records(), records)
    assert all(same(table.record(i), r) for i, r in enumerate(records))
    assert table.keys[:3] == ["step", "loss", "tokens"] and "late" in table.keys
    assert not table.present("late")[:4].any() and table.value("late", 0) is columns.MISSING
    # record i + 1 holds ODD[(i + 1) % 7]
    assert table.value("big", 3) == 2**60 and table.is_number("big")[3] and table.numbers("big")[3] == 2.0**60
    assert table.value("flag", 1) is True and not table.is_number("flag").any()
    assert table.is_number("loss")[6] and not table.finite("loss")[6]  # NaN: a number, not a finite one
    assert table.is_number("grad_norm")[0] and not table.finite("grad_norm")[0]
    assert table.value("phase", 2) == "warmup" and math.isnan(table.numbers("phase")[2])
    assert not table.present("anything").any() and table.numbers("anything").shape == (60,)
    with pytest.raises(ValueError):
        table.numbers("loss")[0] = 1.0  # shared by every reader: read-only
    assert (log.parent / ".metrics-cache").is_dir() == cached


def test_a_line_that_is_not_an_object_ends_the_log_as_read_jsonl_says(log):
    write(log, line(1) + line(2) + "garbage\n" + line(4))
    for table in (read_table(log, min_bytes=0), read_in_memory(log)):
        assert [r["step"] for r in table.records()] == [1, 2] == [r["step"] for r in RunDir.read_jsonl(log)]
    write(log, line(5), "a")
    assert read_table(log, min_bytes=0).rows == 2  # for good: what follows is never read


def test_the_copy_is_extended_with_what_was_appended_only(log, monkeypatch):
    parsed: list[int] = []
    parse = column_cache.parse_lines
    monkeypatch.setattr(column_cache, "parse_lines", lambda data: (parsed.append(len(data)), parse(data))[1])
    first = "".join(line(i) for i in range(1, 101))
    write(log, first)
    assert read_table(log, min_bytes=0).rows == 100 and sum(parsed) == len(first)
    # a run still appending: two whole lines and one half written
    more = line(101) + line(102, grad_norm=0.5)
    write(log, more + line(103)[:15], "a")
    parsed.clear()
    table = read_table(log, min_bytes=0)
    assert table.rows == 102 and sum(parsed) == len(more) + 15  # only the new bytes
    meta = json.loads((log.parent / ".metrics-cache" / "meta.json").read_text())
    assert meta["offset"] == len(first) + len(more) and meta["rows"] == 102
    assert list(table.present("grad_norm")) == [False] * 101 + [True]  # a key first seen late
    # the line completed, and a new key in a string value
    write(log, line(103)[15:] + line(104, phase="end"), "a")
    table = read_table(log, min_bytes=0)
    assert same(table.records(), RunDir.read_jsonl(log)) and table.value("phase", 103) == "end"
    assert read_table(log, min_bytes=0).record(-1)["step"] == 104  # nothing new: nothing parsed again


def test_a_replaced_or_rewritten_log_is_read_again(log):
    write(log, "".join(line(i) for i in range(1, 50)))
    assert read_table(log, min_bytes=0).rows == 49
    RunDir(log.parent).write_text("metrics.jsonl", "".join(line(i, loss=1.0) for i in range(1, 30)))  # truncate_after
    table = read_table(log, min_bytes=0)
    assert table.rows == 29 and set(table.numbers("loss")) == {1.0}
    with open(log, "w") as f:  # rewritten in place (same inode), longer than before
        f.write("".join(line(i, loss=2.0) for i in range(1, 40)))
    table = read_table(log, min_bytes=0)
    assert table.rows == 39 and set(table.numbers("loss")) == {2.0}
    leftovers = [p.name for p in (log.parent / ".metrics-cache").iterdir() if p.suffix in (".f8", ".k1")]
    assert len(leftovers) == 2 * len(table.keys)  # the earlier versions' columns are gone


def test_a_damaged_copy_is_read_again(log):
    write(log, "".join(line(i) for i in range(1, 50)))
    read_table(log, min_bytes=0)
    (log.parent / ".metrics-cache" / "meta.json").write_text("{not json")
    assert read_table(log, min_bytes=0).rows == 49


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_keeps_its_copy_in_the_user_cache(log, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    write(log, "".join(line(i) for i in range(1, 50)))
    log.parent.chmod(0o555)
    try:
        assert read_table(log, min_bytes=0).rows == 49
        assert not (log.parent / ".metrics-cache").exists()
        copies = list((tmp_path / "xdg" / "kiln" / "columns").iterdir())
        assert len(copies) == 1 and (copies[0] / "meta.json").is_file()
        log.chmod(0o644)
        write(log, line(50), "a")
        assert read_table(log, min_bytes=0).rows == 50  # extended there
    finally:
        log.parent.chmod(0o755)


def test_where_the_run_folder_is_not_writable_the_copy_goes_elsewhere_or_nowhere(log, tmp_path, monkeypatch):
    """As the read-only test, without needing to run as another user than root: the first place
    a copy could go cannot be created (a file stands where its parent folder should be)."""
    write(log, "".join(line(i) for i in range(1, 50)))
    blocked = tmp_path / "file"
    blocked.write_text("")
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setattr(column_cache, "cache_folders", lambda path, st: [blocked / "cache", elsewhere])
    assert read_table(log, min_bytes=0).rows == 49 and (elsewhere / "meta.json").is_file()
    monkeypatch.setattr(column_cache, "cache_folders", lambda path, st: [blocked / "cache"])
    assert same(read_table(log, min_bytes=0).records(), RunDir.read_jsonl(log))  # in memory


def test_short_logs_are_parsed_without_a_copy(log):
    write(log, line(1))
    assert read_table(log).rows == 1 and not (log.parent / ".metrics-cache").exists()
    assert read_table(log.parent / "missing.jsonl").rows == 0


def test_the_last_record_is_read_from_the_end(log, monkeypatch):
    monkeypatch.setattr(jsonl_tail, "BLOCK", 7)  # lines longer than a block
    assert jsonl_tail.last_record(log) is None
    write(log, line(1) + line(2, note="x" * 40))
    assert jsonl_tail.last_record(log) == RunDir.read_jsonl(log)[-1]
    write(log, '{"step": 3, "lo', "a")  # being written
    assert jsonl_tail.last_record(log)["step"] == 2
    write(log, 'ss": 1}\n\n', "a")
    assert jsonl_tail.last_record(log) == {"step": 3, "loss": 1} == RunDir.read_jsonl(log)[-1]
    write(log, "")
    assert jsonl_tail.last_record(log) is None


def test_thinned_curves_keep_spikes_gaps_and_ends():
    xs = np.arange(100_000, dtype=float)
    ys = np.sin(xs / 1000)
    ys[31_337], ys[70_000] = 50.0, math.nan
    tx, ty = minmax(xs, ys, 100)
    assert len(tx) <= 5 * 100 and tx[0] == 0 and tx[-1] == 99_999 and np.all(np.diff(tx) > 0)
    assert 50.0 in ty and 31_337 in tx and np.isnan(ty).sum() == 1
    assert np.nanmin(ty) == np.nanmin(ys)
    short = np.arange(10.0)
    assert minmax(short, short, 100)[0] is short  # nothing to thin
    back = np.concatenate([xs[:500], xs[:500]])  # x goes back: thinned by position
    assert len(minmax(back, np.ones(1000), 10)[0]) <= 50


def test_a_copy_in_a_read_only_folder_is_used_while_it_is_complete(log, tmp_path, monkeypatch):
    """A copy made while the folder was writable (simulated: no lock can be taken, as in a
    read-only folder) serves readers until the log grows; then the copy goes elsewhere."""
    import contextlib

    write(log, "".join(line(i) for i in range(1, 50)))
    read_table(log, min_bytes=0)
    monkeypatch.setattr(column_cache, "_locked", lambda folder: contextlib.nullcontext(False))
    elsewhere = tmp_path / "elsewhere"
    beside = log.parent / ".metrics-cache"
    monkeypatch.setattr(column_cache, "cache_folders", lambda path, st: [beside, elsewhere])
    assert read_table(log, min_bytes=0).rows == 49 and not elsewhere.exists()
    write(log, line(50), "a")
    assert read_table(log, min_bytes=0).rows == 50  # the read-only copy is behind: read without it
    assert json.loads((beside / "meta.json").read_text())["rows"] == 49
