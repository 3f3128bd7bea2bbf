"""A plugin callback for the expert-parallel tests: after the backward pass of the step given by
KILN_GRAD_STEP (1-based), every parameter's full gradient (gathered from FSDP / expert shards) is
written by rank 0 to KILN_GRAD_DIR/<run>.safetensors, keyed by parameter name."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from kiln.train.callbacks import Callback, register_callback

WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.")


@register_callback("grad_dump")
class GradDump(Callback):
    order = 99

    def on_after_backward(self, trainer, step):
        if step + 1 != int(os.environ.get("KILN_GRAD_STEP", "3")):
            return
        grads = {}
        for name, param in trainer.module.named_parameters():  # the same order on every rank
            grad = param.grad
            if grad is None:
                continue
            full = grad.full_tensor() if isinstance(grad, DTensor) else grad
            for prefix in WRAPPERS:
                name = name.replace(prefix, "")
            grads[name] = full.detach().float().cpu().contiguous()
        if trainer.par.info.rank == 0:
            folder = Path(os.environ["KILN_GRAD_DIR"])
            folder.mkdir(parents=True, exist_ok=True)
            save_file(grads, str(folder / f"{trainer.run.name}.safetensors"))
