"""The mixture's routing of samples to sources (kiln.data.mixture_order): every source's stream is
used in order without gap or repeat, counts are closed-form, weights are met at every batch,
stages, forks (eras) and max_epochs change the weights where they should, and nothing is a
table over the run."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.data.mixture_order import Era, MixtureSchedule
from kiln.errors import DataError

B = 16


def schedule(weights, windows, stages=(), max_epochs=None, eras=None, seed=3):
    max_epochs = max_epochs or (0.0,) * len(weights)
    eras = eras or [Era(0, tuple(weights), tuple(max_epochs), tuple(stages))]
    return MixtureSchedule(eras, list(windows), B, seed, [f"s{j}" for j in range(len(windows))])


def routed(s: MixtureSchedule, batches: int) -> tuple[np.ndarray, np.ndarray]:
    return s.route(np.arange(batches * B))


@pytest.mark.parametrize("weights", [(1.0,), (0.7, 0.3), (0.5, 0.3, 0.2), (5, 1, 1, 1, 0.01), (1, 0, 2)])
def test_each_source_is_read_in_order_without_gap_or_repeat(weights):
    s = schedule(weights, [1000] * len(weights))
    source, k = routed(s, 300)
    for j in range(len(weights)):
        assert (np.sort(k[source == j]) == np.arange((source == j).sum())).all()
        # within a source, later samples take later stream positions
        assert (np.diff(k[source == j]) > 0).all()


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2), (5, 1, 1, 1, 0.01)])
def test_counts_meet_the_weights_at_every_batch(weights):
    s = schedule(weights, [10**6] * len(weights))
    source, _ = routed(s, 400)
    p = np.array(weights) / sum(weights)
    depth = int(np.ceil(np.log2(len(weights))))
    for i in range(0, 401, 7):
        c = s.counts(i)
        assert (c == np.bincount(source[: i * B], minlength=len(weights))).all()  # closed form = the routing
        assert c.sum() == i * B
        assert np.abs(c - p * i * B).max() <= depth + 1  # within a sample per tree level of the target


def test_a_stage_changes_the_weights_at_its_step():
    s = schedule((0.9, 0.1), [10**6] * 2, stages=[(50, (0.2, 0.8))])
    before = s.counts(50)
    assert abs(before[0] / (50 * B) - 0.9) < 0.01
    after = s.counts(150) - before
    assert abs(after[1] / (100 * B) - 0.8) < 0.01
    assert s.changes() == {50: ["stage"]}


def test_a_spent_source_stops_and_its_weight_goes_to_the_others_in_proportion():
    # source 2 holds 300 windows and may be read once: at 20% of 16 a batch it runs out near batch 94
    s = schedule((0.5, 0.3, 0.2), [10**6, 10**6, 300], max_epochs=(0, 0, 1.0))
    ((index, source),) = s.exhausted
    assert source == 2 and s.counts(index + 1)[2] > 300 - B  # not long before its last window
    assert s.counts(10**4)[2] <= 300  # never read past its limit
    later = s.counts(index + 500) - s.counts(index)
    assert later[2] == 0 and abs(later[0] / later[1] - 0.5 / 0.3) < 0.01  # the others keep their ratio
    assert s.changes() == {index: ["s2 reached its max_epochs"]}
    assert s.weights_at(index) == (0.5, 0.3, 0.0)


def test_every_source_spent_ends_the_schedule():
    s = schedule((0.5, 0.5), [40, 40], max_epochs=(1.0, 2.0))
    assert s.end is not None and s.counts(s.end).sum() <= 40 + 80
    with pytest.raises(DataError, match="max_epochs"):
        s.route(np.arange(s.end * B, s.end * B + 4))


def test_a_fork_keeps_the_history_before_its_era():
    first = Era(0, (0.7, 0.3), (0.0, 0.0))
    parent = schedule((0.7, 0.3), [10**6] * 2, eras=[first])
    fork = schedule((0.7, 0.3), [10**6] * 2, eras=[first, Era(30, (0.1, 0.9), (0.0, 0.0))])
    src_p, k_p = routed(parent, 30)
    src_f, k_f = routed(fork, 60)
    assert (src_f[: 30 * B] == src_p).all() and (k_f[: 30 * B] == k_p).all()  # the same samples up to the fork
    for j in range(2):  # and the fork's stream continues each source where the parent left it
        assert (np.sort(k_f[src_f == j]) == np.arange((src_f == j).sum())).all()
    after = fork.counts(60) - fork.counts(30)
    assert abs(after[1] / (30 * B) - 0.9) < 0.01


def test_routing_is_a_pure_function_of_the_sample_index():
    s = schedule((0.5, 0.3, 0.2), [997, 500, 300], max_epochs=(0, 0, 2.0), stages=[(20, (0.2, 0.2, 0.6))])
    whole = s.route(np.arange(80 * B))
    pieces = [s.route(np.arange(a, a + 5)) for a in range(0, 80 * B, 5)]  # any rank's slice, in any order
    assert (np.concatenate([p[0] for p in pieces]) == whole[0]).all()
    assert (np.concatenate([p[1] for p in pieces]) == whole[1]).all()


def test_its_memory_does_not_grow_with_the_data_or_the_run():
    small = schedule((0.6, 0.4), [100, 100])
    huge = schedule((0.6, 0.4), [10**12, 10**12])
    assert huge.q.nbytes == small.q.nbytes and huge.n0.size == small.n0.size
    source, k = huge.route(np.arange(10**11, 10**11 + 64))  # a sample a trillion tokens in: no table
    assert set(np.unique(source)) <= {0, 1} and (k < 10**11).all()
