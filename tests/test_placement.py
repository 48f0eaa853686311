"""Expert placement over actors: round-robin, balanced by measured usage, hot experts replicated."""

import pytest

from moepager.distributed.placement import place, shards, usage_from_trace
from moepager.errors import MoepagerError
from moepager.paging.trace import Trace

KEYS = [(layer, e) for layer in (0, 2) for e in range(8)]


def test_round_robin_splits_each_layer_evenly():
    plan = place(KEYS, 3)
    assert plan[(0, 4)] == [1] and plan[(2, 7)] == [1]
    assert [len(s) for s in shards(plan, 3)] == [6, 6, 4]


def test_usage_balances_each_actors_share_of_tokens():
    usage = {(0, 0): 100, (0, 1): 90, (0, 2): 10, (0, 3): 5, (2, 5): 50}
    plan = place(KEYS, 2, usage)
    assert plan[(0, 0)] != plan[(0, 1)]  # the two hottest on different actors
    for layer in (0, 2):
        counts = [sum(1 for (l, _), o in plan.items() if l == layer and o[0] == a) for a in (0, 1)]
        assert counts == [4, 4]  # memory stays even


def test_replicate_gives_the_hottest_a_second_actor():
    usage = {(0, 3): 9, (0, 5): 7, (2, 1): 4}
    plan = place(KEYS, 2, usage, replicate=1)
    assert sorted(plan[(0, 3)]) == [0, 1] and len(plan[(0, 5)]) == 1 and sorted(plan[(2, 1)]) == [0, 1]
    assert sum(len(s) for s in shards(plan, 2)) == len(KEYS) + 2


def test_usage_comes_from_a_trace(tmp_path):
    trace = Trace(3, 8, 2, [(0, [[1, 2], [2, 3]]), (2, [[7, 2]]), (0, [[2, 4]])])
    trace.save(tmp_path / "t.json")
    assert usage_from_trace(tmp_path / "t.json") == {
        (0, 1): 1,
        (0, 2): 2,
        (0, 3): 1,
        (2, 2): 1,
        (2, 7): 1,
        (0, 4): 1,
    }


@pytest.mark.parametrize(
    "kw, match",
    [({"actors": 0}, "at least 1"), ({"actors": 2, "replicate": -1}, "0 or more"), ({"actors": 2, "replicate": 1}, "needs their usage"),
     ({"actors": 1, "usage": {}, "replicate": 1}, "at least 2 actors")],
)  # fmt: skip
def test_bad_placement_is_a_clear_error(kw, match):
    with pytest.raises(MoepagerError, match=match):
        place(KEYS, **kw)


def test_an_address_nobody_answers_at_is_a_clear_error():
    from moepager.distributed.ray_experts import _reachable

    with pytest.raises(MoepagerError, match="no Ray cluster answers at 127.0.0.1:1"):
        _reachable("127.0.0.1:1")
    _reachable("auto")  # found by Ray itself


def test_ray_options_without_ray_are_refused(capsys):
    from moepager.cli import main

    assert main(["run", "model", "--ray-actors", "2"]) == 2
    assert "need --ray ADDRESS" in capsys.readouterr().err
