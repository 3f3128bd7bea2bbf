"""The `vlm` family's spec: the decoder's structure, plus the image stem's checks and counts."""

from __future__ import annotations

import dataclasses

from kiln.config import Config, ModelConfig
from kiln.config_rules import require
from kiln.model.transformer_spec import DECODER, flops_per_token, validate_transformer
from kiln.model.vision import VisionDecoder


def validate_vlm(cfg: Config) -> None:
    """The `[model.vision]` table's checks; messages name its keys by their flat names (`model.image_size`)."""
    validate_transformer(cfg)
    m, v = cfg.model, cfg.model.vision
    require(v.channels in (1, 3), f"model.image_channels must be 1 (grey) or 3 (RGB), got {v.channels}")
    require(
        v.image_size % v.patch_size == 0,
        f"model.patch_size = {v.patch_size} must divide model.image_size = {v.image_size}",
    )
    need = v.n_patches + 2  # BOS, the image, and at least EOS
    require(
        need <= m.seq_len,
        f"an image takes {v.n_patches} positions ((model.image_size / model.patch_size)^2), "
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
    if v.encoder == "frozen":
        require(
            bool(v.encoder_from),
            "model.image_encoder = 'frozen' needs model.image_encoder_from: a "
            "safetensors file with the stem.* and patch_pos.* tensors (e.g. `kiln export` of a vlm run)",
        )


def vlm_flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """The decoder's count plus the patch stem (counted at every position, as it is computed)."""
    return flops_per_token(cfg, vocab_size) + 6.0 * cfg.vision.patch_values * cfg.d_model


def frozen_encoder_file(cfg: ModelConfig) -> dict[str, str]:
    frozen = cfg.vision.encoder == "frozen"
    return {"model.image_encoder_from": cfg.vision.encoder_from} if frozen else {}


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
    start_weights=frozen_encoder_file,
)
