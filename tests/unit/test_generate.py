import math

import pytest
import torch
from conftest import init_model

from kiln.config import load_config
from kiln.eval.generate import filter_logits, generate
from kiln.model.registry import build_model

NEG = float("-inf")


def probs_of(*p):
    return torch.log(torch.tensor(p, dtype=torch.float32))


def test_top_k():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = filter_logits(logits, top_k=2)
    assert out.tolist() == [NEG, 5.0, NEG, 4.0, NEG]
    assert torch.equal(filter_logits(logits, top_k=0), logits)
    assert torch.equal(filter_logits(logits, top_k=5), logits)
    assert torch.equal(filter_logits(logits, top_k=99), logits)


def test_top_k_batched_rows():
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    assert filter_logits(logits, top_k=1).tolist() == [[NEG, NEG, 3.0], [3.0, NEG, NEG]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = probs_of(0.1, 0.5, 0.15, 0.25)  # sorted: 0.5, 0.25, 0.15, 0.1
    keep = lambda p: torch.isfinite(filter_logits(logits, top_p=p)).tolist()  # noqa: E731
    assert keep(0.4) == [False, True, False, False]
    assert keep(0.5) == [False, True, False, False]
    assert keep(0.6) == [False, True, False, True]  # 0.5 < 0.6: the 0.25 token crosses it
    assert keep(0.75) == [False, True, False, True]
    assert keep(0.8) == [False, True, True, True]
    assert keep(0.95) == [True, True, True, True]
    assert keep(1.0) == [True, True, True, True]
    kept = filter_logits(logits, top_p=0.6)
    assert kept[1] == logits[1] and kept[3] == logits[3]  # surviving logits are unchanged, in place
    renorm = kept.softmax(-1)
    assert renorm[1].item() == pytest.approx(0.5 / 0.75) and renorm[3].item() == pytest.approx(0.25 / 0.75)


def test_top_k_then_top_p():
    logits = probs_of(0.4, 0.3, 0.2, 0.1)
    out = filter_logits(logits, top_k=3, top_p=0.5)  # top-3 renormalised: 0.444, 0.333, 0.222
    assert torch.isfinite(out).tolist() == [True, True, False, False]


def test_top_p_batched():
    logits = torch.stack([probs_of(0.7, 0.2, 0.1), probs_of(0.1, 0.2, 0.7)])
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False], [False, False, True]]


@pytest.fixture(scope="module")
def model():
    cfg = load_config(
        overrides=["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.seq_len=16", "model.pos=learned"]
    ).model
    return init_model(build_model(cfg, 300), cfg, 0)


def test_greedy_is_deterministic_and_follows_argmax(model):
    prompt = torch.tensor([10, 20, 30])
    model.train()
    a = generate(model, prompt, 12, context=16, temperature=0)
    b = generate(model, prompt, 12, context=16, temperature=0)
    assert torch.equal(a, b)
    assert a.shape == (15,) and torch.equal(a[:3], prompt)
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        for i in range(3, 15):
            assert a[i] == model(a[max(0, i - 16) : i][None])[0, -1].argmax()


def test_generation_beyond_the_context_window(model):
    out = generate(model, torch.tensor([1]), 40, context=16, temperature=0)
    assert out.shape == (41,)  # learned positions: only the last 16 tokens are fed


def test_vocab_size_excludes_padding_rows(model):
    with torch.no_grad():
        model.tok_emb.weight[300:] = 10.0  # make the padding rows irresistible
    try:
        out = generate(model, torch.tensor([5, 6]), 10, context=16, temperature=0, vocab_size=300)
        assert out.max() < 300
        out = generate(
            model,
            torch.tensor([5, 6]),
            10,
            context=16,
            temperature=1.0,
            top_k=5,
            vocab_size=300,
            generator=torch.Generator().manual_seed(0),
        )
        assert out.max() < 300
    finally:
        with torch.no_grad():
            model.tok_emb.weight[300:] = 0.0


def test_sampling_is_seeded(model):
    g = lambda: torch.Generator().manual_seed(42)  # noqa: E731
    a = generate(model, torch.tensor([3]), 10, 16, temperature=1.0, top_k=50, generator=g())
    b = generate(model, torch.tensor([3]), 10, 16, temperature=1.0, top_k=50, generator=g())
    assert torch.equal(a, b)


def test_stop_id(model):
    greedy = generate(model, torch.tensor([1, 2]), 8, 16, temperature=0)
    first = int(greedy[2])
    stopped = generate(model, torch.tensor([1, 2]), 8, 16, temperature=0, stop_id=first)
    assert stopped.tolist() == [1, 2, first]


def test_evaluate_lm_on_a_uniform_model():
    """A model that outputs constant logits has loss log(V), perplexity V."""
    from kiln.data.tokenizer import train_tokenizer
    from kiln.eval.lm import evaluate_lm
    from kiln.objectives import Causal

    class Uniform(torch.nn.Module):
        def forward(self, tokens):
            return torch.zeros(*tokens.shape, 64)

    tok = train_tokenizer(["a b c"] * 3, vocab_size=270)
    windows = torch.randint(0, 64, (5, 9))
    m = evaluate_lm(Uniform(), windows, Causal(tok, 64), batch_size=2, device=torch.device("cpu"))
    assert m["val_loss"] == pytest.approx(math.log(64))
    assert m["val_ppl"] == pytest.approx(64.0)
    assert m["val_tokens"] == 5 * 8
    expected_acc = (windows[:, 1:] == 0).float().mean().item()  # argmax of equal logits is id 0
    assert m["val_acc"] == pytest.approx(expected_acc)


@pytest.mark.parametrize("top_p", [0.0, 1e-9])
def test_tiny_top_p_keeps_the_most_likely_token(top_p):
    """The nucleus is never empty: an empty one makes softmax NaN and multinomial raise (`kiln sample --top-p 0`)."""
    logits = probs_of(0.1, 0.6, 0.3)
    assert torch.isfinite(filter_logits(logits, top_p=top_p)).tolist() == [False, True, False]
