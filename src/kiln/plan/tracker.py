"""The memory model's referee: one rank's peak over two training steps, measured by PyTorch's
FSDPMemTracker (MemTracker without FSDP) on fake tensors and a fake process group of the layout's
world size: Kiln's own model, parallelised by Kiln's own code, with no device and no memory.

The process group is process-wide, so call this in a process of its own (the tests and the
benchmark run it in a subprocess). Pipeline layouts are not measured: the tracker follows one
module tree through forward and backward, not a schedule's interleaving.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.config import Config
from kiln.plan.layout import Layout


def _loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, bf16: bool) -> torch.Tensor:
    # as the trainer does it: the logits are no longer referenced once the loss exists
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")


def measured_peak(cfg: Config, layout: Layout, vocab_size: int) -> dict[str, float]:
    """Bytes at the peak by the tracker's categories, plus "Total"."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from kiln.model.registry import build_model, get_spec
    from kiln.model.spec import padded_vocab
    from kiln.parallel.apply import parallelize
    from kiln.parallel.mesh import ParallelDims

    if layout.pp > 1:
        raise ValueError("the tracker measures layouts without pipeline parallelism")
    if not dist.is_initialized():
        dist.init_process_group("fake", rank=0, world_size=layout.world, store=FakeStore())
    elif dist.get_world_size() != layout.world:
        raise ValueError("one world size per process: the fake group is already set up")
    vocab = padded_vocab(vocab_size)
    dims = ParallelDims(layout.dp_replicate, layout.dp_shard, layout.tp, 1, layout.world)
    spec = get_spec(cfg.model.family)
    with torch.device("meta"):
        model = build_model(cfg.model, vocab)
    if layout.world > 1:
        cfg.parallel.activation_checkpoint = layout.ac
        parallelize(model, spec, cfg, dims, dims.build_mesh("cpu"))
    elif layout.ac != "none":
        from kiln.parallel.apply import apply_activation_checkpointing

        apply_activation_checkpointing(spec.block_list(model), layout.ac)
    bf16 = cfg.train.precision == "bf16"
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        # single-tensor AdamW: the fused kernels keep no temporaries, but under fake tensors they are
        # decomposed into whole-list operations whose temporaries a real step never allocates
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        shape = (layout.micro_batch, cfg.model.seq_len)
        inputs, targets = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
        fsdp = layout.dp_shard > 1 or layout.dp_replicate > 1
        tracker = FSDPMemTracker(model, opt) if fsdp else MemTracker()
        if isinstance(tracker, FSDPMemTracker):  # fsdp
            tracker.track_inputs((inputs,))
        else:
            tracker.track_external(model, opt)
        with tracker:
            for step in range(2):
                for micro in range(layout.accum):
                    if step or micro:  # the trackers refuse a module called twice without this
                        tracker.reset_mod_stats()
                    _loss(model, inputs, targets, bf16).backward()
                opt.step()
                opt.zero_grad()
        peak = tracker.get_tracker_snapshot("peak")
    out: dict[str, float] = {}
    for per_device in peak.values():
        for kind, value in per_device.items():
            name = str(kind).rsplit(".", 1)[-1]
            out[name] = out.get(name, 0.0) + float(value)
    return out
