"""The planner covers every missing toy exactly once, inside blocks, however the work is split."""

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from toyfarm.plan import block_segments, plan_tasks


@st.composite
def missing_toys(draw):
    mus = draw(st.lists(st.sampled_from([0.5, 1.0, 1.5, 2.0]), min_size=1, max_size=3, unique=True))
    out = {}
    for mu in mus:
        for hyp in ("sb", "b"):
            n = draw(st.integers(0, 300))
            done = draw(st.lists(st.booleans(), min_size=n, max_size=n))
            out[(mu, hyp)] = np.flatnonzero(~np.asarray(done, dtype=bool))
    observed = draw(st.lists(st.sampled_from(mus), unique=True))
    return out, observed


@settings(max_examples=200, deadline=None)
@given(missing_toys(), st.integers(1, 64), st.integers(1, 600))
def test_every_missing_toy_is_planned_exactly_once(case, block, batch_size):
    missing, observed = case
    tasks = plan_tasks("p", missing, observed, batch_size, block)
    seen = {key: [] for key in missing}
    for task in tasks:
        blocks = {(r.mu, r.hypothesis, r.start // block) for r in task.ranges}
        assert len(blocks) <= max(1, batch_size // block)
        for r in task.ranges:
            assert r.start < r.stop
            assert r.start // block == (r.stop - 1) // block  # never crosses a block
            seen[(r.mu, r.hypothesis)].extend(range(r.start, r.stop))
    for key, toys in missing.items():
        assert sorted(seen[key]) == sorted(toys.tolist())
    planned_observed = [mu for task in tasks for mu in task.observed]
    assert sorted(planned_observed) == sorted(observed)
    assert all(t.ranges or t.observed for t in tasks)


def test_block_segments_split_at_gaps_and_block_edges():
    toys = np.array([0, 1, 2, 5, 6, 7, 8, 9, 15, 16])
    assert block_segments(toys, 8) == [(0, 3), (5, 8), (8, 10), (15, 16), (16, 17)]
    assert block_segments(np.array([], dtype=int), 8) == []


def test_observed_rides_with_the_first_task_of_its_mu():
    missing = {(1.0, "sb"): np.arange(10), (1.0, "b"): np.arange(10), (2.0, "sb"): np.array([])}
    tasks = plan_tasks("p", missing, [1.0, 2.0], batch_size=8, block=8)
    assert tasks[0].observed == (1.0,)
    assert tasks[-1].ranges == () and tasks[-1].observed == (2.0,)


@settings(max_examples=200, deadline=None)
@given(missing_toys(), st.integers(1, 64), st.integers(1, 600))
def test_blocks_stay_whole_and_tasks_full(case, block, batch_size):
    """A block is fitted in one task (never twice), and every task but the last of the patch
    is full: no more tasks than the blocks need."""
    missing, observed = case
    tasks = plan_tasks("p", missing, observed, batch_size, block)
    owner = {}
    for k, task in enumerate(tasks):
        for r in task.ranges:
            assert owner.setdefault((r.mu, r.hypothesis, r.start // block), k) == k
    per_task = max(1, batch_size // block)
    with_toys = [t for t in tasks if t.ranges]
    assert len(with_toys) == -(-len(owner) // per_task)
    # a μ's observed statistic gets a task of its own only when none of its toys is missing
    for task in tasks:
        if not task.ranges:
            (mu,) = task.observed
            assert all(not toys.size for (m, _), toys in missing.items() if m == mu)


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 500), max_size=80), st.integers(1, 64))
def test_block_segments_are_the_maximal_runs_inside_blocks(toys, block):
    toys = np.array(sorted(toys), dtype=np.int64)
    segments = block_segments(toys, block)
    covered = [i for start, stop in segments for i in range(start, stop)]
    assert covered == toys.tolist()  # each toy once, in order
    for start, stop in segments:
        assert start < stop and start // block == (stop - 1) // block
    for (_, stop), (start, _) in itertools.pairwise(segments):
        assert stop < start or stop % block == 0  # a gap, or a block edge: nothing to merge
