"""Byte-level BPE tokenizer (HF `tokenizers`, trained in Rust) and the special tokens.

The special tokens are defined here and only here; they take ids 0..4 in every tokenizer Kiln
trains, and a loaded `tokenizer.json` must contain them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kiln.errors import DataError

BOS, EOS, PAD, MASK, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>", "<|unk|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, MASK, UNK)

# Character classes for word boundaries. The byte-level pre-tokenizer (GPT-2's regex) cuts text
# into runs of letters, of digits, of other symbols and of whitespace, and BPE never merges
# across those cuts; CONT is a UTF-8 continuation byte (inside a character, never a boundary).
SPACE, LETTER, DIGIT, SYMBOL, CONT, SPECIAL = range(6)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's reversible map from the printable characters of byte-level tokens back to bytes
    (printable ASCII and Latin-1 stand for themselves; the other bytes are shifted to U+0100...)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {chr(b): b for b in kept}, 0
    for b in range(256):
        if b not in kept:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


BYTE_OF_CHAR = _byte_level_alphabet()
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")


def _char_class(c: str) -> int:
    if c.isspace() or c == "\u2581":  # U+2581: SentencePiece's word-boundary marker
        return SPACE
    return LETTER if c.isalpha() else DIGIT if c.isdigit() else SYMBOL


def _utf8_length(lead: int) -> int:
    return 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


def _bytes_classes(data: bytes) -> tuple[int, int]:
    """(class of the first byte, class of the last character) of a byte-level token. A character
    cut by the token's edge counts as a letter, the common case beyond ASCII."""

    def whole(chunk: bytes) -> int:
        try:
            return _char_class(chunk.decode("utf-8"))
        except UnicodeDecodeError:
            return LETTER

    lead = data[0]
    if 0x80 <= lead < 0xC0:
        first = CONT
    else:
        n = _utf8_length(lead)
        first = whole(data[:n]) if len(data) >= n else LETTER
    i = len(data) - 1
    while i > 0 and 0x80 <= data[i] < 0xC0:
        i -= 1
    tail = data[i:]
    last = whole(tail) if len(tail) == _utf8_length(tail[0]) else LETTER
    return first, last


def _piece_classes(piece: str) -> tuple[int, int]:
    """(class of the first byte, class of the last character) of one token's text."""
    if not piece:
        return SYMBOL, SYMBOL
    if all(c in BYTE_OF_CHAR for c in piece):  # byte-level BPE (every tokenizer Kiln trains)
        return _bytes_classes(bytes(BYTE_OF_CHAR[c] for c in piece))
    if piece.startswith("##") and len(piece) > 2:  # WordPiece continuation
        return CONT, _char_class(piece[-1])
    return _char_class(piece[0]), _char_class(piece[-1])


ROLES = ("bos", "eos", "pad", "mask", "unk")
DEFAULT_ROLES: dict[str, str | None] = dict(zip(ROLES, SPECIAL_TOKENS))
REQUIRED_ROLES = ("bos", "eos", "pad", "unk")  # a causal model's tokenizer may have no mask token


def roles_path(path: Path) -> Path:
    """The sidecar naming the special tokens of a tokenizer whose strings are not Kiln's (an
    imported GPT-2's `<|endoftext|>` is bos, eos, pad and unk at once)."""
    return path.with_name(path.stem + ".roles.json")


class KilnTokenizer:
    """A thin wrapper that knows the special-token ids (by role) and the file's hash."""

    def __init__(self, tok: Tokenizer, roles: dict[str, str | None] | None = None):
        self.tok = tok
        self.roles = {**DEFAULT_ROLES, **roles} if roles else dict(DEFAULT_ROLES)
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown:
            raise DataError(f"tokenizer roles {unknown} are not special-token roles; roles: {', '.join(ROLES)}")
        missing = [
            f"{t} ({r})"
            for r, t in self.roles.items()
            if (t is None and r in REQUIRED_ROLES) or (t is not None and tok.token_to_id(t) is None)
        ]
        if missing:
            raise DataError(
                f"the tokenizer lacks the special tokens {', '.join(missing)}; "
                "train one with Kiln (leave data.tokenizer empty) or add them"
            )
        self.bos_id, self.eos_id, self.pad_id, self.mask_id, self.unk_id = (
            None if (t := self.roles[r]) is None else tok.token_to_id(t) for r in ROLES
        )
        self.special_ids = frozenset(
            i for i in (self.bos_id, self.eos_id, self.pad_id, self.mask_id, self.unk_id) if i is not None
        )
        self._tables: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def custom_roles(self) -> bool:
        return self.roles != DEFAULT_ROLES

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def to_json(self) -> str:
        return self.tok.to_str()

    @property
    def sha256(self) -> str:
        text = self.to_json() + (json.dumps(self.roles, sort_keys=True) if self.custom_roles else "")
        return hashlib.sha256(text.encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # the fast form skips character offsets: the same ids in less time and memory (tokenizers >= 0.21)
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [e.ids for e in encode(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, path: Path) -> None:
        path = Path(path)
        path.write_text(self.to_json())
        if self.custom_roles:
            roles_path(path).write_text(json.dumps(self.roles, indent=1) + "\n")

    def _word_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per id: the class of the token's first byte and of its last character, whether the token
        is all whitespace, and whether it is one space ('Ġ'); built once."""
        if self._tables is None:
            pieces = [self.tok.id_to_token(i) or "" for i in range(self.vocab_size)]
            classes = np.array([_piece_classes(p) for p in pieces], dtype=np.uint8).reshape(-1, 2)
            special = np.fromiter(self.special_ids, dtype=np.int64)
            classes[special] = SPECIAL
            blank = np.array([bool(p) and all(BYTE_OF_CHAR.get(c, 0) in _WHITESPACE for c in p) for p in pieces])
            self._tables = (
                classes[:, 0].copy(),
                classes[:, 1].copy(),
                blank & (classes[:, 0] != SPECIAL),
                np.array([p == "Ġ" for p in pieces]),
            )
        return self._tables

    def word_start_mask(self, ids: np.ndarray) -> np.ndarray:
        """Whether each token of `ids` (shape (..., T)) begins a word, along the last axis.

        A word is a pre-token of the byte-level BPE (GPT-2's regex), which BPE never merges across:
        a run of letters, of digits or of other symbols, with at most one leading space ('Ġfoo';
        '(' and 'x' of 'foo(x)'), or a run of whitespace, whose last character goes to the next word
        when that is a space ('ĊĠĠĠ' then 'Ġreturn'). So a token begins a word when it starts with
        whitespace or its first character is of another class than the previous token's last one,
        except a token inside a UTF-8 character, inside a whitespace run, or after the single space
        that leads its word. Special tokens are words of their own; position 0 begins a word.
        """
        first, last, blank, lone_space = self._word_tables()
        ids = np.asarray(ids, dtype=np.int64)
        f, is_blank = first[ids], blank[ids]
        prev = np.full_like(f, SPECIAL)  # class of the previous token's last character
        prev[..., 1:] = last[ids[..., :-1]]
        nxt = np.full_like(f, SPECIAL)  # class of the next token's first byte
        nxt[..., :-1] = f[..., 1:]
        after_lone_space = np.zeros_like(is_blank)
        after_lone_space[..., 1:] = lone_space[ids[..., :-1]]
        solid = (f == LETTER) | (f == DIGIT) | (f == SYMBOL)
        before_word = (nxt == LETTER) | (nxt == DIGIT) | (nxt == SYMBOL)
        inside_blank_run = is_blank & (prev == SPACE) & ~before_word
        joins_space = after_lone_space & solid
        start = (f == SPACE) | (f != prev)
        start &= (f != CONT) & ~inside_blank_run & ~joins_space
        return start | (f == SPECIAL) | (prev == SPECIAL)

    def word_starts(self, ids: Iterable[int]) -> list[bool]:
        """`word_start_mask` of one sequence, as a list."""
        ids = list(ids)
        return self.word_start_mask(np.array(ids, dtype=np.int64)).tolist() if ids else []


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
        raise DataError(
            f"data.tokenizer: '{path}' does not exist; give a tokenizer.json or leave it empty to train one"
        )
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a plain Exception for malformed files
        raise DataError(f"data.tokenizer: '{path}' is not a valid tokenizer.json ({e})") from None
    roles = None
    if roles_path(p).is_file():
        try:
            roles = json.loads(roles_path(p).read_text())
        except ValueError as e:
            raise DataError(
                f"{roles_path(p)} is not valid JSON ({e}); it names the tokenizer's special tokens"
            ) from None
    return KilnTokenizer(tok, roles)


def tokenizer_from_json(text: str, roles: dict[str, str | None] | None = None) -> KilnTokenizer:
    return KilnTokenizer(Tokenizer.from_str(text), roles)
