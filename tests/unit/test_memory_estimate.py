"""The start-up memory estimate divides states by the shards that hold them."""

from kiln.config import load_config
from kiln.model.registry import get_spec
from kiln.model.specs import model_params
from kiln.parallel.memory import estimate_memory
from kiln.parallel.mesh import ParallelDims


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
