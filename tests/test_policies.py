"""Eviction policies on their own: the order they evict in, aging, and the cache's rules around them."""

import random

import pytest

from moepager.errors import MoepagerError
from moepager.paging.policies import LFU, LRU, NextUse, make_policy
from moepager.paging.residency import Residency
from moepager.paging.trace import belady, replay

ALL = [LRU, LFU, NextUse]


def _touch(policy, keys):
    for k in keys:
        policy.access(k)


def test_lru_evicts_least_recent():
    p = LRU()
    _touch(p, [(0, 1), (0, 2), (0, 3), (0, 1)])
    assert p.victim(lambda k: True) == (0, 2)
    p.remove((0, 2))
    assert p.victim(lambda k: True) == (0, 3)
    assert p.victim(lambda k: k != (0, 3)) == (0, 1)


def test_lfu_evicts_least_frequent_then_least_recent():
    p = LFU()
    _touch(p, [(0, 1), (0, 1), (0, 2), (0, 3), (0, 3), (0, 2), (0, 2)])
    assert p.victim(lambda k: True) == (0, 1)  # counts 2, 3, 2: the older of the two 2s
    p.access((0, 1))
    assert p.victim(lambda k: True) == (0, 3)


def test_lfu_aging_forgets_old_popularity():
    p = LFU(age_every=8)
    _touch(p, [(0, 1)] * 6)  # popular long ago
    _touch(p, [(0, 2)] * 2)  # clock 8: counts halve to 3 and 1
    assert p.count[(0, 1)] == 3 and p.count[(0, 2)] == 1
    _touch(p, [(0, 2)] * 8)  # clock 16: halved again
    assert p.count[(0, 2)] > p.count[(0, 1)]
    assert p.victim(lambda k: True) == (0, 1)


def test_lfu_keeps_history_across_eviction():
    p = LFU()
    _touch(p, [(0, 1)] * 3 + [(0, 2)])
    p.remove((0, 1))
    assert p.victim(lambda k: True) == (0, 2)
    p.access((0, 1))
    assert p.count[(0, 1)] == 4


def test_nextuse_prefers_frequent_experts_of_each_layer():
    p = NextUse(long_half_life=1000)
    for _ in range(10):  # two layers, expert 0 chosen every token, others once in a while
        _touch(p, [(0, 0), (0, 1)])
        _touch(p, [(1, 0), (1, 2)])
    for e in (3, 4):
        p.access((0, e))
        p.access((1, e))
    keep = {(0, 0), (1, 0)}
    victim = p.victim(lambda k: True)
    assert victim not in keep
    assert victim in {(0, 3), (0, 4), (1, 3), (1, 4)}


def test_nextuse_breaks_ties_by_layer_distance():
    p = NextUse(long_half_life=1000, short_weight=0.0)
    for _ in range(4):  # identical history in three layers
        _touch(p, [(0, 0)])
        _touch(p, [(1, 0)])
        _touch(p, [(2, 0)])
    p.access((0, 0))  # now at layer 0: layer 1 runs next, layer 0 last
    # (0, 0) was just used and returns last; (1, 0) is needed next
    assert p.victim(lambda k: k != (0, 0)) == (2, 0)
    assert p.victim(lambda k: True) == (0, 0)
    # the cache asks for a slot for layer 1's step before that step's access() calls: distances count from
    # there, so layer 1's own other experts are needed last, and layer 2's next
    assert p.victim(lambda k: True, incoming=(1, 5)) == (1, 0)
    assert p.victim(lambda k: k != (1, 0), incoming=(1, 5)) == (0, 0)


def test_nextuse_ages_a_key_by_the_runs_of_its_own_layer():
    # what counts is how often layer 1 chose the expert when layer 1 ran: the next token starting (layer 0
    # running again) must not make layer 1's experts look less likely than layer 0's, just ahead of them
    p = NextUse()
    for t in range(6):
        _touch(p, [(0, 0), (1, 0), (1, 1)] if t % 2 else [(0, 0), (1, 0)])
    before = p._wait((1, 1))
    p.access((0, 0))
    assert p._wait((1, 1)) == pytest.approx(before)
    p.access((1, 0))  # layer 1 ran without it: now it aged
    assert p._wait((1, 1)) > before


def test_nextuse_escapes_the_lru_loop():
    # one expert per layer, 5 layers, 3 slots: every token cycles through 5 keys. LRU always evicts the key
    # needed next and never hits; evicting the one needed last (as Belady does) keeps hitting.
    req = [(layer, [0]) for _ in range(40) for layer in range(5)]
    assert replay(req, 3, LRU()) == 0.0
    hit = replay(req, 3, NextUse())
    assert hit > 0.4 and hit >= 0.9 * belady(req, 3)


def test_nextuse_victim_is_the_furthest_expected_next_use():
    # the per-layer rankings it caches give the same answer as scoring every resident key
    rng = random.Random(0)
    p = NextUse()
    resident = set()
    for step in range(3000):
        layer = step % 6
        for e in rng.sample(range(8), 3):
            p.access((layer, e))
            resident.add((layer, e))
        if len(resident) > 20:
            banned = set(rng.sample(sorted(resident), 4))
            ok = lambda k, banned=banned: k not in banned
            here = rng.randrange(6)  # the layer that needs the slot
            v = p.victim(ok, incoming=(here, 99))
            assert ok(v)
            best = max(p._expected_next_use(k, here) for k in resident if ok(k))
            assert p._expected_next_use(v, here) == pytest.approx(best)
            p.remove(v)
            resident.discard(v)


@pytest.mark.parametrize("make", ALL)
def test_residency_never_evicts_in_use_or_pinned(make):
    res = Residency(3, make())
    for e in range(3):
        assert res.claim((0, e)) is not None
        res.used((0, e))
    res.pinned.add((0, 0))
    res.hold((0, 1))
    _, evicted = res.claim((0, 9))
    assert evicted == (0, 2)
    res.hold((0, 9))
    assert res.claim((0, 10)) is None  # the rest are pinned or in use
    res.drop((0, 9))
    res.used((0, 9))
    assert res.claim((0, 10))[1] == (0, 9)


@pytest.mark.parametrize("make", ALL)
def test_policies_obey_evictable(make):
    p = make()
    _touch(p, [(0, e) for e in range(5)] * 2)
    assert p.victim(lambda k: k == (0, 3)) == (0, 3)
    assert p.victim(lambda k: False) is None


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(MoepagerError, match="unknown eviction policy 'mru'"):
        make_policy("mru")


def _history(policy, rng, steps=400, layers=5, experts=8):
    """A random routing history; returns the keys resident at the end (as a cache of 24 would hold)."""
    resident: list = []
    for step in range(steps):
        layer = step % layers
        for e in rng.sample(range(experts), 3):
            key = (layer, e)
            if key not in resident:
                resident.append(key)
            policy.access(key)
        while len(resident) > 24:
            v = policy.victim(lambda k: True, incoming=(layer, 0))
            policy.remove(v)
            resident.remove(v)
    return resident


@pytest.mark.parametrize("make", ALL)
def test_victims_are_the_victims_of_one_at_a_time(make):
    # a step's victims in one pass must be exactly those that n calls of victim (each removing its choice)
    # give, so that batching evictions changes no hit rate
    for seed in range(5):
        rng = random.Random(seed)
        one, many = make(), make()
        _history(one, random.Random(seed))
        resident = _history(many, rng)
        banned = set(rng.sample(resident, 4))
        ok = lambda k, banned=banned: k not in banned
        incoming = (rng.randrange(5), 99)
        got = many.victims(10, ok, incoming)
        want = []
        for _ in range(10):
            v = one.victim(ok, incoming)
            one.remove(v)
            want.append(v)
        assert got == want
        assert many.victims(0, ok, incoming) == []
        assert len(many.victims(100, ok, incoming)) == len(resident) - len(banned)


@pytest.mark.parametrize("make", ALL)
def test_claim_many_and_used_step_are_claim_and_used_per_key(make):
    rng = random.Random(1)
    one, many = Residency(12, make()), Residency(12, make())
    for step in range(300):
        layer = step % 4
        keys = [(layer, e) for e in sorted(rng.sample(range(10), 5))]
        for res in (one, many):
            res.pinned = {(0, 0)} if (0, 0) in res.slot else set()
            misses = [k for k in keys if k not in res.slot]
            for k in keys:
                if k in res.slot:
                    res.hold(k)
            if res is one:
                got = []
                for k in misses:
                    claimed = res.claim(k)
                    if claimed is None:
                        break
                    got.append((k, *claimed))
            else:
                got = res.claim_many(misses)
            for k, _, _ in got:
                res.hold(k)
            held = [k for k in keys if k in res.slot]
            if res is one:
                for k in held:
                    res.used(k)
                    res.drop(k)
            else:  # a step's uses at once, as the cache's hold of a decoded token makes them
                res.used_step(layer, [e for _, e in held])
                res.drop_many(held)
            if res is one:
                want = got
            else:
                assert got == want
        assert one.slot == many.slot and one.free == many.free


def test_victims_skip_unused_guesses_first():
    res = Residency(4, LRU())
    for e in range(3):
        res.claim((0, e))
        res.used((0, e))
    res.claim((1, 5))
    res.unranked[(1, 5)] = None  # a guess never used
    assert res.victims(2) == [(1, 5), (0, 0)]
    assert res.victims(2, may_evict=lambda k: k[0] == 0) == [(0, 0), (0, 1)]
