import pytest

from kiln.data.tokenizer import SPECIAL_TOKENS, KilnTokenizer, load_tokenizer, tokenizer_from_json, train_tokenizer
from kiln.errors import DataError

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "import os\nprint(os.getcwd())\n",
    "café ünïcode — ✓ 日本語",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(TEXTS), vocab_size=320)


def test_special_tokens_take_ids_0_to_4_in_order(tok):
    assert SPECIAL_TOKENS == ("<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>", "<|unk|>")
    assert [tok.tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id, tok.unk_id) == (0, 1, 2, 3, 4)


def test_vocab_size_is_honoured(tok):
    assert 5 + 256 < tok.vocab_size <= 320


@pytest.mark.parametrize("text", TEXTS[:4] + ["", "  leading spaces", "\ttabs\n\n", "emoji 🙂 never seen"])
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(5 <= i < tok.vocab_size for i in ids)  # byte-level: no unknowns, no specials
    assert tok.decode(ids) == text


def test_decode_skips_special_tokens(tok):
    ids = tok.encode("abc")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "abc"


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(TEXTS[:4]) == [tok.encode(t) for t in TEXTS[:4]]


def test_bpe_merges_frequent_text(tok):
    assert len(tok.encode("return a + b")) < len(b"return a + b")


def test_save_and_load(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = load_tokenizer(path)
    assert loaded.sha256 == tok.sha256
    assert loaded.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    assert tokenizer_from_json(path.read_text()).sha256 == tok.sha256


def test_load_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "none.json")


def test_load_malformed_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not a tokenizer")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(p)


def test_tokenizer_without_special_tokens_is_refused():
    from tokenizers import Tokenizer, models

    with pytest.raises(DataError, match="lacks the special tokens"):
        KilnTokenizer(Tokenizer(models.BPE()))


def test_training_is_deterministic():
    a = train_tokenizer(iter(TEXTS), vocab_size=300)
    b = train_tokenizer(iter(TEXTS), vocab_size=300)
    assert a.sha256 == b.sha256
