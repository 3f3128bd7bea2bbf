"""Samples at the end of a run: generations from `eval.prompts` (samples.txt and the summary)."""

from __future__ import annotations

from typing import Any

import torch

from kiln.train.callbacks.base import Callback
from kiln.train.step_api import RunView, loop_view


class Samples(Callback):
    """Generations from `eval.prompts` at the end of a run (an encoder fills masks in a held-out
    window instead); every rank generates in lockstep (a sharded forward needs them all) and
    rank 0 writes samples.txt."""

    name = "samples"

    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        samples = self.samples(trainer)
        summary["sample"] = samples[0] if samples else None

    def samples(self, trainer: RunView) -> list[dict[str, str]]:
        from kiln.eval.fill import fill_mask_demo
        from kiln.eval.generate import sample_prompts

        module, cfg, loop = trainer.module, trainer.cfg, loop_view(trainer)
        if not module.whole_model or trainer.par.dims.tp > 1:
            # Pipeline stages hold parts of the model, and sequence parallelism needs lengths
            # divisible by tp: sample from the checkpoint with `kiln sample` instead.
            return []
        tok = loop.data.tokenizer
        if module.objective.name == "multimodal":  # caption held-out images
            from kiln.eval.caption import caption_samples

            out = caption_samples(
                module.model,
                loop.val.windows[0],
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
                    loop.val.windows[0],
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
