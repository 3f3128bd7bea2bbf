"""The explicit bf16 attention used on CPU computes what SDPA computes, and is chosen only
where it was measured faster."""

import pytest
import torch
import torch.nn.functional as F

from kiln.model.layers import SHORT_CONTEXT, bf16_attention, cpu_bf16_short


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_matches_float64_attention(causal, kv_heads):
    g = torch.Generator().manual_seed(kv_heads + 10 * causal)
    q = torch.randn(2, 4, 48, 16, generator=g)
    k = torch.randn(2, kv_heads, 48, 16, generator=g)
    v = torch.randn(2, kv_heads, 48, 16, generator=g)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, enable_gqa=kv_heads != 4)
    out = bf16_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal).double()
    assert out.shape == ref.shape
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2  # bf16 operands


def test_gradients_flow_like_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    ref = [t.grad.clone() for t in (q, k, v)]
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    bf16_attention(qb, kb, vb, True).float().sum().backward()
    for got, want in zip((qb.grad, kb.grad, vb.grad), ref):
        assert ((got.double() - want).norm() / want.norm()).item() < 3e-2


def test_chosen_only_for_short_bf16_contexts_on_cpu():
    assert cpu_bf16_short(torch.zeros(1, 1, SHORT_CONTEXT, 8, dtype=torch.bfloat16))
    assert not cpu_bf16_short(torch.zeros(1, 1, SHORT_CONTEXT + 1, 8, dtype=torch.bfloat16))
    assert not cpu_bf16_short(torch.zeros(1, 1, 16, 8))  # fp32 goes through SDPA
