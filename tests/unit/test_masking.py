"""Masked-LM batches: BERT's 15% / 80-10-10 statistics, specials, determinism, rank slices,
whole-word masking and the tokenizer's word boundaries; masked evaluation metrics; config errors."""

import numpy as np
import pytest
import torch
from torch import nn

from kiln.config import load_config
from kiln.data.tokenizer import train_tokenizer
from kiln.errors import ConfigError
from kiln.eval.lm import evaluate_lm
from kiln.objectives import EVAL_STEP, IGNORE, OBJECTIVES, Masked, build_objective

TEXTS = [
    "def add(first, second):\n    return first + second  # the sum\n",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "import os\nprint(os.getcwd(), 1234)\n\tvalue = self.items[0]\n",
    "café naïve résumé: déjà vu x1 = y_2; don't stop",
] * 30


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(TEXTS), vocab_size=300)  # few merges: words of several pieces


def masked(tok, *overrides):
    cfg = load_config(overrides=["model.family=encoder", "train.objective=masked", *overrides])
    return build_objective(cfg, tok, tok.vocab_size)


def random_windows(tok, rows, length, seed=0, special_rate=0.05):
    """Uniform non-special ids with a sprinkling of special tokens."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(5, tok.vocab_size, (rows, length), generator=g)
    specials = torch.tensor(sorted(tok.special_ids))
    where = torch.rand(rows, length, generator=g) < special_rate
    return torch.where(where, specials[torch.randint(len(specials), (rows, length), generator=g)], w)


def text_windows(tok, rows, length):
    ids = np.array([i for t in TEXTS for i in (*tok.encode(t), tok.eos_id)])
    n = rows * (length - 1)
    ids = np.resize(ids, n + 1)
    return torch.from_numpy(np.stack([ids[r * (length - 1) : (r + 1) * (length - 1) + 1] for r in range(rows)]))


def test_registered_for_the_encoder_family(tok):
    assert OBJECTIVES["masked"] is Masked and Masked.causal is False  # trains a bidirectional family
    obj = masked(tok)
    assert (obj.mask.rate, obj.mask.replace, obj.mask.random, obj.mask.keep) == (0.15, 0.8, 0.1, 0.1)


def test_inputs_are_the_first_seq_len_tokens_and_targets_the_selected_originals(tok):
    w = random_windows(tok, 4, 65)
    b = masked(tok).make_batch(w, step=3, seed=0)
    tokens = w[:, :64]
    assert b.inputs.shape == b.targets.shape == (4, 64)
    sel = b.targets != IGNORE
    assert torch.equal(b.targets[sel], tokens[sel])
    assert torch.equal(b.inputs[~sel], tokens[~sel])  # unselected tokens pass through untouched


def test_selection_rate_and_80_10_10_split(tok):
    obj = masked(tok)
    special = torch.tensor(sorted(tok.special_ids))
    n_candidates = sel_total = to_mask = to_random = kept = 0
    for step in range(6):
        w = random_windows(tok, 64, 257, seed=step)
        b = obj.make_batch(w, step=step, seed=7)
        tokens = w[:, :-1]
        sel = b.targets != IGNORE
        n_candidates += (~torch.isin(tokens, special)).sum().item()
        sel_total += sel.sum().item()
        to_mask += (sel & (b.inputs == tok.mask_id)).sum().item()
        kept += (sel & (b.inputs == tokens)).sum().item()
        to_random += (sel & (b.inputs != tok.mask_id) & (b.inputs != tokens)).sum().item()
    rate = sel_total / n_candidates  # ~93k candidates: sd of the rate ~0.0012
    print(
        f"selected {rate:.4f}; of those mask {to_mask / sel_total:.4f} random {to_random / sel_total:.4f} "
        f"keep {kept / sel_total:.4f} over {sel_total} selections"
    )
    assert abs(rate - 0.15) < 0.006
    assert abs(to_mask / sel_total - 0.8) < 0.015
    assert abs(to_random / sel_total - 0.1) < 0.01  # a random draw equal to the original counts as kept (1/300)
    assert abs(kept / sel_total - 0.1) < 0.01


def test_configured_rates_are_honoured(tok):
    obj = masked(tok, "mask.rate=0.4", "mask.replace=0.5", "mask.random=0.5", "mask.keep=0.0")
    w = random_windows(tok, 64, 257, special_rate=0.0)
    b = obj.make_batch(w, step=0, seed=0)
    sel = b.targets != IGNORE
    assert abs(sel.float().mean().item() - 0.4) < 0.02
    assert abs((b.inputs[sel] == tok.mask_id).float().mean().item() - 0.5) < 0.03


def test_special_tokens_are_never_selected_nor_drawn_as_random_tokens(tok):
    obj = masked(tok, "mask.rate=0.9", "mask.replace=0.0", "mask.random=1.0", "mask.keep=0.0")
    special = torch.tensor(sorted(tok.special_ids))
    w = random_windows(tok, 32, 129, special_rate=0.3)
    b = obj.make_batch(w, step=1, seed=1)
    tokens = w[:, :-1]
    is_special = torch.isin(tokens, special)
    assert is_special.sum() > 500
    assert (b.targets[is_special] == IGNORE).all()
    assert torch.equal(b.inputs[is_special], tokens[is_special])
    sel = b.targets != IGNORE
    assert sel.sum() > 1000
    assert not torch.isin(b.inputs[sel], special).any()  # random replacements are ordinary tokens
    assert (b.inputs[sel] < tok.vocab_size).all()


def test_masks_are_a_function_of_seed_and_step(tok):
    obj = masked(tok)
    w = random_windows(tok, 8, 129)
    a, again = obj.make_batch(w, step=5, seed=3), obj.make_batch(w.clone(), step=5, seed=3)
    assert torch.equal(a.inputs, again.inputs) and torch.equal(a.targets, again.targets)
    assert not torch.equal(a.targets, obj.make_batch(w, step=6, seed=3).targets)  # dynamic: new masks each step
    assert not torch.equal(a.targets, obj.make_batch(w, step=5, seed=4).targets)
    assert not torch.equal(a.targets, obj.make_batch(w, step=EVAL_STEP, seed=3).targets)
    assert not torch.equal(a.targets[0], a.targets[1])  # each window of a batch draws its own


@pytest.mark.parametrize("whole_word", [False, True])
@pytest.mark.parametrize("world", [2, 4])
def test_rank_slices_reproduce_the_single_process_batch(tok, world, whole_word):
    obj = masked(tok, f"mask.whole_word={str(whole_word).lower()}")
    w = text_windows(tok, 8, 65)
    full = obj.make_batch(w, step=11, seed=2)
    local = 8 // world
    parts = [
        obj.make_batch(w[r * local : (r + 1) * local], step=11, seed=2, first_index=r * local) for r in range(world)
    ]
    assert torch.equal(torch.cat([p.inputs for p in parts]), full.inputs)
    assert torch.equal(torch.cat([p.targets for p in parts]), full.targets)


def word_ids(tok, tokens):
    return np.cumsum(tok.word_start_mask(tokens.numpy()), axis=-1)


def test_whole_word_masking_selects_every_piece_of_a_word(tok):
    w = text_windows(tok, 32, 129)
    tokens = w[:, :-1]
    special = torch.isin(tokens, torch.tensor(sorted(tok.special_ids)))
    words = word_ids(tok, tokens)
    multi_piece_words = 0
    for whole_word in (True, False):
        b = masked(tok, f"mask.whole_word={str(whole_word).lower()}").make_batch(w, step=0, seed=0)
        sel = (b.targets != IGNORE).numpy()
        partial = 0
        for r in range(len(tokens)):
            for word in np.unique(words[r]):
                in_word = (words[r] == word) & ~special[r].numpy()
                if in_word.sum() > 1:
                    multi_piece_words += whole_word
                    partial += 0 < sel[r][in_word].sum() < in_word.sum()
        if whole_word:
            assert partial == 0
            rate = sel.sum() / (~special).sum().item()
            assert 0.11 < rate < 0.19, rate
        else:
            assert partial > 0  # the check above can fail: token-level masking splits words
    assert multi_piece_words > 200


# --------------------------------------------------------------------------- word boundaries


def pretoken_starts(tok, text):
    """The truth: tokens that begin a pre-token of the tokenizer's own byte-level pre-tokenizer."""
    enc = tok.tok.encode(text)
    starts = {s for _, (s, _) in tok.tok.pre_tokenizer.pre_tokenize_str(text)}
    out, seen = [], set()
    for s, _ in enc.offsets:
        out.append(s in starts and s not in seen)
        seen.add(s)
    return out


@pytest.mark.parametrize(
    "text",
    [
        TEXTS[0],
        TEXTS[2],
        TEXTS[3],
        "The quick brown fox, again!",
        "a  b\t\tc \n d\n\n\ne 12ab(3)",
        " x = 1\r\n",
        "foo(x)):\n    return self.value\n\n\n    # done",
        "naïve café — déjà",
        "don't 'quote' \"x\"",
    ],
)
def test_word_starts_match_the_byte_level_pretokenizer(tok, text):
    ids = tok.encode(text)
    assert tok.word_starts(ids) == pretoken_starts(tok, text)


def test_word_starts_by_example(tok):
    ids = tok.encode("foo(x)")
    pieces = [tok.tok.id_to_token(i) for i in ids]
    starts = dict(zip(pieces, tok.word_starts(ids)))
    assert starts["("] and starts["x"] and starts[")"]  # punctuation and what follows it begin words
    ids = [tok.eos_id, *tok.encode("return"), tok.eos_id, tok.bos_id, *tok.encode(" return")]
    starts = tok.word_starts(ids)
    assert starts[0] and starts[1] and starts[-len(tok.encode(" return")) - 1]  # specials, and after one
    assert tok.word_starts([]) == []


def test_word_start_mask_is_row_wise(tok):
    w = text_windows(tok, 4, 33).numpy()
    mask = tok.word_start_mask(w)
    assert mask.shape == w.shape and mask[:, 0].all()
    for row in range(4):
        assert mask[row].tolist() == tok.word_starts(w[row].tolist())


# --------------------------------------------------------------------------- evaluation metrics


class Constant(nn.Module):
    """Predicts token `k` everywhere."""

    def __init__(self, vocab, k):
        super().__init__()
        self.vocab, self.k = vocab, k

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab)
        logits[..., self.k] = 1.0
        return logits


def test_masked_evaluation_reports_masked_accuracy_and_the_majority_baseline(tok):
    obj = masked(tok)
    w = text_windows(tok, 12, 65)
    targets = torch.cat([obj.make_batch(w[i : i + 5], EVAL_STEP, 0, first_index=i).targets for i in range(0, 12, 5)])
    picked = targets[targets != IGNORE]
    counts = torch.bincount(picked, minlength=tok.vocab_size)
    top = int(counts.argmax())
    m = evaluate_lm(Constant(tok.vocab_size, top), w, obj, 5, torch.device("cpu"), seed=0)
    print(f"majority baseline {m['majority_baseline']:.3f} over {m['val_tokens']} masked tokens")
    assert m["val_tokens"] == len(picked)
    assert m["majority_baseline"] == pytest.approx(counts.max().item() / len(picked))
    assert m["val_masked_acc"] == m["val_acc"] == pytest.approx(m["majority_baseline"])
    other = evaluate_lm(Constant(tok.vocab_size, top), w, obj, 3, torch.device("cpu"), seed=0)
    assert other == pytest.approx(m)  # the same masks whatever the evaluation batch size


def test_causal_evaluation_has_no_masked_metrics(tok):
    cfg = load_config()
    obj = build_objective(cfg, tok, tok.vocab_size)
    m = evaluate_lm(Constant(tok.vocab_size, 7), text_windows(tok, 2, 17), obj, 2, torch.device("cpu"))
    assert "val_masked_acc" not in m and "majority_baseline" not in m


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.objective=masked"], "train.objective = 'masked' needs model.family = 'encoder'"),
        (["model.family=encoder"], "train.objective = 'causal' needs model.family = 'decoder'"),
        (["mask.rate=0"], "mask.rate must be in (0, 1)"),
        (["mask.rate=1.5"], "mask.rate must be in (0, 1)"),
        (["mask.replace=0.9"], "mask.replace + mask.random + mask.keep must add up to 1"),
        (["mask.random=-0.1"], "mask.random must be in [0, 1]"),
        (["mask.whole_word=maybe"], "mask.whole_word must be true or false"),
        (["mask.ratio=0.2"], "unknown config key 'mask.ratio'"),
        (
            ["model.family=encoder", "train.objective=masked", "model.tie_embeddings=false", "parallel.tp=2"],
            "model.family = 'encoder' trains with data parallelism (FSDP) only",
        ),
    ],
)
def test_config_mistakes_are_one_line_errors(overrides, message):
    from kiln.train.resolve import check_training

    with pytest.raises(ConfigError) as err:
        check_training(load_config(overrides=overrides))  # as training checks a config
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_presets_load():
    for name, family in (("bert-tiny", "encoder"), ("bert-base", "encoder")):
        cfg = load_config(name)
        assert cfg.model.family == family and cfg.train.objective == "masked"
        assert cfg.mask.rate == 0.15
