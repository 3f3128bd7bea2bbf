"""Small views of parameters that parallelism wraps: the local part of a distributed tensor, and
a parameter's name as state dicts spell it (without the prefixes wrapper modules add)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")  # compile, AC, FSDP1


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` (itself when it is not a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def plain_name(name: str) -> str:
    for w in WRAPPERS:
        name = name.replace(w, "")
    return name
