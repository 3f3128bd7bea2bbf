import numpy as np
import pytest
import torch

from kiln.data.loader import BatchSampler, TokenWindows, eval_windows
from kiln.errors import DataError

SEQ = 32


@pytest.fixture(scope="module")
def windows(shared_prepared):
    return TokenWindows(shared_prepared.split("train"), SEQ)


def test_window_count_and_contents(windows, shared_prepared):
    stream = np.concatenate([np.asarray(s) for s in shared_prepared.split("train")]).astype(np.int64)
    assert len(windows) == (len(stream) - 1) // SEQ  # a single shard here
    idx = np.array([0, 3, len(windows) - 1])
    got = windows.get(idx)
    assert got.shape == (3, SEQ + 1) and got.dtype == np.int64
    for row, i in zip(got, idx):
        assert np.array_equal(row, stream[i * SEQ : i * SEQ + SEQ + 1])
    # consecutive windows overlap by one token: the last target of one is the first input of the next
    a, b = windows.get(np.array([4, 5]))
    assert a[-1] == b[0]


def test_windows_span_several_shards():
    shards = [np.arange(0, 70, dtype=np.uint16), np.arange(100, 133, dtype=np.uint16)]
    w = TokenWindows(shards, seq_len=32)
    assert len(w) == 2 + 1
    got = w.get(np.array([2, 1]))
    assert got[0].tolist() == list(range(100, 133))
    assert got[1].tolist() == list(range(32, 65))


def test_windows_contain_eos_separators(windows, shared_prepared):
    eos = shared_prepared.tokenizer.eos_id
    everything = windows.get(np.arange(len(windows)))
    assert (everything == eos).any(axis=1).sum() >= 20  # 25 short documents, packed back to back
    assert everything.max() < shared_prepared.vocab_size and everything.min() >= 0


def test_batch_is_a_pure_function_of_step(windows):
    a = BatchSampler(windows, global_batch=4, seed=7)
    b = BatchSampler(windows, global_batch=4, seed=7)
    steps = [0, 5, 1, 40, 2, 5, 0, 17]
    from_a = {s: a.batch(s) for s in steps}
    for s in reversed(steps):
        assert torch.equal(b.batch(s), from_a[s])
    assert torch.equal(a.batch(3), b.batch(3))
    assert a.batch(0).shape == (4, SEQ + 1) and a.batch(0).dtype == torch.int64
    assert not torch.equal(a.batch(0), a.batch(1))
    other_seed = BatchSampler(windows, global_batch=4, seed=8)
    assert not torch.equal(other_seed.batch(0), a.batch(0))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_partition_the_global_batch(windows, world):
    single = BatchSampler(windows, global_batch=8, seed=3)
    ranks = [BatchSampler(windows, global_batch=8, seed=3, rank=r, world_size=world) for r in range(world)]
    for step in (0, 1, 9, 30):
        parts = [r.batch(step) for r in ranks]
        assert all(p.shape[0] == 8 // world for p in parts)
        assert torch.equal(torch.cat(parts), single.batch(step))


def test_global_batch_must_split_over_ranks(windows):
    with pytest.raises(DataError, match="does not split evenly over 3"):
        BatchSampler(windows, global_batch=8, seed=0, rank=0, world_size=3)


def test_epochs_wrap_and_each_is_a_permutation(windows):
    n = len(windows)
    B = 3
    sampler = BatchSampler(windows, global_batch=B, seed=11)
    steps = -(-3 * n // B)
    order = np.concatenate([sampler.sample_indices(s) for s in range(steps)])[: 3 * n]
    epochs = [order[e * n : (e + 1) * n] for e in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], np.arange(n))  # shuffled
    assert sampler.epoch_of(steps) == pytest.approx(steps * B / n)
    # a fresh sampler asked directly for a step in epoch 2 agrees with the sequential one
    late = steps - 1
    assert np.array_equal(BatchSampler(windows, B, seed=11).sample_indices(late), sampler.sample_indices(late))


def test_too_short_split():
    with pytest.raises(DataError, match=r"the validation split has 20 tokens, fewer than one window .* 33"):
        TokenWindows([np.zeros(20, dtype=np.uint16)], seq_len=32, split="validation")
    with pytest.raises(DataError, match="train split has 0 tokens"):
        TokenWindows([], seq_len=32)


def test_eval_windows_are_fixed_distinct_windows_of_the_split(windows):
    everything = windows.get(np.arange(len(windows)))
    ev = eval_windows(windows, 5)
    assert ev.shape == (5, SEQ + 1) and ev.dtype == torch.int64
    assert torch.equal(ev, eval_windows(windows, 5))  # the same held-out tokens for every evaluation
    rows = {tuple(r) for r in ev.tolist()}
    assert len(rows) == 5
    assert rows <= {tuple(r) for r in everything.tolist()}
    assert torch.equal(ev[0], torch.from_numpy(everything[0]))
    all_of_them = eval_windows(windows, 10_000)
    assert all_of_them.shape[0] == len(windows)
    assert torch.equal(all_of_them, torch.from_numpy(everything))


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_the_feistel_order_is_a_permutation_fixed_by_seed_and_epoch(n):
    from kiln.data.order import FeistelOrder

    order = FeistelOrder(n, seed=3, epoch=0)
    everything = order[np.arange(n)]
    assert sorted(everything.tolist()) == list(range(n))
    assert (FeistelOrder(n, seed=3, epoch=0)[np.arange(n)] == everything).all()  # a pure function
    if n >= 17:
        assert (FeistelOrder(n, seed=3, epoch=1)[np.arange(n)] != everything).any()
        assert (FeistelOrder(n, seed=4, epoch=0)[np.arange(n)] != everything).any()
        assert (everything != np.arange(n)).mean() > 0.9  # shuffled, not near the identity


def test_the_order_costs_the_same_at_a_trillion_windows():
    """No array of the epoch's size: a few indices of 10^12 windows in well under a second, and
    the order object holds only its keys."""
    import sys
    import time

    from kiln.data.order import FeistelOrder

    t0 = time.perf_counter()
    order = FeistelOrder(10**12 + 7, seed=0, epoch=5)
    picked = order[np.array([0, 1, 10**12, 10**12 + 6])]
    assert time.perf_counter() - t0 < 0.5
    assert len(set(picked.tolist())) == 4 and (picked < 10**12 + 7).all()
    assert sum(sys.getsizeof(v) for v in vars(order).values()) < 4096


def test_a_run_made_with_the_former_order_keeps_it(windows):
    from kiln.data.order import legacy_order

    old = BatchSampler(windows, global_batch=4, seed=0, order="legacy")
    n = len(windows)
    assert (old.sample_indices(0) == legacy_order(n, 0, 0)[:4]).all()
    assert (BatchSampler(windows, global_batch=4, seed=0).sample_indices(0) != old.sample_indices(0)).any()
    with pytest.raises(DataError, match="unknown window order"):
        BatchSampler(windows, global_batch=4, seed=0, order="feistel-9")
