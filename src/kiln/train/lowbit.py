"""Low-bit AdamW states (`optim.name = "adamw8bit" | "adamw4bit"`, torchao): the moments kept as
8-bit or 4-bit codes with one float32 scale per block (256 / 128 values), dequantised inside each
step. Tensors under 4,096 values keep float32 states, as in bitsandbytes.

Checkpoints stay safetensors: a quantised state is written as its inner tensors (codes, scales,
code map) plus a line of metadata naming its torchao class, and rebuilt from them exactly — never
dequantised and quantised again, which would not give the same codes back.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

from kiln.config import OptimConfig
from kiln.errors import CheckpointError
from kiln.kernels.ao import stored_bytes, torchao

LOW_BIT = {"adamw8bit": "AdamW8bit", "adamw4bit": "AdamW4bit"}
META_PREFIX = "subclass:"
# the only classes a checkpoint may name: a file chooses nothing else to import or call
STATE_CLASSES = {
    "torchao.optim.subclass_8bit.OptimState8bit",
    "torchao.optim.subclass_4bit.OptimState4bit",
    "torchao.optim.subclass_fp8.OptimStateFp8",
}


def build_low_bit(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    optim = torchao("optim", f"optim.name = '{cfg.name}'")
    # torch asks tensor subclasses for a cache hash when it compiles torchao's step; harmless here
    warnings.filterwarnings("ignore", message=".*does not implement _stable_hash_for_caching")
    return getattr(optim, LOW_BIT[cfg.name])(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


if TYPE_CHECKING:

    class _Flattenable(torch.Tensor):
        """A traceable tensor subclass (torchao's quantised tensors): its parts by name, and a context."""

        def __tensor_flatten__(self) -> tuple[list[str], Any]: ...


def _is_subclass(t: torch.Tensor) -> TypeGuard[_Flattenable]:
    return type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__")


def _encode(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record {type(value).__name__} in a checkpoint")


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "dtype" in value:
        dtype = getattr(torch, str(value["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"not a dtype: {value['dtype']!r}")
        return dtype
    if isinstance(value, dict) and "size" in value:
        return torch.Size(int(v) for v in value["size"])
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_decode(v) for v in value["tuple"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"unexpected value {value!r}")


def flatten_state(key: str, value: torch.Tensor, out: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Add `value` to the safetensors payload under `key`: itself, or a quantised state's parts."""
    if not _is_subclass(value):
        out[key] = value.detach().contiguous().cpu()
        return
    names, ctx = value.__tensor_flatten__()
    for name in names:
        out[f"{key}.{name}"] = getattr(value, name).detach().contiguous().cpu()
    cls = type(value)
    meta[META_PREFIX + key] = json.dumps(
        {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "names": names,
            "ctx": _encode(ctx),
            "size": list(value.shape),
            "stride": list(value.stride()),
        }
    )


def unflatten_states(flat: dict[str, torch.Tensor], meta: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """The inverse of `flatten_state` over a whole payload."""
    out = dict(flat)
    for mkey, text in (meta or {}).items():
        if not mkey.startswith(META_PREFIX):
            continue
        key = mkey[len(META_PREFIX) :]
        try:
            info = json.loads(text)
            if info["class"] not in STATE_CLASSES:
                raise CheckpointError(
                    f"optimizer state {key} names an unexpected class {info['class']!r}; "
                    "this checkpoint was not written by Kiln"
                )
            module, _, name = info["class"].rpartition(".")
            cls = getattr(torchao(module.removeprefix("torchao."), "resuming low-bit optimizer states"), name)
            inner = {n: out.pop(f"{key}.{n}") for n in info["names"]}
            out[key] = cls.__tensor_unflatten__(
                inner, tuple(_decode(info["ctx"])), torch.Size(info["size"]), tuple(info["stride"])
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"optimizer state {key} is damaged ({type(e).__name__}: {e})") from None
    return out


def state_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Bytes held by the optimizers' state tensors (a quantised state counts its parts)."""
    total = 0
    for opt in optimizers:
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    total += stored_bytes(v)
    return total
