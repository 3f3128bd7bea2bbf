"""MuonAdamW: Muon parity with torch.optim.Muon, AdamW parity with torch.optim.AdamW, per-expert
orthogonalisation, the on-device discard flag, state dicts, validation and DTensor parameters."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kiln.train.muon import NS_COEFFICIENTS, MuonAdamW, muon_lr_scale, newton_schulz

SHAPES = [(32, 16), (16, 32), (24, 24)]
HYPER = dict(lr=0.02, weight_decay=0.1, momentum=0.9, ns_steps=5)


def _matrices(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _set_grads(groups: list[list[torch.Tensor]], step: int) -> None:
    """The same gradients (seeded by step) on each list of parameters."""
    g = torch.Generator().manual_seed(1000 + step)
    for tensors in zip(*groups):
        grad = torch.randn(tensors[0].shape, generator=g).to(tensors[0].dtype)
        for t in tensors:
            t.grad = grad.clone()


def _reference_muon(params: list[torch.Tensor], bufs: list[torch.Tensor], *, nesterov: bool, adjust: str) -> None:
    """A few lines of the published recipe, written independently of kiln.train.muon and of torch.optim.Muon."""
    a, b, c = NS_COEFFICIENTS
    for p, buf in zip(params, bufs):
        assert p.grad is not None
        buf.lerp_(p.grad, 1 - HYPER["momentum"])
        u = p.grad.lerp(buf, HYPER["momentum"]) if nesterov else buf
        x = u.bfloat16()
        x = x.T if u.size(0) > u.size(1) else x
        x = x / x.norm().clamp(min=1e-7)
        for _ in range(HYPER["ns_steps"]):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        x = x.T if u.size(0) > u.size(1) else x
        rows, cols = p.shape
        scale = math.sqrt(max(1, rows / cols)) if adjust == "spectral" else 0.2 * math.sqrt(max(rows, cols))
        p.mul_(1 - HYPER["lr"] * HYPER["weight_decay"]).add_(x, alpha=-HYPER["lr"] * scale)


# Bit identity is expected: kiln's Muon runs the same torch ops in the same order on the same dtypes
# (fp32 momentum, bf16 Newton–Schulz via addmm, fp32 update), so there is no rounding to allow for.
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust,torch_adjust", [("spectral", "original"), ("match_rms_adamw", "match_rms_adamw")])
def test_muon_matches_torch_muon(nesterov: bool, adjust: str, torch_adjust: str) -> None:
    ours = _matrices()
    opt = MuonAdamW([{"params": ours, "optimizer": "muon"}], nesterov=nesterov, adjust_lr=adjust, **HYPER)
    ref = _matrices()
    bufs = [torch.zeros_like(p) for p in ref]
    theirs = _matrices()
    torch_muon = getattr(torch.optim, "Muon", None)
    other = None
    if torch_muon is not None:
        other = torch_muon(theirs, nesterov=nesterov, adjust_lr_fn=torch_adjust, **HYPER)
    for step in range(4):
        _set_grads([ours, ref, theirs], step)
        opt.step()
        _reference_muon(ref, bufs, nesterov=nesterov, adjust=adjust)
        if other is not None:
            other.step()
    for p, r, q in zip(ours, ref, theirs):
        assert torch.equal(p, r)
        if other is not None:
            assert torch.equal(p, q)
            assert torch.equal(opt.state[p]["momentum_buffer"], other.state[q]["momentum_buffer"])
    if other is None:
        pytest.skip("torch.optim.Muon needs torch >= 2.9: compared with the in-test reference only")


def test_bf16_momentum_buffer_is_not_overwritten() -> None:
    """torch.optim.Muon (2.13) normalises a bf16 buffer in place when nesterov=False; kiln's must stay the EMA."""
    p = torch.randn(8, 4, dtype=torch.bfloat16)
    opt = MuonAdamW([{"params": [p], "optimizer": "muon"}], lr=0.0, momentum=0.95, nesterov=False)
    p.grad = torch.randn_like(p) * 10
    opt.step()
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p).lerp(p.grad, 0.05))


def _adamw_params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(s, generator=g) for s in [(16, 8), (8,), (3, 5, 7)]]


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_torch_adamw(fused: bool) -> None:
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours, theirs = _adamw_params(), _adamw_params()
    opt = MuonAdamW([{"params": ours, "optimizer": "adamw", "fused": None if fused else False}], **hyper)
    ref = torch.optim.AdamW(theirs, fused=True, **hyper) if fused else torch.optim.AdamW(theirs, foreach=True, **hyper)
    for step in range(5):
        _set_grads([ours, theirs], step)
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):  # the same torch kernels on the same inputs: exact
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], ref.state[q][key])
        assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].dim() == 0


class _Tiny(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.down(torch.relu(self.up(h)))
        return self.norm(h) @ self.emb.weight.T


def _groups(model: _Tiny) -> list[dict]:
    hidden = [model.up.weight, model.down.weight]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    return [{"params": hidden, "optimizer": "muon"}, {"params": rest, "optimizer": "adamw", "weight_decay": 0.0}]


def _loss(model: _Tiny, seed: int = 0) -> torch.Tensor:
    x = torch.randint(0, 32, (8, 12), generator=torch.Generator().manual_seed(seed))
    return nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def test_mixed_model_trains() -> None:
    torch.manual_seed(0)
    model = _Tiny()
    opt = MuonAdamW(_groups(model), lr=1e-2, weight_decay=0.01)
    losses = []
    for _ in range(15):
        loss = _loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert set(opt.state[model.up.weight]) == {"momentum_buffer"}
    assert set(opt.state[model.emb.weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_experts_are_orthogonalised_one_by_one() -> None:
    x = torch.randn(4, 24, 16)
    y = newton_schulz(x, 5)
    for e in range(4):  # batched bf16 matmuls: allow bf16 rounding (on CPU they agree exactly)
        torch.testing.assert_close(y[e], newton_schulz(x[e], 5))
    # one optimizer step on [E, out, in] equals a step on each expert's matrix, LR from the last two dims
    w = torch.randn(3, 24, 16)
    parts = [w[e].clone() for e in range(3)]
    opt3 = MuonAdamW([{"params": [w], "optimizer": "muon"}], lr=0.02)
    opt2 = MuonAdamW([{"params": parts, "optimizer": "muon"}], lr=0.02)
    grad = torch.randn_like(w)
    w.grad = grad
    for e, p in enumerate(parts):
        p.grad = grad[e].clone()
    opt3.step()
    opt2.step()
    for e, p in enumerate(parts):
        torch.testing.assert_close(w[e], p)
    assert muon_lr_scale(w.shape, "match_rms_adamw") == muon_lr_scale((24, 16), "match_rms_adamw")


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()] + [
        t.clone() for s in opt.state.values() for t in s.values()
    ]


@contextlib.contextmanager
def _no_host_reads(flag: torch.Tensor, strict: bool) -> Iterator[None]:
    """Any host read (item, bool, float, tolist) raises: of any tensor when strict; otherwise of the flag
    or of a mask made from it (bool). torch's non-fused AdamW on CPU reads its CPU `step` (no device sync)."""
    real_item = torch.Tensor.item

    def read(self: torch.Tensor, *args: object) -> object:
        if strict or self is flag or self.dtype == torch.bool:
            raise AssertionError("host read during step()")
        return real_item(self, *args)

    with pytest.MonkeyPatch.context() as m:
        for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
            m.setattr(torch.Tensor, name, read)
        yield


@pytest.mark.parametrize("fused", [None, False])
def test_found_inf_discards_on_device(fused: bool | None) -> None:
    torch.manual_seed(0)
    model = _Tiny()
    groups = _groups(model)
    groups[1]["fused"] = fused
    opt = MuonAdamW(groups, lr=1e-2, weight_decay=0.1)
    _loss(model).backward()
    opt.step()  # states exist and are non-zero
    opt.zero_grad(set_to_none=True)
    twin = copy.deepcopy(model)
    twin_groups = _groups(twin)
    twin_groups[1]["fused"] = fused
    twin_opt = MuonAdamW(twin_groups, lr=1e-2, weight_decay=0.1)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors it need not cast

    # flag 1 with non-finite gradients: everything stays bit for bit (a select, not a blend)
    _loss(model, seed=1).backward()
    for p in model.parameters():
        assert p.grad is not None
        p.grad[0].fill_(float("nan"))
    before = _snapshot(model, opt)
    opt.found_inf = torch.tensor(1.0)
    with _no_host_reads(opt.found_inf, strict=fused is None):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt)))

    # flag 0 applies the step exactly as a step without any flag
    opt.zero_grad(set_to_none=True)
    _loss(model, seed=2).backward()
    _loss(twin, seed=2).backward()
    opt.found_inf = torch.tensor(0.0)
    with _no_host_reads(opt.found_inf, strict=fused is None):
        opt.step()
    twin_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(model, opt), _snapshot(twin, twin_opt)))
    assert not any(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt)))


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    a = _Tiny()
    b = copy.deepcopy(a)
    opt_a = MuonAdamW(_groups(a), lr=1e-2, weight_decay=0.1)
    opt_b = MuonAdamW(_groups(b), lr=1e-2, weight_decay=0.1)
    for seed in range(3):
        _loss(a, seed).backward()
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer))
    b.load_state_dict(a.state_dict())
    for model, opt in ((a, opt_a), (b, opt_b)):
        _loss(model, 3).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert [g["optimizer"] for g in opt_b.param_groups] == ["muon", "adamw"]


def test_validation() -> None:
    with pytest.raises(ValueError, match=r"\(16,\)"):
        MuonAdamW([{"params": [torch.zeros(16, requires_grad=True)], "optimizer": "muon"}])
    with pytest.raises(ValueError, match="adjust_lr"):
        MuonAdamW([{"params": [torch.zeros(4, 4)], "optimizer": "muon"}], adjust_lr="bogus")
    with pytest.raises(ValueError, match="adjust_lr"):
        MuonAdamW([{"params": [torch.zeros(4, 4)], "optimizer": "muon", "adjust_lr": "bogus"}])
    with pytest.raises(ValueError, match="optimizer"):
        MuonAdamW([torch.zeros(4, 4)])
    with pytest.raises(ValueError, match="adjust_lr"):
        muon_lr_scale((4, 4), "bogus")
    assert muon_lr_scale((64, 16), "spectral") == 2.0
    assert muon_lr_scale((16, 64), "spectral") == 1.0
    assert muon_lr_scale((16, 64), "none") == 1.0
    assert muon_lr_scale((16, 64), "match_rms_adamw") == pytest.approx(1.6)


@pytest.fixture(scope="module")
def gloo_world():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    from torch.distributed.device_mesh import init_device_mesh

    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_dtensor_matches_plain(gloo_world) -> None:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = gloo_world
    plain = _matrices() + [torch.randn(6)]
    sharded = [distribute_tensor(p.clone(), mesh, [Shard(0)]) for p in plain]

    def groups(ps: list[torch.Tensor]) -> list[dict]:
        return [{"params": ps[:3], "optimizer": "muon"}, {"params": ps[3:], "optimizer": "adamw"}]

    opt_p = MuonAdamW(groups(plain), lr=0.02, weight_decay=0.1)
    opt_s = MuonAdamW(groups(sharded), lr=0.02, weight_decay=0.1)
    for step in range(3):
        _set_grads([plain], step)
        for p, s in zip(plain, sharded):
            assert p.grad is not None
            s.grad = distribute_tensor(p.grad, mesh, [Shard(0)])
        opt_p.found_inf = opt_s.found_inf = torch.tensor(float(step == 1))  # the middle step discarded
        opt_p.step()
        opt_s.step()
    for p, s in zip(plain, sharded):
        assert isinstance(s, DTensor)
        assert torch.equal(s.full_tensor(), p)
        assert all(isinstance(t, DTensor) for k, t in opt_s.state[s].items() if k != "step")


def test_distributed_checkpoint_state_dict(gloo_world) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    torch.manual_seed(0)
    a = _Tiny()
    b = copy.deepcopy(a)
    opt_a = MuonAdamW(_groups(a), lr=1e-2)
    opt_b = MuonAdamW(_groups(b), lr=1e-2)
    for seed in range(2):
        _loss(a, seed).backward()
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
    set_optimizer_state_dict(b, opt_b, copy.deepcopy(get_optimizer_state_dict(a, opt_a)))
    b.load_state_dict(a.state_dict())
    for model, opt in ((a, opt_a), (b, opt_b)):
        _loss(model, 5).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
