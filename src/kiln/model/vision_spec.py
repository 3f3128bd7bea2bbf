"""The `vlm` family's spec: the decoder's structure, plus the image stem's checks and counts."""

from __future__ import annotations

import dataclasses

from kiln.config import Config, ModelConfig
from kiln.config_rules import require
from kiln.model.specs import DECODER, flops_per_token, validate_transformer
from kiln.model.vision import VisionDecoder, n_patches, patch_values


def validate_vlm(cfg: Config) -> None:
    validate_transformer(cfg)
    m = cfg.model
    require(m.image_channels in (1, 3), f"model.image_channels must be 1 (grey) or 3 (RGB), got {m.image_channels}")
    require(
        m.image_size % m.patch_size == 0,
        f"model.patch_size = {m.patch_size} must divide model.image_size = {m.image_size}",
    )
    need = n_patches(m) + 2  # BOS, the image, and at least EOS
    require(
        need <= m.seq_len,
        f"an image takes {n_patches(m)} positions ((model.image_size / model.patch_size)^2), "
        f"too many for model.seq_len = {m.seq_len}; raise model.patch_size or model.seq_len",
    )
    require(
        cfg.parallel.tp == 1 and cfg.parallel.pp == 1,
        "model.family = 'vlm' trains with data parallelism "
        "(FSDP) only for now; set parallel.tp = 1 and parallel.pp = 1",
    )
    require(
        cfg.train.objective == "multimodal",
        f"model.family = 'vlm' trains with train.objective = 'multimodal' "
        f"(captions and documents with images), not '{cfg.train.objective}'",
    )
    if m.image_encoder == "frozen":
        require(
            bool(m.image_encoder_from),
            "model.image_encoder = 'frozen' needs model.image_encoder_from: a "
            "safetensors file with the stem.* and patch_pos.* tensors (e.g. `kiln export` of a vlm run)",
        )


def vlm_flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """The decoder's count plus the patch stem (counted at every position, as it is computed)."""
    return flops_per_token(cfg, vocab_size) + 6.0 * patch_values(cfg) * cfg.d_model


VLM = dataclasses.replace(
    DECODER,
    name="vlm",
    build=VisionDecoder,
    validate=validate_vlm,
    tensor_parallel=None,
    pipeline_stage=None,
    count_params=None,
    flops_per_token=vlm_flops_per_token,
    hf_adapter=None,
)
