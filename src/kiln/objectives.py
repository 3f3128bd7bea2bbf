"""Training objectives: how a window of tokens becomes (inputs, targets, loss) for a model family.

An objective is a registered class; `train.objective` selects it, and its `causal` flag says which
kind of model family it trains (checked by `kiln.train.resolve` against the family's `ModelSpec.causal`).

Objectives that draw random numbers (masking) draw them per window from (seed, step, the window's
index in the global batch): a batch is then the same whether one process makes it or each
data-parallel rank makes its slice, and a resumed run redraws exactly what it drew before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from kiln.config import Config, MaskConfig
from kiln.data.tokenizer import KilnTokenizer
from kiln.errors import ConfigError

IGNORE = -100  # target id that contributes no loss
EVAL_STEP = -1  # the `step` evaluations pass: a random stream that no training step uses


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) token ids, IGNORE where no loss is taken
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # more (B, T, ...) model inputs, by keyword

    def rows(self, start: int, stop: int) -> Batch:
        return Batch(
            self.inputs[start:stop],
            self.targets[start:stop],
            {k: v[start:stop] for k, v in self.extras.items()},
        )

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`. To a GPU each host tensor is first copied into page-locked memory
        and then sent with non_blocking=True: the host goes on queueing the step's kernels while the
        copy runs (a copy from pageable memory blocks it), and the order on the stream is unchanged.
        PyTorch's pinned-memory allocator keeps the staging block until the copy has finished."""
        return Batch(
            to_device(self.inputs, device),
            to_device(self.targets, device),
            {k: to_device(v, device) for k, v in self.extras.items()},
        )


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: to a GPU through pinned memory, without blocking the host."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)  # the CPU (pinning needs CUDA), or already on a device
    if not (t.is_contiguous() and t.is_pinned()):
        # one host copy, into a contiguous pinned buffer (a strided source would be made
        # contiguous in pageable memory by the copy to the device, losing the pinning)
        t = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
    return t.to(device, non_blocking=True)


class Objective:
    name: ClassVar[str]
    causal: ClassVar[bool | None] = None  # True: needs a causal family; False: a bidirectional one; None: any
    masked: ClassVar[bool] = False  # predicts hidden input tokens: evaluation adds masked accuracy and a baseline
    family: ClassVar[str | None] = None  # the one model family it trains, when only one can (its inputs)

    def __init__(self, tokenizer: KilnTokenizer, vocab_size: int, cfg: Config | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cfg = cfg

    def make_batch(self, windows: torch.Tensor, step: int, seed: int, first_index: int = 0) -> Batch:
        """`windows` (B, seq_len + 1) are rows `first_index`... of the global batch of `step`
        (`EVAL_STEP` when evaluating); the result must depend on nothing else."""
        raise NotImplementedError

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy over non-ignored targets, in float32, over the tokenizer's vocabulary
        (the embedding's padding rows take no probability); the caller divides by the global count
        of predicted tokens so gradient accumulation and data parallelism agree."""
        logits = true_vocab(logits, self.vocab_size)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def true_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The logits of the tokenizer's `vocab_size` tokens: the model's vocabulary is padded to a
    multiple of 64, and the padding rows' logits (zeros after an import) must take no probability."""
    return logits[..., :vocab_size] if logits.shape[-1] > vocab_size else logits


def z_loss_sum(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Summed log(Z)^2 over predicted positions (PaLM's z-loss): pulls the softmax normaliser
    towards 1, so the output logits cannot drift to magnitudes where bf16 loses the loss. Z sums
    over the first `vocab_size` logits (default: all)."""
    if vocab_size is not None:
        logits = true_vocab(logits, vocab_size)
    log_z = torch.logsumexp(logits.float(), dim=-1)
    return (log_z.square() * (targets != IGNORE)).sum()


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES[cls.name] = cls
    return cls


def get_objective(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ConfigError(
            f"train.objective = {name!r} is not a registered objective; registered: "
            f"{', '.join(OBJECTIVES)} (a plugin adds one with @register_objective)"
        )
    return OBJECTIVES[name]


def build_objective(cfg: Config, tokenizer: KilnTokenizer, vocab_size: int) -> Objective:
    return get_objective(cfg.train.objective)(tokenizer, vocab_size, cfg)


def window_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A CPU generator for window `index` of the global batch at `step`."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@register_objective
class Causal(Objective):
    """Next-token prediction: inputs are the first T tokens of a window, targets the last T."""

    name = "causal"
    causal = True

    def make_batch(self, windows: torch.Tensor, step: int, seed: int, first_index: int = 0) -> Batch:
        return Batch(windows[:, :-1], windows[:, 1:])


@register_objective
class Masked(Objective):
    """Masked language modelling as in BERT and RoBERTa, on the first T tokens of each window.

    `mask.rate` of the tokens are selected (never a special token); of those, `mask.replace`
    become the mask token, `mask.random` a random non-special token and `mask.keep` stay as they
    are; the loss is taken at the selected positions only. Masks are dynamic (drawn afresh for
    every step, so a window seen twice is masked differently). With `mask.whole_word` whole
    words (`KilnTokenizer.word_start_mask`) are selected, each piece then corrupted on its own as
    in BERT's whole-word masking. There is no next-sentence prediction: RoBERTa found that
    dropping it matches or improves downstream results.
    """

    name = "masked"
    causal = False
    masked = True

    def __init__(self, tokenizer: KilnTokenizer, vocab_size: int, cfg: Config | None = None):
        super().__init__(tokenizer, vocab_size, cfg)
        self.mask = cfg.mask if cfg is not None else MaskConfig()
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        self.special[sorted(i for i in tokenizer.special_ids if i < vocab_size)] = True
        self.replacements = (~self.special).nonzero().flatten()  # candidates for the random token
        self.mask_id = tokenizer.mask_id

    def make_batch(self, windows: torch.Tensor, step: int, seed: int, first_index: int = 0) -> Batch:
        m = self.mask
        tokens = windows[:, :-1].cpu()  # (B, T)
        B, T = tokens.shape
        draws = torch.empty(B, 3, T, dtype=torch.float64)  # per position: select, corrupt how, which token
        for row in range(B):
            draws[row] = torch.rand(
                3, T, dtype=torch.float64, generator=window_generator(seed, step, first_index + row)
            )
        select, action, pick = draws.unbind(1)
        if m.whole_word:  # every piece of a word takes the draw of the word's first piece
            starts = torch.from_numpy(self.tokenizer.word_start_mask(tokens.numpy()))
            positions = torch.arange(T).expand(B, T)
            word_start = torch.where(starts, positions, 0).cummax(dim=1).values  # (B, T)
            select = select.gather(1, word_start)
        selected = (select < m.rate) & ~self.special[tokens]
        to_mask = selected & (action < m.replace)
        to_random = selected & (action >= m.replace) & (action < m.replace + m.random)
        n = len(self.replacements)
        random_tokens = self.replacements[(pick * n).long().clamp(max=n - 1)]
        if self.mask_id is None:  # a tokenizer imported without one (a mask token is not a required role)
            raise ConfigError("train.objective = 'masked' needs a tokenizer with a mask token; this one has none")
        inputs = torch.where(to_mask, self.mask_id, torch.where(to_random, random_tokens, tokens))
        targets = torch.where(selected, tokens, IGNORE)
        return Batch(inputs, targets)


PREDICT_MULTIPLE = 64  # the masked head's positions are padded to a multiple of this


def predicted_positions(targets: torch.Tensor) -> torch.Tensor:
    """Flat positions (into `targets.flatten()`, a host tensor) of every target to predict, padded
    to a multiple of PREDICT_MULTIPLE with positions that predict nothing (target IGNORE). Read
    with numpy on the host, where the batch was made: a boolean index on the device would make
    the host wait for the count (a sync every micro-batch), and a fixed bound per row would
    compute the head over ~2.5x the positions it needs (bert-tiny). Under torch.compile the
    padded count takes a few values: one recompile marks it dynamic."""
    flat = targets.detach().cpu().numpy().reshape(-1)
    chosen = np.flatnonzero(flat != IGNORE)
    padded = min(flat.size, -(-max(len(chosen), 1) // PREDICT_MULTIPLE) * PREDICT_MULTIPLE)
    if padded > len(chosen):
        chosen = np.concatenate([chosen, np.flatnonzero(flat == IGNORE)[: padded - len(chosen)]])
    return torch.from_numpy(chosen)


@register_objective
class Multimodal(Objective):
    """Next-token prediction on packed image-text windows (kiln.data.multimodal.loader): text
    tokens are predicted, image positions are inputs only, and no token is predicted from another
    document (the windows' document column); the patches, their indices and the documents go to
    the model as extra inputs."""

    name = "multimodal"
    causal = True
    family = "vlm"

    def make_batch(self, windows: torch.Tensor, step: int, seed: int, first_index: int = 0) -> Batch:
        from kiln.data.multimodal.loader import DOC, PATCH, TOKEN, pixels_of

        if windows.dim() != 3:
            raise ConfigError("train.objective = 'multimodal' needs image-text windows (model.family = 'vlm')")
        tokens, docs, patch = windows[..., TOKEN].long(), windows[..., DOC], windows[..., PATCH]
        nxt = slice(1, None)
        predicted = (patch[:, nxt] < 0) & (docs[:, nxt] == docs[:, :-1]) & (docs[:, nxt] >= 0)
        targets = torch.where(predicted, tokens[:, nxt], IGNORE)
        extras = {"patches": pixels_of(windows[:, :-1]), "patch_index": patch[:, :-1].long(), "documents": docs[:, :-1]}
        return Batch(tokens[:, :-1], targets, extras)
