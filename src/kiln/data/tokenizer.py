"""Byte-level BPE tokenizer (HF `tokenizers`, trained in Rust) and the special tokens.

The special tokens are defined here and only here; they take ids 0..4 in every tokenizer Kiln
trains, and a loaded `tokenizer.json` must contain them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kiln.errors import DataError

BOS, EOS, PAD, MASK, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>", "<|unk|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, MASK, UNK)


class KilnTokenizer:
    """A thin wrapper that knows the special-token ids and the file's hash."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise DataError(f"the tokenizer lacks the special tokens {', '.join(missing)}; "
                            "train one with Kiln (leave data.tokenizer empty) or add them")
        self.bos_id, self.eos_id, self.pad_id, self.mask_id, self.unk_id = (
            tok.token_to_id(t) for t in SPECIAL_TOKENS)
        self.special_ids = frozenset((self.bos_id, self.eos_id, self.pad_id, self.mask_id, self.unk_id))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def to_json(self) -> str:
        return self.tok.to_str()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    def word_starts(self, ids: list[int]) -> list[bool]:
        """Whether each token begins a new word (byte-level BPE marks a leading space with 'Ġ')."""
        out = []
        for i in ids:
            piece = self.tok.id_to_token(i) or ""
            out.append(i in self.special_ids or piece.startswith("Ġ") or piece.startswith("Ċ")
                       or not piece[:1].isalnum())
        return out


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None) -> KilnTokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return KilnTokenizer(tok)


def load_tokenizer(path: str | Path) -> KilnTokenizer:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.tokenizer: '{path}' does not exist; give a tokenizer.json or leave it empty to train one")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a plain Exception for malformed files
        raise DataError(f"data.tokenizer: '{path}' is not a valid tokenizer.json ({e})") from None
    return KilnTokenizer(tok)


def tokenizer_from_json(text: str) -> KilnTokenizer:
    return KilnTokenizer(Tokenizer.from_str(text))
