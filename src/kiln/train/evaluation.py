"""The loop's evaluation: held-out loss, perplexity and accuracy every `eval.every` steps and at
the end (into eval.jsonl and the summary), and the `[eval] suites` at the same steps (into
eval/step-N.json). A part of the loop, not a callback: Trainer.fit runs it at its place in the
step and tells the callbacks (`on_eval`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from kiln.data.loader import WindowShare
from kiln.eval.lm import evaluate_windows
from kiln.train.step_api import LoopView


class Evaluation:
    name = "evaluation"  # `callbacks.disabled = ["evaluation"]` leaves it out

    def __init__(self) -> None:
        self.last: dict[str, Any] | None = None

    def due(self, trainer: LoopView, step: int) -> bool:
        every = trainer.cfg.eval.every
        return step >= trainer.total_steps or (bool(every) and step % every == 0)

    def finish(self, trainer: LoopView, summary: dict[str, Any]) -> dict[str, Any] | None:
        """At the run's end: its last evaluation's figures into `summary`; the new record if the
        loop ended without one at this step (a finished run resumed), else None."""
        record = None
        if self.last is None or self.last["step"] != trainer.step:
            record = self.evaluate(trainer)
        assert self.last is not None
        summary.update({k: v for k, v in self.last.items() if k not in ("step", "tokens")})
        return record

    def evaluate(self, trainer: LoopView) -> dict[str, Any]:
        module, par = trainer.module, trainer.par
        with trainer.paused("evaluation"):
            module.train(False)
            try:

                def run(share: WindowShare) -> dict[str, Any]:
                    return evaluate_windows(
                        module.eval_step,
                        share,
                        module.objective,
                        trainer.eval_batch,
                        trainer.device,
                        seed=trainer.cfg.train.seed,
                        reduce=par.data_sum if par.distributed else None,
                        holds_loss=module.holds_loss,
                    )

                metrics = run(trainer.val) if not trainer.source_val else mixture_metrics(trainer, run)
                for name, share in trainer.extra_val.items():  # e.g. text_only_val_loss: the images withheld
                    metrics.update({f"{name}_{k}": v for k, v in run(share).items() if k in ("val_loss", "val_ppl")})
                record = {
                    "step": trainer.step,
                    "tokens": trainer.tokens_seen,
                    **metrics,
                    **run_training_suites(trainer),
                }
            finally:
                module.train(True)
            if trainer.is_main:
                trainer.run.log_eval(record)
        self.last = record
        return record


def mixture_metrics(trainer: LoopView, run: Callable[[WindowShare], dict[str, Any]]) -> dict[str, Any]:
    """A mixture's validation: each source's metrics as `<metric>/<source>`, and the overall
    ones their mean weighted by the sources' `weight` (the configured mix, not a stage's, so the
    figure is comparable along the run): val_ppl is exp of the weighted val_loss."""
    per = {name: run(share) for name, (share, _) in trainer.source_val.items()}
    total = sum(weight for _, weight in trainer.source_val.values())
    out: dict[str, Any] = {}
    for key in ("val_loss", "val_acc", "val_masked_acc", "majority_baseline"):
        if all(key in m for m in per.values()):
            out[key] = sum(weight * per[name][key] for name, (_, weight) in trainer.source_val.items()) / total
    out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    out["val_tokens"] = sum(int(m["val_tokens"]) for m in per.values())
    for name, m in per.items():
        out.update({f"{k}/{name}": v for k, v in m.items() if k in ("val_loss", "val_ppl", "val_acc", "val_tokens")})
    return out


def run_training_suites(trainer: LoopView) -> dict[str, Any]:
    """`[eval] suites` at one of the trainer's evaluations: the report goes to eval/step-N.json
    (rank 0), and its numbers come back flat ("suite/metric") for eval.jsonl. All ranks run the
    suites in step (a sharded model's forward needs every rank); only rank 0 writes."""
    from kiln.eval.runner import run_suites, save_report
    from kiln.eval.suites import EvalContext

    names = trainer.cfg.eval.suites
    if not names or not trainer.module.whole_model or trainer.par.dims.tp > 1:
        return {}  # pipeline stages / tensor shards hold parts of the model: run `kiln eval` on the checkpoint
    ctx = EvalContext(
        trainer.cfg,
        trainer.module.model,
        trainer.data.tokenizer,
        trainer.device,
        trainer.module.autocast,
        run_dir=trainer.run.path,
        step=trainer.step,
        prepared=trainer.data,
    )
    report = run_suites(ctx, list(names))
    if trainer.is_main:
        save_report(trainer.run.path, report)
    return {f"{s}/{k}": v for s, metrics in report["suites"].items() for k, v in metrics.items()}
