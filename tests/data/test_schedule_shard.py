"""DESIGN contracts 1 and 2 on the pure functions: same task on every rank, same global batch
whatever the world size, disjoint rank slices."""

from mtpeft.data.schedule import RoundRobin
from mtpeft.data.shard import TaskStream, micro_batch_indices


def test_round_robin_cycles_tasks_and_counts_occurrences():
    sched = RoundRobin(3)
    slots = [sched.slot(t) for t in range(7)]
    assert [s.task for s in slots] == [0, 1, 2, 0, 1, 2, 0]
    assert [s.occurrence for s in slots] == [0, 0, 0, 1, 1, 1, 2]


def _global_batch(stream, occ, mbs, ga, world):
    rows = []
    for micro in range(ga):
        for rank in range(world):
            rows.append(micro_batch_indices(stream, occ, micro, rank, mbs, ga, world))
    return rows


def test_global_batch_independent_of_world_size_and_disjoint_across_ranks():
    stream = TaskStream(size=50, seed=3, task_index=1)
    for occ in range(12):  # 12 × 8 > 50: crosses epoch boundaries
        one = _global_batch(stream, occ, mbs=8, ga=1, world=1)
        two = _global_batch(TaskStream(50, 3, 1), occ, mbs=4, ga=1, world=2)
        four_acc = _global_batch(TaskStream(50, 3, 1), occ, mbs=2, ga=2, world=2)
        flat = [i for part in one for i in part]
        assert flat == [i for part in two for i in part]
        assert flat == [i for part in four_acc for i in part]
        assert two[0] != two[1]


def test_every_example_seen_once_per_epoch_and_epochs_reshuffle():
    stream = TaskStream(size=10, seed=0, task_index=0)
    first, second = stream.window(0, 10), stream.window(10, 10)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second


def test_different_seed_or_task_gives_different_order():
    a = TaskStream(100, 0, 0).window(0, 20)
    assert a != TaskStream(100, 1, 0).window(0, 20)
    assert a != TaskStream(100, 0, 1).window(0, 20)
    assert a == TaskStream(100, 0, 0).window(0, 20)
