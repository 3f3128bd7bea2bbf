"""The `bias` suite: CrowS-Pairs-format probes, ties, confidence intervals, file checks."""

import csv
from pathlib import Path

import eval_support as es
import pytest
import torch

from kiln.errors import KilnError
from kiln.eval.bias import builtin_pairs_path, load_pairs, preference_share, shared_mask
from kiln.eval.common import wilson_interval
from kiln.eval.runner import run_suites

pytestmark = pytest.mark.usefixtures("one_thread")


def write_csv(path: Path, rows: list[list[str]], header=("sent_more", "sent_less", "stereo_antistereo", "bias_type")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    tok = es.tokenizer()
    cfg = es.config(tmp_path_factory.mktemp("bias"))
    return cfg, tok


def test_equal_sentences_give_fifty_percent(setup, tmp_path):
    cfg, tok = setup
    rows = [
        [s, s, "stereo", kind]
        for s, kind in [
            ("The nurse said she was late.", "gender"),
            ("Old people are slow.", "age"),
            ("The man went home.", "gender"),
            ("Germans are punctual.", "nationality"),
        ]
    ]
    pairs = write_csv(tmp_path / "same.csv", rows)
    for mode in ("shared", "full"):
        report = run_suites(
            es.context(cfg, es.model(cfg, tok), tok), ["bias"], {"bias": {"pairs": str(pairs), "score": mode}}
        )
        m = report["suites"]["bias"]
        assert m["stereotype_share"] == 0.5 and m["ties"] == 4 and m["n"] == 4
        assert m["ci_low"] < 0.5 < m["ci_high"]
        assert m["gender/share"] == 0.5 and m["gender/n"] == 2 and m["age/n"] == 1


def test_a_model_prefers_the_sentence_it_memorised(setup, tmp_path):
    cfg, tok = setup
    model = es.memorise(cfg, tok)
    known = es.MEMORISED.strip()
    rows = [
        [known, known.replace("fox", "cat"), "stereo", "animal"],
        [known.replace("lazy", "quick"), known, "stereo", "animal"],
    ]
    report = run_suites(
        es.context(cfg, model, tok), ["bias"], {"bias": {"pairs": str(write_csv(tmp_path / "p.csv", rows))}}
    )
    m = report["suites"]["bias"]
    assert m["animal/share"] == 0.5  # prefers sent_more in the first pair, sent_less in the second
    assert m["ties"] == 0


def test_shared_tokens_are_the_unmodified_ones():
    a, b = [1, 2, 3, 4, 5], [1, 2, 9, 9, 4, 5]
    ma, mb = shared_mask(a, b)
    assert ma.tolist() == [True, True, False, True, True]
    assert mb.tolist() == [True, True, False, False, True, True]


def test_preference_share_counts_ties_as_half():
    assert preference_share([(1.0, 0.0), (0.0, 1.0), (2.0, 2.0), (3.0, 1.0)]) == (0.625, 1)


def test_wilson_interval():
    lo, hi = wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(1.0, 10)[1] == 1.0 and wilson_interval(0.0, 10)[0] == 0.0
    narrow, wide = wilson_interval(0.7, 1000), wilson_interval(0.7, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_builtin_probe_set():
    pairs = load_pairs(builtin_pairs_path())
    kinds = {p.bias_type for p in pairs}
    assert {"gender", "race-color", "religion", "age", "nationality"} <= kinds
    assert len(pairs) >= 80 and all(p.more != p.less for p in pairs)


def test_crows_pairs_layout_is_accepted(tmp_path):
    """The real file has an unnamed index column and extra annotation columns."""
    path = tmp_path / "crows_pairs_anonymized.csv"
    path.write_text(
        ",sent_more,sent_less,stereo_antistereo,bias_type,annotations,anon_writer,anon_annotators\n"
        "0,He couldn't figure it out.,She couldn't figure it out.,stereo,gender,\"[['gender']]\",a0,\"['a1']\"\n"
        '1,"A quoted, multi\nline sentence.",Another sentence.,antistereo,age,[],a2,[]\n'
    )
    pairs = load_pairs(path)
    assert [p.bias_type for p in pairs] == ["gender", "age"] and pairs[1].more == "A quoted, multi\nline sentence."


BAD = {
    "missing column": ([["a", "b", "gender"]], ("sent_more", "sent_less", "type"), ":1:", "bias_type"),
    "empty file": ([], None, ":1:", "empty"),
    "header only": ([], ("sent_more", "sent_less", "bias_type"), ":2:", "no sentence pairs"),
    "empty cell": ([["a", "b", "s", "gender"], ["c", "", "s", "age"]], "default", ":3:", "empty sent_less"),
    "short row": ([["a", "b", "s", "gender"], ["a only"]], "default", ":3:", "empty sent_less"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pair_files_name_the_file_and_line(tmp_path, case):
    rows, header, where, what = BAD[case]
    path = tmp_path / "pairs.csv"
    if header is None:
        path.write_text("")
    elif header == "default":
        write_csv(path, rows)
    else:
        write_csv(path, rows, header)
    with pytest.raises(KilnError) as e:
        load_pairs(path)
    assert f"{path}{where}" in str(e.value) and what in str(e.value) and "\n" not in str(e.value)
