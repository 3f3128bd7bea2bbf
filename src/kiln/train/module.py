"""The train module: what one optimizer step does to the model, apart from the loop around it.

It holds the model parts (the whole model, or this rank's pipeline stages), their optimizers,
the objective and the pipeline schedule, and offers

    forward_backward(batch, on_loss) -> loss     gradient accumulation, or a pipeline schedule
    clip_grad_norm(max_norm) -> norm              over every shard and stage
    optimizer_step(lr, discard)                   a flagged update is discarded on the device
    eval_step(inputs, targets) -> totals          (loss sum, correct, count) of one batch

so a new objective or another schedule changes this module only; mixture-of-experts layers get
their per-step balancing update here (kiln.model.moe.finish_step). The loop (kiln.train.trainer)
never touches a model part directly.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import Config
from kiln.data.loader import rank_share
from kiln.errors import ConfigError
from kiln.eval.lm import tally_predictions
from kiln.kernels import registry as kernels
from kiln.model import moe
from kiln.model.spec import padded_vocab
from kiln.objectives import IGNORE, Batch, Objective, predicted_positions, to_device, z_loss_sum
from kiln.parallel import pipeline as pp
from kiln.parallel.apply import set_gradient_sync
from kiln.parallel.runtime import Parallel
from kiln.train.optim import set_lr
from kiln.train.precision import autocast_for

LossHook = Callable[[torch.Tensor], torch.Tensor]


def _root(t: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor whose storage `t` views (itself if it is no view)."""
    return t if t is None or t._base is None else t._base


class TrainModule:
    def __init__(
        self,
        cfg: Config,
        par: Parallel,
        parts: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        objective: Objective,
        precision: str,
        micro_batch: int,
        stage_ids: list[int] | None = None,
        n_stages: int = 1,
        grad_sync: str = "every_microbatch",
    ):
        self.cfg, self.par, self.parts, self.optimizers = cfg, par, parts, optimizers
        self.objective, self.precision, self.micro_batch = objective, precision, micro_batch
        self.stage_ids, self.n_stages = stage_ids or [0], n_stages
        self.schedule = None  # set by `attach_schedule` when parallel.pp > 1
        self.grad_sync = grad_sync  # under accumulation: parallel.grad_sync, resolved (kiln.plan.peak_memory)
        # Compile forward and loss together: the loss's log-softmax then fuses with the output
        # projection's epilogue instead of materialising float32 logits (see BENCHMARKS.md).
        self.forward_loss = torch.compile(self._forward_loss) if cfg.train.compile else self._forward_loss
        # optimizers that read a discard flag on the device (torch's fused ones, MuonAdamW)
        self._fused = all(opt.defaults.get("fused") or getattr(opt, "skips_on_device", False) for opt in optimizers)
        self._loss_scale = torch.ones((), device=par.device)  # 1 / global predicted tokens of this step
        self._on_loss: LossHook | None = None  # the callbacks' loss hook during a pipeline step
        self._step_targets: torch.Tensor | None = None  # ... and the targets of that step
        self._eval_totals: torch.Tensor | None = None  # set while a pipeline evaluation runs
        self.z_coef = cfg.train.z_loss
        self._z_total = torch.zeros((), device=par.device)  # this step's z-loss term (scaled), this rank
        self.z_mean: torch.Tensor | None = None  # mean log(Z)^2 per predicted token of the last step
        self.chunk = self._chunked_loss(cfg, parts, objective)  # tokens per chunk, 0 = the naive head
        # a masked objective predicts a few positions: a family that can, computes the head there only
        self.predict_only = (
            objective.masked and par.dims.pp == 1 and "predict" in inspect.signature(parts[0].forward).parameters
        )
        # The head over the tokenizer's vocabulary only (the padding rows of the output matrix take no
        # probability): cutting the matrix's rows costs nothing, cutting the logits a float32 copy
        # (+60% of the loss's time at 4k tokens x 4k vocabulary). Where the family takes no head hook
        # or the head is split by tensor parallelism, the loss cuts the logits instead.
        vocab = objective.vocab_size
        cut = (
            par.dims.tp == 1
            and par.dims.pp == 1
            and "head" in inspect.signature(parts[0].forward).parameters
            and padded_vocab(vocab) > vocab
        )
        self._vocab_head = {"head": lambda h, w: F.linear(h, w[:vocab])} if cut else {}
        self.has_moe = bool(moe.moe_layers(parts))
        self.routing: dict[str, torch.Tensor] = {}  # the last step's MoE routing statistics (device tensors)
        self.optimizer_groups: list[dict[str, Any]] = []  # [[optim.groups]] over the whole model (optim_groups)
        if self.has_moe:  # the routers' auxiliary losses are averaged over a step's micro-batches
            n_micro = cfg.parallel.pp_microbatches if par.dims.pp > 1 else None
            local = rank_share(cfg.global_batch, par.dp[0], par.dims.dp_size, cfg.parallel.dp_batch_shares)[0]
            moe.set_micro_batches(parts, n_micro or max(1, -(-local // micro_batch)))

    @staticmethod
    def _chunked_loss(cfg: Config, parts: list[nn.Module], objective: Objective) -> int:
        """`kernels.cross_entropy = "chunked"`: check it applies here; the chunk size, or 0."""
        if cfg.kernels.cross_entropy != "chunked":
            return 0
        where = "kernels.cross_entropy = 'chunked'"
        if cfg.parallel.tp > 1 or cfg.parallel.pp > 1:
            raise ConfigError(
                f"{where} works with parallel.tp = 1 and parallel.pp = 1 for now; set kernels.cross_entropy = 'naive'"
            )
        if "head" not in inspect.signature(parts[0].forward).parameters:
            raise ConfigError(
                f"{where}: model.family = '{cfg.model.family}' takes no loss head in its forward; "
                "set kernels.cross_entropy = 'naive'"
            )
        if type(objective).loss_sum is not Objective.loss_sum:
            raise ConfigError(
                f"{where}: train.objective = '{cfg.train.objective}' has a loss of its own, not "
                "cross-entropy; set kernels.cross_entropy = 'naive'"
            )
        return cfg.kernels.chunk_size

    def attach_schedule(self) -> None:
        self.schedule = pp.build_schedule(
            self.parts, self.stage_ids, self.n_stages, self.par, self.cfg, self._pipeline_loss
        )

    # ---------------------------------------------------------------- views
    @property
    def model(self) -> nn.Module:
        """The whole model (not available when pipeline stages are spread over ranks)."""
        if len(self.parts) != 1 or self.par.dims.pp > 1:
            raise RuntimeError("the model is split into pipeline stages")
        return self.parts[0]

    @property
    def whole_model(self) -> bool:
        return self.par.dims.pp == 1

    @property
    def device(self) -> torch.device:
        return self.par.device

    @property
    def autocast(self) -> Callable[[], contextlib.AbstractContextManager]:
        return autocast_for(self.device, self.precision)

    @property
    def loss_scale(self) -> torch.Tensor:
        """1 / the predicted tokens of the last step's global batch (a device scalar): what that
        step's losses were divided by (read by the invariants callback)."""
        return self._loss_scale

    @property
    def holds_loss(self) -> bool:
        """This rank computes the loss (no pipeline, or it holds the last stage)."""
        return self.schedule is None or pp.has_last_stage(self.stage_ids, self.n_stages)

    def parameters(self) -> list[torch.Tensor]:
        return [p for part in self.parts for p in part.parameters()]

    def named_modules(self):
        for part in self.parts:
            yield from part.named_modules()

    def named_parameters(self):
        for part in self.parts:
            yield from part.named_parameters()

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    # ---------------------------------------------------------------- one step
    def _forward_loss(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        extras: dict[str, torch.Tensor],
        predict: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(summed objective loss, summed z-loss term or None when train.z_loss is off).
        `predict`: flat positions for a masked head (`predicted_positions`), computed there only."""
        vocab = self.objective.vocab_size  # the head's rows past it are padding: no probability
        if self.chunk:
            ce, z = self.model(
                inputs, **extras, head=lambda h, w: kernels.linear_cross_entropy(h, w[:vocab], targets, self.chunk)
            )
            return ce, (z if self.z_coef else None)
        if predict is not None:
            # the head over the predicted positions only (~15%): 2.1x on bert-tiny (CPU)
            logits = self.model(inputs, **extras, predict=predict)[None]  # (1, N, vocab)
            targets = targets.flatten()[predict][None]
        else:
            logits = self.model(inputs, **extras, **self._vocab_head)
        return self.objective.loss_sum(logits, targets), (z_loss_sum(logits, targets, vocab) if self.z_coef else None)

    def _pipeline_loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._eval_totals is not None:  # a forward-only evaluation pass
            return tally_predictions(self._eval_totals, output, targets, self.objective)
        # The schedule also calls this function once to infer gradient shapes when it (re)builds its
        # stages, on a detached copy of the first target chunk; callbacks see only the micro-batches,
        # whose targets are chunks (views) of the step's targets.
        real = _root(targets) is _root(self._step_targets)
        z = z_loss_sum(output, targets, self.objective.vocab_size) if self.z_coef else None
        loss, _ = self._scaled_loss(self.objective.loss_sum(output, targets), z, self._on_loss if real else None, real)
        return loss

    def _scaled_loss(
        self, loss_sum: torch.Tensor, z_sum: torch.Tensor | None, on_loss: LossHook | None, record: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(what backward takes, the reported loss) of one micro-batch's summed loss and z-loss: both
        scaled by 1 / the step's predicted tokens; the z-loss trains but is not reported (its scaled
        sum goes to `z_mean` when `record`); x data-parallel size, as FSDP averages gradients."""
        loss = loss_sum * self._loss_scale
        if on_loss is not None:
            loss = on_loss(loss)
        reported = loss.detach()
        if z_sum is not None:
            z = z_sum * self._loss_scale
            if record:
                self._z_total = self._z_total + z.detach()
            loss = loss + self.z_coef * z
        dp = self.par.dims.dp_size
        return (loss * dp if dp != 1 else loss), reported

    def forward_backward(self, batch: Batch, on_loss: LossHook | None = None) -> torch.Tensor:
        """Accumulate this rank's gradients for `batch`; returns the step's mean loss per predicted
        token over the global batch, on the device (no host sync)."""
        par = self.par
        host_targets = batch.targets  # made on the host: the masked head's positions are read there
        batch = batch.to(self.device)
        inputs, targets = batch.inputs, batch.targets
        # Normalise by the tokens predicted in the whole global batch, so accumulation and data
        # parallelism give the gradient of the same mean loss.
        n_predicted = par.data_sum((targets != IGNORE).sum().float()) / par.dims.pp
        self._loss_scale = 1.0 / n_predicted.clamp(min=1)
        dp_scale = par.dims.dp_size  # FSDP averages gradients; scaling by dp size turns that into a sum
        self._z_total = torch.zeros((), device=self.device)
        if self.schedule is not None:
            losses: list[torch.Tensor] = []
            self._on_loss, self._step_targets = on_loss, targets
            try:
                with self.autocast():
                    first = pp.has_first_stage(self.stage_ids)
                    self.schedule.step(
                        *((inputs,) if first else ()), target=targets if self.holds_loss else None, losses=losses
                    )
            finally:
                self._on_loss, self._step_targets = None, None
            total = (
                torch.stack(losses).detach().sum() / dp_scale - self.z_coef * self._z_total
                if losses
                else torch.zeros((), device=self.device)
            )
        else:
            total = torch.zeros((), device=self.device)
            starts = range(0, inputs.shape[0], self.micro_batch)
            for i in starts:
                if len(starts) > 1 and dp_scale > 1:  # gradient accumulation: reduce on the last one only
                    set_gradient_sync(self.parts, i == starts[-1], self.grad_sync)
                micro = batch.rows(i, i + self.micro_batch)
                predict = None
                if self.predict_only:
                    predict = to_device(predicted_positions(host_targets[i : i + self.micro_batch]), self.device)
                with self.autocast():
                    loss, z = self.forward_loss(micro.inputs, micro.targets, micro.extras, predict)
                loss, reported = self._scaled_loss(loss, z, on_loss, record=True)
                total += reported
                loss.backward()
        if not par.distributed:
            self.z_mean = self._z_total if self.z_coef else None
            return total
        if self.z_coef:  # one reduction for both numbers
            total, self.z_mean = par.data_sum(torch.stack([total, self._z_total])).unbind()
            return total
        return par.data_sum(total)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return self.par.clip_grad_norm(self.parameters(), max_norm if max_norm > 0 else float("inf"))

    def optimizer_step(self, lr: float, discard: torch.Tensor | None = None) -> None:
        """Step every optimizer at `lr`; a `discard` flag of 1 drops the update (inside the fused
        kernel, without a host sync; other optimizers read the flag on the host)."""
        for opt in self.optimizers:
            set_lr(opt, lr)
            if discard is not None and self._fused:
                opt.found_inf = discard  # type: ignore[attr-defined]  # read by torch's fused step (getattr): skips the update
                opt.step()
            elif discard is None or not discard.item():
                opt.step()
            opt.zero_grad(set_to_none=True)
        if self.has_moe:  # balancing bias and routing statistics from the whole step's counts
            self.routing = moe.finish_step(self.parts, self.par.dp_sum, discard)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def eval_step(self, inputs: torch.Tensor, targets: torch.Tensor, **extras: torch.Tensor) -> torch.Tensor:
        """(loss sum, correct, count) of one batch in float64 on the device; zeros on a pipeline
        rank without the last stage. `extras` are the batch's further model inputs (images)."""
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        if self.schedule is None:
            with self.autocast():
                logits = self.model(inputs, **{k: v.to(self.device) for k, v in extras.items()})
            tally_predictions(totals, logits, targets, self.objective)
            return totals
        self._eval_totals = totals
        try:
            with self.autocast():
                self.schedule.eval(
                    *((inputs,) if pp.has_first_stage(self.stage_ids) else ()),
                    target=targets if self.holds_loss else None,
                )
        finally:
            self._eval_totals = None
        return totals
