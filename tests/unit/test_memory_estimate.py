"""The start-up memory estimate divides states by the shards that hold them, and is `kiln plan`'s
memory model (kiln.plan.peak_memory) at the run's own layout."""

import pytest

from kiln.config import load_config
from kiln.model.registry import get_spec
from kiln.model.transformer_spec import model_params
from kiln.parallel.mesh import ParallelDims
from kiln.plan.peak_memory import estimate_memory


def dims(world, **kw):
    cfg = load_config(
        "gpt2-124m", overrides=["model.tie_embeddings=false"] + [f"parallel.{k}={v}" for k, v in kw.items()]
    )
    return cfg, ParallelDims.from_config(cfg.parallel, world)


def test_single_process_states_are_16_bytes_per_parameter():
    cfg, d = dims(1)
    est = estimate_memory(cfg, get_spec("decoder"), 50257, d, "bf16")
    n = model_params(cfg.model, 50257)
    assert 120e6 < n < 170e6
    assert est.params == 4 * n and est.grads == 4 * n and est.optimizer == 8 * n
    assert est.activations > 0 and "expected memory per rank" in est.describe()


def test_sharding_divides_states_and_tp_divides_activations():
    cfg, one = dims(1)
    _, fsdp = dims(8)
    _, tp = dims(8, tp=2)
    base = estimate_memory(cfg, get_spec("decoder"), 50257, one, "bf16")
    sharded = estimate_memory(cfg, get_spec("decoder"), 50257, fsdp, "bf16")
    assert abs(sharded.params * 8 - base.params) < 1e-6 * base.params
    both = estimate_memory(cfg, get_spec("decoder"), 50257, tp, "bf16")
    assert both.params == sharded.params  # 4 x 2 shards = 8 shards either way


def test_activation_checkpointing_shrinks_activations():
    cfg, d = dims(1)
    full = estimate_memory(
        load_config("gpt2-124m", overrides=["parallel.activation_checkpoint=full"]),
        get_spec("decoder"),
        50257,
        d,
        "bf16",
    )
    none = estimate_memory(cfg, get_spec("decoder"), 50257, d, "bf16")
    assert full.activations < 0.6 * none.activations  # block activations go; the logits stay


# --- one memory model: the start-up printout is `kiln plan`'s model at the run's own layout


def plan_peak(cfg, layout, precision="bf16"):
    from kiln.plan.peak_memory import model_facts, peak_memory

    return peak_memory(model_facts(cfg, cfg.data.vocab_size, precision), layout)


def printout(cfg, world, precision="bf16", grad_sync="every_microbatch"):
    d = ParallelDims.from_config(cfg.parallel, world)
    return estimate_memory(cfg, get_spec(cfg.model.family), cfg.data.vocab_size, d, precision, grad_sync)


def test_the_printout_is_kiln_plans_peak_for_an_fsdp_layout():
    """gpt2-124m on 8 FSDP shards, 512 sequences a step at 16 a micro-batch: the printout's numbers
    are the planner's for the layout it would write for that run, and `kiln plan`'s search scores
    that very layout the same."""
    from kiln.plan.cluster import load_cluster
    from kiln.plan.layout import Layout
    from kiln.plan.search import search

    cfg = load_config("gpt2-124m")
    for sync in ("every_microbatch", "last_microbatch"):
        est = printout(cfg, 8, grad_sync=sync)
        assert est == plan_peak(cfg, Layout(1, 8, 1, 1, 16, 4, grad_sync=sync))
        assert est.gathered > 0 and est.phase == "loss"
    assert printout(cfg, 8, grad_sync="last_microbatch").grads == 8 * printout(cfg, 8).grads  # whole until the step
    tiny = load_config("tiny", overrides=["train.micro_batch_size=4", "parallel.activation_checkpoint=full"])
    layout = Layout(1, 4, 1, 1, 4, tiny.global_batch // 4 // 4, "full")
    planned = {c.layout: c.memory for c in search(tiny, tiny.data.vocab_size, load_cluster("h100:4")).plans}
    assert printout(tiny, 4) == planned[layout]
    line = printout(tiny, 4).describe()
    assert line.startswith("expected memory per rank") and f"total ~{planned[layout].total / 2**30:.2f} GiB" in line


def test_the_printout_counts_low_bit_optimizer_states():
    """adamw8bit / adamw4bit: torchao's codes and block scales, not 8 bytes a parameter, in the
    printout and in the planner alike."""
    from kiln.plan.layout import Layout
    from kiln.plan.peak_memory import optimizer_state_bytes

    base = load_config("gpt2-124m", overrides=["model.tie_embeddings=false"])
    n = model_params(base.model, base.data.vocab_size)
    full = printout(base, 4)
    for name, most in (("adamw8bit", 0.27), ("adamw4bit", 0.15)):
        cfg = load_config("gpt2-124m", overrides=["model.tie_embeddings=false", f"optim.name={name}"])
        est = printout(cfg, 4)
        assert est == plan_peak(cfg, Layout(1, 4, 1, 1, 16, 8))
        assert est.params == full.params and est.optimizer < most * full.optimizer
        assert est.optimizer * 4 > 2 * n * (1 if name == "adamw8bit" else 0.5)  # at least the codes
    assert optimizer_state_bytes("adamw", 1 << 20) == 8 << 20
    assert optimizer_state_bytes("adamw8bit", 100) == 800  # under 4,096 values: float32 moments


def test_low_bit_state_bytes_match_torchao():
    """The per-tensor formula against the buffers torchao allocates (no optimizer step: no compile)."""
    pytest.importorskip("torchao")
    import torch
    from torchao.optim import AdamW4bit, AdamW8bit

    from kiln.kernels.ao import stored_bytes
    from kiln.plan.peak_memory import optimizer_state_bytes

    for name, cls in (("adamw8bit", AdamW8bit), ("adamw4bit", AdamW4bit)):
        for shape in ((4096,), (384, 128), (100, 50), (4096, 3)):
            p = torch.nn.Parameter(torch.zeros(shape))
            opt = cls([p])
            held = sum(stored_bytes(opt._new_buffer(p, signed)) for signed in (True, False))
            assert optimizer_state_bytes(name, p.numel()) == held, (name, shape)


def test_the_printout_is_kiln_plans_peak_for_moe_and_pipelines():
    """moe-tiny with experts split over 2 of 4 FSDP ranks (a rank holds a quarter of the experts
    either way), and a two-stage 1F1B pipeline: the planner's numbers, and its phase."""
    from kiln.plan.layout import Layout

    moe = load_config("moe-tiny", overrides=["parallel.ep=2", "train.micro_batch_size=2"])
    est = printout(moe, 4, "fp32")
    assert est == plan_peak(moe, Layout(1, 4, 1, 1, 2, 2), "fp32")
    assert est.params * 4 == printout(load_config("moe-tiny"), 1, "fp32").params
    piped = load_config("tiny", overrides=["parallel.pp=2", "parallel.pp_microbatches=4"])
    est = printout(piped, 2)
    assert est == plan_peak(piped, Layout(1, 1, 1, 2, piped.global_batch // 4, 4, "none", "1f1b"))
    assert "expected memory per rank" in est.describe() and est.activations > 0
