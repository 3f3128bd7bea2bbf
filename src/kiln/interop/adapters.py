"""The built-in Hugging Face adapters by name: a family's `ModelSpec.hf_adapter` names one of
`ADAPTERS` (so the model imports nothing from interop) or is an `HFAdapter` itself (a plugin's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.errors import ConfigError
from kiln.interop.hf import DECODER_HF, HFAdapter
from kiln.interop.hf_bert import ENCODER_HF
from kiln.interop.hf_mixtral import MIXTRAL_HF

if TYPE_CHECKING:
    from kiln.model.spec import ModelSpec

ADAPTERS: dict[str, HFAdapter] = {
    "llama": DECODER_HF,  # Llama, Qwen3 and GPT-2 checkpoints <-> the decoder
    "bert": ENCODER_HF,  # BertForMaskedLM <-> the encoder
    "mixtral": MIXTRAL_HF,  # MixtralForCausalLM <-> the moe family
}


def spec_adapter(spec: ModelSpec) -> HFAdapter | None:
    """The adapter `spec.hf_adapter` gives or names (None: the family has no Hugging Face mapping)."""
    adapter = spec.hf_adapter
    if not isinstance(adapter, str):
        return adapter
    if adapter not in ADAPTERS:
        raise ConfigError(
            f"model.family = '{spec.name}' names Hugging Face adapter {adapter!r}; known: {', '.join(ADAPTERS)}"
        )
    return ADAPTERS[adapter]
