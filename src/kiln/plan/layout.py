"""A parallel layout: the degrees, micro-batching, activation checkpointing and pipeline schedule
of one candidate plan, and the `--set` lines that make `kiln train` run it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    micro_batch: int  # sequences per forward pass per rank
    accum: int  # micro-batches per optimizer step per rank (on a pipeline: parallel.pp_microbatches)
    ac: str = "none"  # none | selective | full
    schedule: str = "1f1b"  # pipeline schedule (pp > 1)
    stages_per_rank: int = 1  # interleaved-1f1b: virtual stages per rank
    stage_layers: tuple[int, ...] = ()  # layers per pipeline stage; () = an even split
    grad_sync: str = "every_microbatch"  # FSDP's reduce-scatter under accumulation (parallel.grad_sync)

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    def layers_per_stage(self, n_layers: int) -> list[int]:
        """Each pipeline stage's blocks (all of them on one stage without a pipeline)."""
        if self.stage_layers:
            return list(self.stage_layers)
        stages = self.pp * (self.stages_per_rank if self.schedule == "interleaved-1f1b" else 1)
        base, extra = divmod(n_layers, stages)
        return [base + 1] * extra + [base] * (stages - extra)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def sets(self) -> list[str]:
        out = [
            f"parallel.dp_replicate={self.dp_replicate}",
            f"parallel.dp_shard={self.dp_shard}",
            f"parallel.tp={self.tp}",
            f"parallel.pp={self.pp}",
            f"parallel.activation_checkpoint={self.ac}",
        ]
        if self.pp > 1:
            out += [f"parallel.pp_schedule={self.schedule}", f"parallel.pp_microbatches={self.accum}"]
            if self.schedule == "interleaved-1f1b":
                out.append(f"parallel.pp_stages_per_rank={self.stages_per_rank}")
            # `[]` for an even split too: a pp_layers already in the user's config must not survive
            out.append(f"parallel.pp_layers=[{','.join(map(str, self.stage_layers))}]")
        else:
            out += [f"train.micro_batch_size={self.micro_batch}", f"parallel.grad_sync={self.grad_sync}"]
        return out

    def describe(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in ("dp_replicate", "dp_shard", "tp", "pp") if getattr(self, n) > 1]
        parts.append(f"micro-batch {self.micro_batch} x {self.accum}")
        if self.ac != "none":
            parts.append(f"AC {self.ac}")
        if self.grad_sync == "last_microbatch":
            parts.append("gradients reduced once a step")
        if self.pp > 1:
            parts.append(self.schedule + (f" x{self.stages_per_rank}" if self.stages_per_rank > 1 else ""))
            if self.stage_layers:
                parts.append("layers " + "/".join(map(str, self.stage_layers)))
        return ", ".join(parts) if parts else "single process"
