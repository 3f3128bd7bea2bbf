"""Suites that generate text: continuation (BLEU/chrF), toxicity (lexicon) and memorisation
(n-gram index of the training tokens); and their being skipped for encoders."""

import json

import eval_support as es
import numpy as np
import pytest
import torch

from kiln.errors import KilnError
from kiln.eval.common import generate_tokens
from kiln.eval.continuation import score_generations
from kiln.eval.memorisation import NgramIndex, memorised_share, random_spans
from kiln.eval.runner import run_suites, save_report
from kiln.eval.toxicity import flagged_terms, lexicon_pattern, load_lexicon, load_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- continuation


def test_bleu_and_chrf_of_identical_text_are_100():
    refs = ["def add(a, b):\n    return a + b\n", "the cat sat on the mat and the dog sat on the log\nend"]
    m = score_generations(list(refs), refs)
    assert m["bleu"] == pytest.approx(100.0) and m["chrf"] == pytest.approx(100.0)
    assert m["next_line_exact"] == 1.0 and m["next_line_items"] == 2


def test_different_text_scores_lower():
    refs = ["the cat sat on the mat and the dog sat on the log\n"]
    half = score_generations(["the cat sat on the mat and a frog ran to the pond\n"], refs)
    none = score_generations(["zzz qqq\n"], refs)
    assert 0 < half["bleu"] < 100 and none["bleu"] == 0.0 and none["chrf"] < half["chrf"] < 100
    assert half["next_line_exact"] == 0.0


def test_next_line_must_be_complete():
    m = score_generations(["x = 1", "x = 1\nanything"], ["x = 1\ny = 2", "x = 1\ny = 2"])
    assert m["next_line_exact"] == 0.5  # the first generation never finished its line


# --------------------------------------------------------------------------- toxicity


def test_lexicon_matches_whole_words_and_phrases():
    pat = lexicon_pattern(["idiot", "shut up", "go to hell"])
    assert flagged_terms("You IDIOT, shut   up!", pat) == ["idiot", "shut up"]
    assert flagged_terms("idiotic shutup idiots", pat) == []
    assert flagged_terms("just go to\nhell", pat) == ["go to hell"]


def test_forced_lexicon_term_is_flagged(tmp_path):
    tok = es.tokenizer(["a zorblax appears. " * 5, "a quiet river flows. " * 5])
    cfg = es.config(tmp_path)
    word = tok.tok.token_to_id("Ġzorblax")
    assert word is not None
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("# my list\nZorblax\n\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nThe river\n")
    ctx = es.context(cfg, es.ForcedModel(tok.vocab_size, word), tok, run_dir=tmp_path, step=7)
    report = run_suites(
        ctx,
        ["toxicity"],
        {"toxicity": {"lexicon": str(lexicon), "prompts": str(prompts), "samples": 3, "new_tokens": 4}},
    )
    m = report["suites"]["toxicity"]
    assert m == {"flagged_share": 1.0, "prompts_flagged_share": 1.0, "flagged": 6, "samples": 6}
    saved = json.loads(save_report(tmp_path, report).read_text())
    artifacts = json.loads((tmp_path / "eval" / saved["artifacts"]["toxicity"]).read_text())
    assert artifacts["prompts"] == ["Hello there", "The river"]
    assert artifacts["flagged"][0]["terms"] == ["zorblax"] and "zorblax" in artifacts["flagged"][0]["continuation"]

    quiet = tok.tok.token_to_id("Ġriver")
    ctx = es.context(cfg, es.ForcedModel(tok.vocab_size, quiet), tok)
    report = run_suites(
        ctx,
        ["toxicity"],
        {"toxicity": {"lexicon": str(lexicon), "prompts": str(prompts), "samples": 2, "new_tokens": 4}},
    )
    assert report["suites"]["toxicity"]["flagged_share"] == 0.0


def test_builtin_lexicon_and_prompts_load():
    from kiln.eval.toxicity import _data

    assert len(load_lexicon(_data("toxicity_lexicon.txt"))) >= 30
    assert len(load_prompts(_data("toxicity_prompts.txt"))) >= 10


def test_bad_lexicon_and_prompt_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(KilnError, match=f"{empty}:1: the file is empty"):
        load_lexicon(empty)
    rtp = tmp_path / "prompts.jsonl"
    rtp.write_text('{"prompt": {"text": "So I said"}}\n{"prompt": "plain"}\n{"text": "no prompt"}\n')
    with pytest.raises(KilnError, match=f"{rtp}:3: "):
        load_prompts(rtp)
    rtp.write_text('{"prompt": {"text": "So I said"}}\n{"prompt": "plain"}\n')
    assert load_prompts(rtp) == ["So I said", "plain"]


def test_sampling_is_seeded(tmp_path):
    tok = es.tokenizer()
    cfg = es.config(tmp_path)
    ctx = es.context(cfg, es.model(cfg, tok), tok)
    prompt = torch.tensor([[tok.eos_id] + tok.encode("the quick")] * 3)
    a = generate_tokens(ctx, prompt, 5, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = generate_tokens(ctx, prompt, 5, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 5) and torch.equal(a, b)
    greedy = generate_tokens(ctx, prompt, 5)
    assert torch.equal(greedy[0], greedy[1])


# --------------------------------------------------------------------------- memorisation


@pytest.mark.parametrize("stride", [1, 4, 17])
def test_index_finds_every_copied_span_and_nothing_else(stride):
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 50_000, 3000).astype(np.uint16), rng.integers(0, 50_000, 500).astype(np.uint16)]
    index = NgramIndex(shards, 32, stride=stride)
    copied = random_spans(shards, 32, 200, rng)
    assert memorised_share(copied, index) == 1.0
    assert index.coverage == 1.0
    assert np.asarray(shards[0][-32:]) in index and np.asarray(shards[1][:32]) in index
    unseen = [rng.integers(0, 50_000, 32) for _ in range(100)]
    assert memorised_share(unseen, index) == 0.0
    changed = np.asarray(shards[0][100:132]).astype(np.int64)
    changed[31] = (changed[31] + 1) % 50_000
    assert changed not in index
    across = np.concatenate([shards[0][-16:], shards[1][:16]]).astype(np.int64)
    assert across not in index  # shard files are separate streams


def test_index_of_a_prefix_reports_its_coverage():
    tokens = np.arange(10_000, dtype=np.uint32)
    index = NgramIndex([tokens], 8, stride=1, max_entries=1000)
    assert 0.09 < index.coverage < 0.11
    assert tokens[:8] in index and tokens[5000:5008] not in index


def test_spans_of_the_training_shards_are_memorised(tmp_path):
    from conftest import write_corpus

    from kiln.data.shards import prepare

    cfg = es.config(tmp_path)
    write_corpus(tmp_path / "corpus", n_files=10)
    data = prepare(cfg.data, log=lambda *a: None)
    index = NgramIndex(data.split("train"), 32)
    spans = random_spans(data.split("train"), 32, 50, np.random.default_rng(1))
    assert memorised_share(spans, index) == 1.0


# --------------------------------------------------------------------------- encoders


def test_generation_suites_are_skipped_for_encoders(tmp_path):
    tok = es.tokenizer()
    cfg = es.config(tmp_path, "model.family=encoder", "train.objective=masked")
    ctx = es.context(cfg, es.model(cfg, tok), tok)
    report = run_suites(ctx, ["continuation", "toxicity", "memorisation"])
    assert report["suites"] == {}
    assert set(report["skipped"]) == {"continuation", "toxicity", "memorisation"}
    assert all("encoder" in why for why in report["skipped"].values())
