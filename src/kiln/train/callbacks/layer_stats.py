"""`layer_stats`: per-module statistics every N steps, the early signs of the instabilities that
QK-norm and z-loss address (growing activations, attention-logit growth, entropy collapse).

For every module whose name matches one of `modules` (default: the family's monitor modules,
for the transformer every block's attention and MLP), at each step that is a multiple of
`every`:

    act_rms, act_max_abs    of the module's output (over every micro-batch of the step)
    grad_norm               of the module's parameters' gradients (before clipping)
    update_ratio            ||w_after - w_before|| / ||w_before|| of the optimizer step
    attn_logit_max          largest pre-softmax attention score (attention modules)
    attn_entropy            mean entropy of the attention distributions, in nats
    dead_frac               modules with an output projection `w2` (MLPs): the share of hidden
                            units (w2's inputs) whose largest |value| over the step's tokens is
                            below 1e-6 of the layer's largest (no output, no gradient)

One record per step and module goes to `layer_stats.jsonl`; `layer_stats.png` shows module x
step heat maps at the end. Free when off; when on, forward hooks do the work only at sampled
steps, which cost a copy of the matched modules' weights and one host sync (two all-reduces
under torch.distributed). Statistics are over all ranks: shards are summed once, replicas not
double-counted.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from kiln.errors import ConfigError
from kiln.parallel.tensors import local as _local
from kiln.train.callbacks.base import Callback
from kiln.train.step_api import RunView

FILE = "layer_stats.jsonl"
HEATMAP_STATS = ("act_rms", "grad_norm", "update_ratio", "attn_entropy")
DEAD_RELATIVE = 1e-6  # a hidden unit whose largest |activation| is below this share of the layer's largest


@dataclass
class LayerStatsOptions:
    every: int = 10  # sample every N steps
    modules: list[str] = field(default_factory=list)  # module-name globs; empty = the family's defaults
    attention: bool = True  # attention logits and entropy (recomputes the scores of sampled steps)
    heatmap: bool = True  # layer_stats.png at the end

    def check(self) -> None:
        if self.every < 1:
            raise ConfigError(f"callbacks.layer_stats.every must be >= 1, got {self.every}")


def _replicas(t: torch.Tensor) -> int:
    """How many ranks hold the same values as this rank's local part of `t`."""
    if not isinstance(t, DTensor):
        return 1
    return math.prod(t.device_mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate())


def _sq(t: torch.Tensor) -> torch.Tensor:
    """This rank's share of the squared norm of `t` (replicated parts counted once overall)."""
    return _local(t).detach().double().pow(2).sum() / _replicas(t)


class LayerStats(Callback):
    name = "layer_stats"
    Options = LayerStatsOptions

    def __init__(self, options: LayerStatsOptions | None = None):
        super().__init__(options or LayerStatsOptions())
        self.active = False
        self.handles: list[Any] = []

    # ---------------------------------------------------------------- setup
    def on_run_start(self, trainer: RunView) -> None:
        spec = trainer.spec
        patterns = self.options.modules or list(spec.monitor_modules)
        if not patterns:
            raise ConfigError(
                f"callbacks.layer_stats: model.family = '{spec.name}' names no modules to monitor; "
                "give callbacks.layer_stats.modules (globs of module names)"
            )
        attn_globs = spec.attention_modules if (self.options.attention and spec.attention_logits) else ()
        self.modules = {
            n: m for n, m in trainer.module.named_modules() if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)
        }
        self.attention = {n for n in self.modules if any(fnmatch.fnmatchcase(n, p) for p in attn_globs)}
        names = sorted(self.modules)
        if trainer.par.distributed:  # pipeline stages hold different modules: agree on the union
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, names)
            names = sorted({n for part in gathered for n in part})
        if not names:
            raise ConfigError(
                f"callbacks.layer_stats.modules = {patterns} match no module of the model; module "
                f"names look like {', '.join(list(n for n, _ in trainer.module.named_modules() if n)[:4])}"
            )
        self.names = names
        self.is_attention = {n: n in self.attention for n in names}
        if trainer.par.distributed:
            flags = torch.tensor([float(self.is_attention[n]) for n in names], device=trainer.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            self.is_attention = dict(zip(names, (f > 0 for f in flags.tolist())))
        self.spec = spec
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
            if isinstance(getattr(module, "w2", None), torch.nn.Linear):
                self.handles.append(module.w2.register_forward_pre_hook(self._unit_hook(name)))
        self.has_units = {n: isinstance(getattr(self.modules.get(n), "w2", None), torch.nn.Linear) for n in names}
        if trainer.par.distributed:
            flags = torch.tensor([float(self.has_units[n]) for n in names], device=trainer.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            self.has_units = dict(zip(names, (f > 0 for f in flags.tolist())))
        self._reset(trainer.device)

    def _reset(self, device: torch.device) -> None:
        n = len(self.names)
        self.sums = torch.zeros(n, 5, dtype=torch.float64, device=device)  # sum sq, count, entropy sum, rows, -
        self.maxes = torch.full((n, 2), -math.inf, dtype=torch.float64, device=device)  # max abs, logit max
        self.weights: dict[str, list[torch.Tensor]] = {}
        self.grad_sq = torch.zeros(n, dtype=torch.float64, device=device)
        self.unit_peak: dict[str, torch.Tensor] = {}  # per hidden unit: largest |activation| of the step

    def _hook(self, name: str):
        index = self.names.index(name)

        def hook(module, args, output):
            if not self.active:
                return
            with torch.no_grad():
                out = _local(output[0] if isinstance(output, tuple) else output).detach().double()
                self.sums[index, 0] += out.pow(2).sum()
                self.sums[index, 1] += out.numel()
                self.maxes[index, 0] = torch.maximum(self.maxes[index, 0], out.abs().max())
                if name in self.attention and self.spec.attention_logits is not None:
                    logits = self.spec.attention_logits(
                        module, tuple(_local(a) if isinstance(a, torch.Tensor) else a for a in args)
                    )
                    finite = torch.isfinite(logits)
                    self.maxes[index, 1] = torch.maximum(self.maxes[index, 1], logits[finite].max().double())
                    p = logits.softmax(-1)
                    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)  # (B, h, T)
                    self.sums[index, 2] += entropy.double().sum()
                    self.sums[index, 3] += entropy.numel()

        return hook

    def _unit_hook(self, name: str):
        def hook(module, args):
            if not self.active:
                return
            with torch.no_grad():
                h = _local(args[0]).detach().abs().flatten(0, -2).amax(0).double()
                peak = self.unit_peak.get(name)
                self.unit_peak[name] = h if peak is None else torch.maximum(peak, h)

        return hook

    # ---------------------------------------------------------------- sampled steps
    def on_step_start(self, trainer: RunView, step: int, data_index: int) -> None:
        self.active = (step + 1) % self.options.every == 0

    def on_after_backward(self, trainer: RunView, step: int) -> None:
        if not self.active:
            return
        for i, name in enumerate(self.names):
            module = self.modules.get(name)
            if module is None:
                continue
            params = [p for p in module.parameters() if p.requires_grad]
            self.grad_sq[i] = sum(
                (_sq(p.grad) for p in params if p.grad is not None),
                torch.zeros((), dtype=torch.float64, device=trainer.device),
            )
            self.weights[name] = [_local(p).detach().clone() for p in params]

    def on_step_end(self, trainer: RunView, result) -> None:
        if not self.active:
            return
        self.active = False
        n = len(self.names)
        update = torch.zeros(n, 2, dtype=torch.float64, device=trainer.device)  # |dw|^2, |w|^2
        for i, name in enumerate(self.names):
            module = self.modules.get(name)
            if module is None or name not in self.weights:
                continue
            params = [p for p in module.parameters() if p.requires_grad]
            for p, before in zip(params, self.weights[name]):
                r = _replicas(p)
                update[i, 0] += (_local(p).detach().double() - before.double()).pow(2).sum() / r
                update[i, 1] += before.double().pow(2).sum() / r
        units = torch.zeros(n, 2, dtype=torch.float64, device=trainer.device)  # dead units, units
        for i, name in enumerate(self.names):
            if name in self.unit_peak:
                peak = self.unit_peak[name]  # "dead": no output worth the name (silu(-30) is 1e-12, not 0)
                units[i, 0] = (peak <= DEAD_RELATIVE * peak.max()).sum()
                units[i, 1] = self.unit_peak[name].numel()
        summed = torch.cat([self.sums, self.grad_sq[:, None], update, units], dim=1)
        maxed = self.maxes
        if trainer.par.distributed:
            dist.all_reduce(summed)
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
        rows, peaks = summed.tolist(), maxed.tolist()  # the host sync of a sampled step
        if trainer.is_main:
            for name, s, m in zip(self.names, rows, peaks):
                record = {
                    "step": trainer.step,
                    "module": name,
                    "act_rms": math.sqrt(s[0] / s[1]) if s[1] else None,
                    "act_max_abs": m[0] if s[1] else None,
                    "grad_norm": math.sqrt(s[5]),
                    "update_ratio": math.sqrt(s[6] / s[7]) if s[7] else None,
                }
                if self.has_units[name]:
                    record["dead_frac"] = s[8] / s[9] if s[9] else None
                if self.is_attention[name]:
                    record["attn_logit_max"] = m[1] if s[3] else None
                    record["attn_entropy"] = s[2] / s[3] if s[3] else None
                trainer.run.append(FILE, record)
        self._reset(trainer.device)

    # ---------------------------------------------------------------- the end
    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        self._remove()
        if trainer.is_main and self.options.heatmap:
            plot_heatmap(trainer.run)

    def on_error(self, trainer: RunView, error: BaseException) -> None:
        self._remove()

    def _remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def plot_heatmap(run) -> None:
    """layer_stats.png: one module x step heat map per statistic."""
    records = run.read_jsonl(run.path / FILE)
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    modules = sorted({r["module"] for r in records}, key=_natural)
    steps = sorted({r["step"] for r in records})
    stats = [s for s in HEATMAP_STATS if any(r.get(s) is not None for r in records)]
    fig, axes = plt.subplots(
        len(stats), 1, figsize=(max(6, 0.15 * len(steps) + 3), 1.2 + 0.3 * len(modules) * len(stats)), squeeze=False
    )
    for ax, stat in zip(axes[:, 0], stats):
        grid = np.full((len(modules), len(steps)), np.nan)
        for r in records:
            if r.get(stat) is not None:
                grid[modules.index(r["module"]), steps.index(r["step"])] = r[stat]
        if stat in ("grad_norm", "update_ratio"):  # a zero (a frozen or dead group) is drawn blank, not -inf
            grid = np.log10(np.where(grid > 0, grid, np.nan))
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(stat + (" (log10)" if stat in ("grad_norm", "update_ratio") else ""), fontsize=9)
        ax.set_yticks(range(len(modules)), modules, fontsize=7)
        ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
        ax.set_xticks(ticks, [steps[i] for i in ticks], fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.03)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(run.path / "layer_stats.png", dpi=100)
    plt.close(fig)


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.replace(".", " ").split()]
