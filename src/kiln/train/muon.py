"""Muon for hidden matrices and AdamW for everything else, as one `torch.optim.Optimizer`.

Each param group names its rule with the key `"optimizer"`: `"muon"` or `"adamw"`. One object per
model part keeps Kiln's checkpointing (torch.distributed.checkpoint's get/set_optimizer_state_dict)
and its LR schedule (which writes `group["lr"]` every step) unchanged.

Muon (Keller Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024,
https://kellerjordan.github.io/posts/muon/) follows `torch.optim.Muon` (torch >= 2.9) exactly for
2-D matrices: momentum `buf.lerp_(grad, 1 - momentum)`, Nesterov `grad.lerp(buf, momentum)`, the
quintic Newton–Schulz iteration (3.4445, -4.7750, 2.0315) in bfloat16 on the Frobenius-normalised
update (transposed when rows > cols), decoupled weight decay `p *= 1 - lr * wd`, then
`p -= adjusted_lr * O`. The learning rate is adjusted by the matrix shape (rows A, cols B):

    "spectral"         sqrt(max(1, A / B))     Keller Jordan's original (torch's adjust_lr_fn="original")
    "match_rms_adamw"  0.2 * sqrt(max(A, B))   Moonshot, "Muon is Scalable for LLM Training" (2025,
                                               https://arxiv.org/abs/2502.16982): the update's RMS
                                               matches AdamW's, so AdamW's lr and weight decay carry over
    "none"             1

Tensors of more than two dims (mixture-of-experts weights [E, out, in]) are a batch of matrices:
each expert's matrix is orthogonalised on its own, the LR adjusted from the last two dims.

AdamW groups run torch's own functional AdamW (`torch.optim.adam.adam`, decoupled weight decay,
bias correction), fused where the device has the kernel.

A training loop may set `opt.found_inf` to a 0-d device tensor (1 = discard this step, 0 = apply)
before `step()`; the flag is never read on the host (`skips_on_device`): the fused AdamW kernel
takes it directly, everything else computes the new values and keeps the old ones with `torch.where`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.adam import adam
from torch.optim.optimizer import ParamsT

from kiln.parallel.tensors import local  # this rank's part, a view: writing it writes the DTensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic Newton–Schulz, Keller Jordan's Muon
NS_EPS = 1e-7  # torch.optim.Muon's default: floor of the norm that scales the update
ADJUST_LR = ("match_rms_adamw", "spectral", "none")
RULES = ("muon", "adamw")
_FUSED_DEVICES = ("cpu", "cuda")  # torch's fused AdamW kernels
_CAPTURABLE_DEVICES = ("cuda", "xpu", "hpu")  # non-fused AdamW without host reads of `step`


def newton_schulz(
    g: torch.Tensor, steps: int, *, eps: float = NS_EPS, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximately orthogonalise `g` (a matrix, or a batch of matrices over its leading dims):
    `steps` quintic Newton–Schulz iterations in `dtype`, returned in `dtype`. In bfloat16 on a
    matrix this is op for op torch.optim.Muon's `_zeropower_via_newtonschulz`, so results agree
    bit for bit."""
    if g.dim() < 2:
        raise ValueError(f"Newton–Schulz needs a matrix or a batch of matrices, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    tall = g.size(-2) > g.size(-1)
    x = g.to(dtype)
    x = x.mT if tall else x  # iterate on the wide side: the Gram matrix is the smaller one
    if x.dim() == 2:
        x = x / x.norm().clamp(min=eps)  # out of place: never writes into a bfloat16 input
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:
        lead = x.shape[:-2]
        x = x.reshape(-1, *x.shape[-2:])
        x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        x = x.reshape(*lead, *x.shape[-2:])
    return x.mT if tall else x


def muon_lr_scale(shape: torch.Size | tuple[int, ...], adjust_lr: str) -> float:
    """Factor on Muon's learning rate for a matrix (or batch of matrices) of `shape`."""
    rows, cols = shape[-2], shape[-1]
    if adjust_lr == "spectral":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr == "none":
        return 1.0
    raise ValueError(f"adjust_lr must be one of {ADJUST_LR}, got {adjust_lr!r}")


def _grad_like(p: torch.Tensor) -> torch.Tensor:
    """p's gradient laid out like p (FSDP2's already is; a Partial one would not be elementwise)."""
    g = p.grad
    assert g is not None
    if isinstance(p, DTensor) and isinstance(g, DTensor) and g.placements != p.placements:
        g = g.redistribute(p.device_mesh, p.placements)
    return g


def _commit(dst: torch.Tensor, new: torch.Tensor, skip: torch.Tensor | None) -> None:
    """dst = new, or dst unchanged where the device flag says skip (select, not blend: NaN-safe)."""
    dst.copy_(new if skip is None else torch.where(skip.to(dst.device), dst, new))


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups with `"optimizer": "muon"`, AdamW for those with `"adamw"`.

    Every group must say `"optimizer"`; any other hyperparameter may be overridden per group.
    State per parameter: muon `momentum_buffer`; adamw `step` (float32 0-d tensor on the
    parameter's device), `exp_avg`, `exp_avg_sq`. States of DTensor parameters are DTensors laid
    out like the parameter.

    DTensor parameters (FSDP2 shards, tensor-parallel splits) are orthogonalised as whole matrices:
    every rank gathers the update, runs Newton–Schulz on the full matrix (all ranks compute the same)
    and keeps its own part, a local slice. Simple and correct; spreading whole matrices over ranks
    (torchtitan's DistMuon, Dion) is a later optimisation. AdamW, elementwise, runs on local shards.
    """

    skips_on_device = True  # the loop may hand `found_inf` as a device flag: see the module docstring

    def __init__(
        self,
        param_groups: ParamsT,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr: str = "match_rms_adamw",
        fused: bool | None = None,
        ns_dtype: str = "bfloat16",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr=adjust_lr,
            fused=fused,  # AdamW groups: None = fused wherever the kernel exists
            # Newton–Schulz's precision: bfloat16 as torch's Muon (GPUs); Kiln picks float32 on a CPU,
            # where bfloat16 products run up to ~100x slower on CPUs without bf16 units
            ns_dtype=ns_dtype,
        )
        self.found_inf: torch.Tensor | None = None  # set by the loop each step; 1 = discard the update
        super().__init__(param_groups, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        rule = param_group.get("optimizer")
        if rule not in RULES:
            raise ValueError(f"every param group needs 'optimizer' set to one of {RULES}, got {rule!r}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        adjust_lr = param_group.get("adjust_lr", self.defaults["adjust_lr"])
        if adjust_lr not in ADJUST_LR:
            raise ValueError(f"adjust_lr must be one of {ADJUST_LR}, got {adjust_lr!r}")
        if param_group.get("ns_dtype", self.defaults["ns_dtype"]) not in ("bfloat16", "float32"):
            raise ValueError("ns_dtype must be 'bfloat16' or 'float32'")
        if rule == "muon":
            for p in params:
                if p.dim() < 2:
                    raise ValueError(f"Muon updates matrices (dim >= 2); got a parameter of shape {tuple(p.shape)}")
        super().add_param_group({**param_group, "params": params})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flag = getattr(self, "found_inf", None)
        skip = None if flag is None else flag > 0  # stays on the device
        for group in self.param_groups:
            if group["optimizer"] == "muon":
                self._muon(group, skip)
            else:
                self._adamw(group, flag, skip)
        return loss

    def _muon(self, group: dict[str, Any], skip: torch.Tensor | None) -> None:
        lr, momentum = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf, grad, param = local(state["momentum_buffer"]), local(_grad_like(p)), local(p)
            # candidates computed out of place, committed below (or kept, if the step is discarded)
            new_buf = buf.lerp(grad, 1 - momentum)
            update = grad.lerp(new_buf, momentum) if group["nesterov"] else new_buf
            ortho = self._orthogonalise(update, p, group["ns_steps"], getattr(torch, group["ns_dtype"]))
            adjusted_lr = lr * muon_lr_scale(p.shape, group["adjust_lr"])
            new_param = param.mul(1 - lr * group["weight_decay"]).add_(ortho, alpha=-adjusted_lr)
            _commit(buf, new_buf, skip)
            _commit(param, new_param, skip)

    @staticmethod
    def _orthogonalise(update: torch.Tensor, p: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
        """Newton–Schulz of the whole matrix; this rank's part of it for a DTensor parameter."""
        if not isinstance(p, DTensor):
            return newton_schulz(update, steps, dtype=dtype)
        mesh, placements = p.device_mesh, p.placements
        # gathered in Newton–Schulz's dtype: it casts first, so the result is the same (in bfloat16 at half the traffic)
        part = DTensor.from_local(update.to(dtype), mesh, placements, run_check=False, shape=p.shape, stride=p.stride())
        full = newton_schulz(part.full_tensor(), steps, dtype=dtype)
        # Replicate -> the parameter's placements is a local slice: no communication
        mine = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
        return mine.redistribute(mesh, placements).to_local()

    def _adamw(self, group: dict[str, Any], flag: torch.Tensor | None, skip: torch.Tensor | None) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            param = local(p)
            if not state:
                # on the device, as torch's fused AdamW keeps it: the discard flag can then act on it
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state["step"].device != param.device:  # loaded from a checkpoint onto the host
                state["step"] = state["step"].to(param.device, torch.float32)
            params.append(param)
            grads.append(local(_grad_like(p)))
            exp_avgs.append(local(state["exp_avg"]))
            exp_avg_sqs.append(local(state["exp_avg_sq"]))
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        hyper = dict(
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
            decoupled_weight_decay=True,
        )
        fused = group["fused"]
        if fused is None:
            fused = all(t.device.type in _FUSED_DEVICES for t in params)
        if fused:  # the kernel reads found_inf on the device and leaves params and states alone
            adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True, found_inf=flag, **hyper)
            return
        everything = params + exp_avgs + exp_avg_sqs + steps
        before = None if skip is None else [t.clone() for t in everything]
        # capturable: bias corrections from `step` as device tensors, not host reads of it
        capturable = all(t.device.type in _CAPTURABLE_DEVICES for t in params)
        adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=True, capturable=capturable, **hyper)
        if skip is not None and before is not None:
            for t, old in zip(everything, before):
                t.copy_(torch.where(skip.to(t.device), old, t))
