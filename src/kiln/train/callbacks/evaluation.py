"""Evaluation during training: held-out loss, perplexity and accuracy every `eval.every` steps
and at the end (into eval.jsonl and the summary), the `[eval] suites` at the same steps (into
eval/step-N.json), and the samples of the end of a run (samples.txt)."""

from __future__ import annotations

import math
from typing import Any

import torch

from kiln.eval.lm import evaluate_windows
from kiln.train.callbacks.base import Callback


class Evaluation(Callback):
    name = "evaluation"
    order = 20

    def __init__(self, options: Any = None):
        super().__init__(options)
        self.last: dict[str, Any] | None = None

    def due(self, trainer, step: int) -> bool:
        every = trainer.cfg.eval.every
        return step >= trainer.total_steps or (bool(every) and step % every == 0)

    def syncs_at(self, trainer, step: int) -> bool:
        return self.due(trainer, step)

    def on_step_complete(self, trainer) -> None:
        if self.due(trainer, trainer.step):
            self.evaluate(trainer)

    def on_run_end(self, trainer, summary: dict[str, Any]) -> None:
        last = self.last
        if last is None or last["step"] != trainer.step:  # the loop ended elsewhere (a finished run)
            last = self.evaluate(trainer)  # (which is self.last now)
        summary.update({k: v for k, v in last.items() if k not in ("step", "tokens")})

    def evaluate(self, trainer) -> dict[str, Any]:
        module, par = trainer.module, trainer.par
        with trainer.paused("evaluation"):
            module.train(False)
            try:

                def run(share):
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
        trainer.callbacks.on_eval(trainer, record)
        return record


def mixture_metrics(trainer, run) -> dict[str, Any]:
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


def run_training_suites(trainer) -> dict[str, Any]:
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


class Samples(Callback):
    """Generations from `eval.prompts` at the end of a run (an encoder fills masks in a held-out
    window instead); every rank generates in lockstep (a sharded forward needs them all) and
    rank 0 writes samples.txt."""

    name = "samples"
    order = 35

    def on_run_end(self, trainer, summary: dict[str, Any]) -> None:
        samples = self.samples(trainer)
        summary["sample"] = samples[0] if samples else None

    def samples(self, trainer) -> list[dict[str, str]]:
        from kiln.eval.fill import fill_mask_demo
        from kiln.eval.generate import sample_prompts

        module, cfg = trainer.module, trainer.cfg
        if not module.whole_model or trainer.par.dims.tp > 1:
            # Pipeline stages hold parts of the model, and sequence parallelism needs lengths
            # divisible by tp: sample from the checkpoint with `kiln sample` instead.
            return []
        tok = trainer.data.tokenizer
        if module.objective.name == "multimodal":  # caption held-out images
            from kiln.eval.caption import caption_samples

            out = caption_samples(
                module.model,
                trainer.val.windows[0],
                tok,
                trainer.device,
                module.autocast,
                max_tokens=cfg.eval.sample_tokens,
            )
            text = "".join(f"=== {s['prompt']}\n{s['text']}\n(data: {s['reference']})\n\n" for s in out)
        elif not trainer.spec.causal:  # an encoder does not generate: show it filling masks instead
            out = [
                fill_mask_demo(
                    module.model,
                    trainer.val.windows[0],
                    module.objective,
                    tok,
                    trainer.device,
                    module.autocast,
                    cfg.train.seed,
                )
            ]
            text = f"=== {out[0]['prompt']}\n{out[0]['text']}\n"
        else:
            gen = torch.Generator().manual_seed(cfg.train.seed)
            texts = sample_prompts(
                module.model,
                tok,
                cfg.eval.prompts,
                cfg.eval.sample_tokens,
                cfg.model.seq_len,
                trainer.device,
                module.autocast,
                temperature=cfg.eval.temperature,
                top_k=cfg.eval.top_k,
                generator=gen,
                stop=False,
            )
            out = [{"prompt": p, "text": t} for p, t in zip(cfg.eval.prompts, texts)]
            text = "".join(f"=== {s['prompt']!r}\n{s['text']}\n\n" for s in out)
        if trainer.is_main:
            trainer.run.write_text("samples.txt", text)
        return out
