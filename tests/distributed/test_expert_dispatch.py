"""The expert-parallel token exchange on its own, 2 gloo processes: rows reach the rank holding
their expert and come back in their order, gradients return the same way, and uneven, zero and
entirely empty splits work (a rank may send nothing, receive nothing, or have no rows at all)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

EXPERTS = 4  # 2 per rank
CASES = {  # rank -> the global expert of each of its rows
    "uneven": {0: [0, 0, 1, 3, 3, 3, 2], 1: [2, 1, 1, 0]},
    "one-way": {0: [0, 1, 1, 0], 1: [0, 0, 1]},  # nobody sends to rank 1's experts
    "empty-rank": {0: [3, 2, 0], 1: []},  # rank 1 has no rows at all
}


class FakeExperts:
    """Rank r's experts r*2, r*2+1: expert e multiplies its rows by e + 1."""

    def __init__(self, rank: int):
        self.rank = rank

    def experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        local = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        return rows * (self.rank * 2 + local + 1).float()[:, None]


def _worker(rank: int, path: str, case: str, out: str) -> None:
    from torch.distributed.device_mesh import DeviceMesh

    from kiln.parallel.experts import ExpertParallelDispatch

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        mesh = DeviceMesh("cpu", torch.arange(2), mesh_dim_names=("ep",))
        experts = torch.tensor(CASES[case][rank], dtype=torch.long)
        order = experts.argsort(stable=True)
        x = (torch.arange(len(experts) * 3, dtype=torch.float32).view(-1, 3) + 10 * rank + 1)[order]
        x.requires_grad_()
        counts = torch.bincount(experts, minlength=EXPERTS)
        y = ExpertParallelDispatch(mesh)(x, counts, FakeExperts(rank))
        factor = (experts[order] + 1).float()[:, None]
        torch.testing.assert_close(y, x.detach() * factor)
        (y * 2).sum().backward()
        torch.testing.assert_close(x.grad, 2 * factor.expand_as(x))
        open(f"{out}-{rank}", "w").write("ok")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", sorted(CASES))
def test_tokens_reach_their_experts_and_come_back(case, tmp_path):
    path = tempfile.mktemp(dir=tmp_path)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(path, case, str(tmp_path / "done")), nprocs=2, join=True)
    assert all((tmp_path / f"done-{r}").read_text() == "ok" for r in (0, 1))
