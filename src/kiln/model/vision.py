"""The image-text decoder (`model.family = "vlm"`): a GPT-style decoder whose inputs may hold images.

An image arrives as patches at the sequence positions the loader reserved for it
(kiln.data.multimodal.loader): a ViT-style stem (one linear map of a patch's pixels, plus a
learned embedding of the patch's place in the image) turns each patch into a vector of the
model's width, which replaces the token embedding at that position. Text and images then share
every block. Attention stays within a document (the samples packed into one window never see
each other): a boolean mask through `scaled_dot_product_attention`.

With `[model.vision] encoder = "frozen"` the stem's weights come from `encoder_from`
(for instance a checkpoint of an earlier run, written by `kiln export`) and are not trained.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.model.decoder import Decoder

ENCODER_PARTS = ("stem", "patch_pos")  # the image encoder's modules (loaded and frozen together)


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool: query i may attend key j when j <= i in the same document."""
    T = documents.shape[1]
    same = documents[:, :, None] == documents[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return (same & causal)[:, None]


class VisionDecoder(Decoder):
    input_layers = ENCODER_PARTS  # the image stem is an input layer: kind "embedding" for optimizer groups

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        self.stem = nn.Linear(cfg.vision.patch_values, cfg.d_model)
        self.patch_pos = nn.Embedding(cfg.vision.n_patches, cfg.d_model)
        if cfg.vision.encoder == "frozen":
            for part in ENCODER_PARTS:
                getattr(self, part).requires_grad_(False)

    def forward(  # type: ignore[override]  # images come in before `head`: not the text decoder's signature
        self,
        tokens: torch.Tensor,
        patches: torch.Tensor | None = None,
        patch_index: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> Any:
        """tokens (B, T); patches (B, T, >= patch values) uint8 pixel values at image positions;
        patch_index (B, T): the patch's place in its image, -1 at text; documents (B, T): the
        sample each position belongs to (attention stays inside it). Returns logits (B, T, vocab)."""
        x = self.embed(tokens)
        if patches is not None:
            assert patch_index is not None  # the loader gives patches with their places
            is_image = patch_index >= 0
            pixels = patches[..., : self.stem.in_features].to(self.stem.weight.dtype) * (1 / 127.5) - 1.0
            image = self.stem(pixels) + self.patch_pos(patch_index.clamp(min=0))
            x = torch.where(is_image[..., None], image.to(x.dtype), x)
        mask = document_mask(documents) if documents is not None else None
        return self.body(x, mask, head)

    @torch.no_grad()
    def init_pretrained(self, write: Callable[[torch.Tensor, torch.Tensor], None], optional: bool = False) -> None:
        """After initialisation: a frozen encoder's weights from `model.image_encoder_from` (skipped when
        `optional` and the file is gone: a resume takes them from its checkpoint)."""
        vision = self.cfg.vision
        if vision.encoder != "frozen" or (optional and not Path(vision.encoder_from).is_file()):
            return
        from kiln.model.init import load_named_weights

        load_named_weights(self, vision.encoder_from, ENCODER_PARTS, "model.image_encoder_from", write)
