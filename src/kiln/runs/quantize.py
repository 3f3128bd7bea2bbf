"""Weight-only quantisation of a run's weights (torchao): `kiln export --quantize int8 | int4`
writes them, `kiln eval RUN --weights FILE` evaluates them beside the checkpoint they came from.

What is quantised: the transformer blocks' linear layers (attention and MLP projections). The
embeddings, the output head (tied or not), norms, MoE routers and expert tensors keep their
precision — the common choice for weight-only schemes, where the head is most sensitive.
- int8: one scale per output row (torchao Int8WeightOnlyConfig).
- int4: one scale per group of 32 input values (torchao IntxWeightOnlyConfig). This torchao format
  stores each 4-bit value in a byte, so the file is not smaller than int8's; the quality is int4's.
The file is safetensors: quantised tensors as their parts with torchao's JSON metadata (nothing
is unpickled on load), plus `kiln.*` metadata naming the run, step and scheme.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kiln.errors import CheckpointError, KilnError
from kiln.fileio import atomic_path
from kiln.kernels.ao import stored_bytes, torchao

SCHEMES = ("int8", "int4")
INT4_GROUP = 32


def _config(scheme: str):
    q = torchao("quantization", f"--quantize {scheme}")
    if scheme == "int8":
        return q.Int8WeightOnlyConfig()
    from torchao.quantization.granularity import PerGroup

    int4 = torch.int4  # type: ignore[attr-defined]  # a torch dtype at run time; torch's stubs omit it
    return q.IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup(INT4_GROUP))


def quantizable(module: nn.Module, fqn: str, scheme: str) -> bool:
    if not isinstance(module, nn.Linear) or not fqn.startswith("layers.") or fqn.endswith(".router"):
        return False  # a router's few scores decide where every token goes: kept in full precision
    return scheme != "int4" or module.in_features % INT4_GROUP == 0


def quantize_model(model: nn.Module, scheme: str) -> int:
    """Quantise `model`'s block linears in place; returns how many."""
    if scheme not in SCHEMES:
        raise KilnError(f"--quantize {scheme}: choose one of {', '.join(SCHEMES)}")
    config = _config(scheme)
    chosen = [fqn for fqn, m in model.named_modules() if quantizable(m, fqn, scheme)]
    if not chosen:
        raise KilnError(f"--quantize {scheme}: this model has no block linear layers to quantise")
    try:
        torchao("quantization", f"--quantize {scheme}").quantize_(
            model, config, filter_fn=lambda m, fqn: quantizable(m, fqn, scheme)
        )
    except (ValueError, RuntimeError, NotImplementedError) as e:
        raise KilnError(f"--quantize {scheme}: torchao could not quantise this model ({e})") from None
    return len(chosen)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored (a quantised tensor counts its parts)."""
    return sum(stored_bytes(t) for t in model.state_dict().values())


def export_quantized(path: Path, out: Path, step: int | None, scheme: str) -> tuple[Path, dict[str, int]]:
    """Write the run's weights at `step` with the block linears quantised; returns the file and sizes."""
    from kiln.runs.rundir import RunDir

    run = RunDir.open(path)
    loaded = run.load_model(step, device=torch.device("cpu"))
    model = loaded.model.float()
    before = weight_bytes(model)
    n = quantize_model(model, scheme)
    support = torchao("prototype.safetensors.safetensors_support", f"--quantize {scheme}")
    tensors, meta = support.flatten_tensor_state_dict(model.state_dict())
    meta = {**meta, "kiln.quantize": scheme, "kiln.step": str(loaded.step), "kiln.run": run.path.name}
    with atomic_path(out) as tmp:  # whole or not at all: a failed export never leaves half a file
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
    return out, {"layers": n, "weight_bytes": weight_bytes(model), "full_weight_bytes": before}


def read_quantized(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A quantised export's state dict and its `kiln.*` metadata."""
    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    scheme = meta.get("kiln.quantize")
    if scheme not in SCHEMES:
        raise CheckpointError(
            f"{file} is not a quantised export (make one with kiln export RUN --quantize int8 --out FILE)"
        )
    support = torchao("prototype.safetensors.safetensors_support", f"kiln eval --weights ({scheme})")
    state, _ = support.unflatten_tensor_state_dict(load_file(str(file)), meta)
    return state, {k: v for k, v in meta.items() if k.startswith("kiln.")}


def load_quantized(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put a quantised export's tensors into `model` (built for the same run)."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(
            f"the quantised weights do not fit this run's model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); was it exported from another run?"
        )
