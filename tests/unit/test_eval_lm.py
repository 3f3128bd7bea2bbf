"""The `lm` suite (loss, top-1/top-5, bits per byte; masked metrics for encoders) and the
log-likelihood helpers the likelihood suites share."""

import math
from pathlib import Path

import eval_support as es
import numpy as np
import pytest
import torch

from kiln.data.loader import TokenWindows, eval_windows
from kiln.eval.common import token_byte_lengths, token_logprobs
from kiln.eval.lm import evaluate_lm
from kiln.eval.runner import run_suites
from kiln.objectives import build_objective

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from conftest import write_corpus

    from kiln.data.shards import prepare

    tmp = tmp_path_factory.mktemp("lm")
    write_corpus(tmp / "corpus", n_files=12)
    (tmp / "corpus" / "unicode.txt").write_text("naïve café — 東京 🙂 déjà vu\n" * 20)
    cfg = es.config(tmp, "data.val_fraction=0.3")
    return tmp, prepare(cfg.data, log=lambda *a: None)


def test_byte_lengths_add_up_to_the_text():
    tok = es.tokenizer(["naïve café — 東京 🙂 and ascii words " * 3])
    lengths = token_byte_lengths(tok)
    for text in ["naïve café — 東京 🙂", "plain ascii, with punctuation!\n\tand tabs", "🙂🙂 mixed 東"]:
        ids = tok.encode(text)
        assert lengths[ids].sum() == len(text.encode("utf-8"))
    assert all(lengths[i] == 0 for i in tok.special_ids)


def test_lm_suite_matches_the_trainer_metrics(prepared):
    tmp, data = prepared
    cfg = es.config(tmp, "data.val_fraction=0.3")
    tok = data.tokenizer
    model = es.model(cfg, tok)
    m = run_suites(es.context(cfg, model, tok, prepared=data), ["lm"])["suites"]["lm"]
    windows = eval_windows(TokenWindows(data.split("val"), cfg.model.seq_len), cfg.eval.batches * cfg.global_batch)
    ref = evaluate_lm(model, windows, build_objective(cfg, tok, tok.vocab_size), 8, torch.device("cpu"))
    assert m["loss"] == pytest.approx(ref["val_loss"], rel=1e-6) and m["tokens"] == ref["val_tokens"]
    assert m["ppl"] == pytest.approx(math.exp(m["loss"]))
    assert 0 <= m["acc"] <= m["top5_acc"] <= 1
    targets = windows[:, 1:].numpy()
    assert m["bytes"] == token_byte_lengths(tok)[targets].sum()
    assert m["bits_per_byte"] == pytest.approx(m["loss"] * m["tokens"] / (math.log(2) * m["bytes"]))


def test_lm_suite_on_an_encoder_reports_masked_metrics(prepared):
    tmp, data = prepared
    cfg = es.config(tmp, "data.val_fraction=0.3", "model.family=encoder", "train.objective=masked")
    tok = data.tokenizer
    m = run_suites(es.context(cfg, es.model(cfg, tok), tok, prepared=data), ["lm"])["suites"]["lm"]
    assert {"masked_loss", "masked_acc", "masked_top5_acc", "bits_per_byte", "masked_tokens"} <= set(m)
    assert 0 <= m["masked_acc"] <= m["masked_top5_acc"] <= 1 and m["masked_tokens"] > 0
    assert m["masked_loss"] == pytest.approx(math.log(tok.vocab_size), rel=0.2)  # untrained: near uniform


def test_causal_logprobs_match_a_direct_computation():
    tok = es.tokenizer()
    cfg = es.config(Path("/unused"))
    model = es.model(cfg, tok)
    ctx = es.context(cfg, model, tok)
    items = [
        ([tok.eos_id], tok.encode("the quick brown fox")),
        ([tok.eos_id] + tok.encode("the"), tok.encode(" cat")),
        ([tok.eos_id] * 40, tok.encode("over the lazy dog")),
    ]  # context longer than the window: cut
    got = token_logprobs(ctx, items)
    for (c, x), lp in zip(items, got):
        seq = (c + x)[-(cfg.model.seq_len + 1) :]
        with torch.no_grad():
            logits = model(torch.tensor([seq[:-1]]))[0, :, : tok.vocab_size].log_softmax(-1)
        want = logits[torch.arange(len(seq) - 1), torch.tensor(seq[1:])][-len(x) :]
        assert np.allclose(lp, want.numpy(), atol=1e-5)


def test_pseudo_logprobs_mask_one_token_at_a_time():
    tok = es.tokenizer()
    cfg = es.config(Path("/unused"), "model.family=encoder", "train.objective=masked")
    model = es.model(cfg, tok)
    ctx = es.context(cfg, model, tok)
    c, x = [tok.eos_id], tok.encode("the quick brown")
    (lp,) = token_logprobs(ctx, [(c, x)])
    assert lp.shape == (len(x),)
    seq = c + x
    for j in range(len(x)):
        masked = list(seq)
        masked[1 + j] = tok.mask_id
        with torch.no_grad():
            logits = model(torch.tensor([masked]))[0, 1 + j, : tok.vocab_size].log_softmax(-1)
        assert lp[j] == pytest.approx(float(logits[seq[1 + j]]), abs=1e-5)
