"""ExpertCache over a fake source: budgets, slots, waves, in-use and pinned experts, prefetch slots."""

import threading
import warnings
from pathlib import Path

import pytest
import torch

from moepager.errors import MoepagerError
from moepager.model.config import ModelConfig
from moepager.model.decoder import Transformer
from moepager.paging.cache import ExpertCache
from moepager.paging.guesses import fill_cache, guess_targets, reguess_from_prompt
from moepager.paging.prefetch import WINDOW, RouterPrefetcher
from moepager.system.sizes import parse_bytes

LAYERS, EXPERTS, K, D, I = 2, 8, 2, 4, 3


class FakeSource:
    """Expert (l, e) is filled with the value 100 * l + e; counts reads."""

    path = Path("fake")

    def __init__(self):
        self.reads = []
        self.lock = threading.Lock()

    def expert_keys(self):
        return [(layer, e) for layer in range(LAYERS) for e in range(EXPERTS)]

    def expert_nbytes(self, layer, e):
        return (2 * I * D + D * I) * 4

    def read_expert(self, layer, e, out=None):
        with self.lock:
            self.reads.append((layer, e))
        v = float(100 * layer + e)
        w = {"gate": torch.full((I, D), v), "up": torch.full((I, D), v), "down": torch.full((D, I), v)}
        if out is None:
            return w
        for n, t in w.items():
            out[n].copy_(t)
        return out


def _config():
    return ModelConfig(family="fake", vocab_size=8, hidden_size=D, num_layers=LAYERS, num_heads=1, num_kv_heads=1,
                       head_dim=D, max_position_embeddings=8, norm_eps=1e-6, num_experts=EXPERTS, top_k=K,
                       moe_layers=[True] * LAYERS)  # fmt: skip


SLOT = (2 * I * D + D * I) * 4


def _cache(slots, **kw):
    return ExpertCache(FakeSource(), _config(), slots * SLOT, **kw)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("512MiB", 512 << 20),
        ("2GB", 2 * 10**9),
        ("1.5GiB", 3 << 29),
        ("100", 100),
        (4096, 4096),
        ("25%", 250),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text, total=1000) == expected


@pytest.mark.parametrize("bad,match", [("25%", "percentage"), ("5 bananas", "cannot read"), (0, "positive"),
                                       ("0%", "percentage"), (1.5, "expected a size")])  # fmt: skip
def test_parse_bytes_errors(bad, match):
    with pytest.raises(MoepagerError, match=match):
        parse_bytes(bad, total=None if bad == "25%" else 1000)


def test_budget_in_slots_and_percent():
    c = _cache(5)
    assert c.capacity == 5 and c.slot_bytes == SLOT
    assert ExpertCache(FakeSource(), _config(), "50%").capacity == LAYERS * EXPERTS // 2
    with pytest.warns(UserWarning, match="raised to"):
        assert _cache(1).capacity == K


def test_hits_misses_and_values():
    c = _cache(4, policy="lru")
    held = c.acquire(0, [1, 2])
    assert c.views[held[2]]["gate"][0, 0].item() == 2.0
    c.release_held(0, held)
    held = c.acquire(1, [1, 2])
    assert c.views[held[1]]["down"][0, 0].item() == 101.0
    c.release_held(1, held)
    c.release_held(0, c.acquire(0, [1, 3]))  # evicts (0, 2), the least recent
    s = c.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (1, 5, 1)
    assert c.resident() == [(0, 1), (0, 3), (1, 1), (1, 2)]
    assert s["layers"]["0"]["misses"] == 3


def test_waves_when_a_layer_needs_more_than_the_budget():
    c = _cache(3)
    wanted, seen = list(range(EXPERTS)), []
    while wanted:
        held = c.acquire(0, wanted)
        assert 0 < len(held) <= 3
        for e, w in held.items():
            assert (
                c.views[w]["up"][0, 0].item() == e
            )  # a slot of this wave was not overwritten by the next one
        seen += held
        c.release_held(0, held)
        wanted = [e for e in wanted if e not in held]
    assert sorted(seen) == list(range(EXPERTS))
    assert c.peak_resident_bytes <= 3 * SLOT


def test_in_use_experts_are_never_evicted():
    c = _cache(3)
    c.acquire(0, [0, 1])  # held until released
    assert c.prefetch(1, [5, 6, 7]) == 1  # one free slot; never the held ones
    more = c.acquire(0, [2, 3])  # waits for the guess to land, then takes its slot, not a held one
    assert list(more) == [2]
    assert {(0, 0), (0, 1), (0, 2)} == set(c.resident())
    assert c.stats()["prefetch_wasted"] == 1


def test_prefetch_never_evicts_its_own_layer_and_counts_hits():
    c = _cache(4, policy="lru")
    c.release_held(1, c.acquire(1, [0, 1]))
    c.release_held(0, c.acquire(0, [0, 1]))
    assert c.prefetch(1, [4, 5]) == 2  # evicts layer 0's, not the guessed layer's own
    for f in list(c.loading.values()):
        f.exception()
    assert {(1, 4), (1, 5), (1, 0), (1, 1)} == set(c.resident())
    c.release_held(1, c.acquire(1, [4, 0]))
    s = c.stats()
    assert s["prefetch_hits"] == 1 and s["hits"] == 1 and s["prefetch_reads"] == 2


def test_a_fill_reads_each_layer_its_share_and_its_guesses_go_first():
    """A fill at load reads every free slot: each layer its share of its lowest-numbered experts. They count as
    guesses (a first use is a prefetch hit), and a layer's misses take the place of its own unused ones before
    another layer's, whatever the policy ranks."""
    c = _cache(5, policy="lru")
    c.pin(1, 7)
    done = []
    assert fill_cache(c) is None and c.res.free == []
    assert c.fill([(0, 5)], done.append) == 0 and done == []  # nothing free
    assert set(c.resident()) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 7)}
    assert all(c.views[c.res.slot[(1, e)]]["gate"][0, 0].item() == 100 + e for e in (0, 1))
    c.release_held(0, c.acquire(0, [0, 2]))
    assert set(c.resident()) == {(0, 0), (0, 2), (1, 0), (1, 1), (1, 7)}  # (0, 1) went, not layer 1's
    s = c.stats()
    assert (s["prefetch_reads"], s["prefetch_hits"], s["evictions"], s["prefetch_wasted"]) == (4, 1, 1, 1)


def test_guesses_move_to_the_layers_a_prompt_spread_over_only_where_that_repays_the_read():
    spread = [1] * 30 + [0] * 34  # 30 experts picked once each: the layer keeps finding new ones
    narrow = [10] * 3 + [0] * 61  # the same 30 picks on 3 experts
    held, room = {0: 10, 1: 10}, {0: 24, 1: 51}
    assert guess_targets({0: spread, 1: narrow}, held, room, free=0, top_k=2) == {0: 20, 1: 0}
    # free slots go to the likeliest layer first, then the next; never past a layer's room
    assert guess_targets({0: spread, 1: narrow}, held, room, free=30, top_k=2) == {0: 34, 1: 16}
    # layers alike: nothing moves (a read as the prompt ends would cost more than it saves)
    assert guess_targets({0: spread, 1: list(spread)}, held, {0: 24, 1: 24}, free=0, top_k=2) == held
    # layer 0 saw no picks (as spread as can be), layer 1 every expert (nothing left to guess)
    none_yet = {0: 0, 1: 0}
    assert guess_targets({0: [0] * 8, 1: [1] * 8}, none_yet, {0: 8, 1: 0}, free=3, top_k=1) == {0: 3, 1: 0}


def test_the_first_prompt_places_the_fill_guesses_again_and_keeps_what_steps_used():
    """After a fill at load, a prompt that spreads over layer 1 and keeps to one expert of layer 0: layer 0's unused
    guesses make room for layer 1's unused experts, and what the prompt used stays."""
    c = _cache(8, policy="lru")
    fill_cache(c)
    assert set(c.resident()) == {(layer, e) for layer in range(LAYERS) for e in range(4)}
    c.release_held(0, c.acquire(0, [0]))
    c.release_held(1, c.acquire(1, [0, 5, 6]))
    counts = {0: [9, 0, 0, 0, 0, 0, 0, 0], 1: [3, 0, 0, 0, 0, 3, 3, 0]}
    read = reguess_from_prompt(c, counts, top_k=K)
    resident = set(c.resident())
    assert {(0, 0), (1, 0), (1, 5), (1, 6)} <= resident and len(resident) == c.capacity
    # layer 1's steps took the place of its guesses 1 and 2: they come back with 4, lowest-numbered unused first,
    # in the slots of layer 0's three
    assert read == 3 and resident == {(0, 0), *((1, e) for e in range(7))}
    guessed, free = c.guesses()
    assert free == 0 and guessed == {(1, 1), (1, 2), (1, 3), (1, 4)}
    assert c.views[c.res.slot[(1, 4)]]["gate"][0, 0].item() == 104


@pytest.mark.parametrize("policy", ["lru", "nextuse"])
def test_steps_whose_experts_are_all_here_take_the_short_path_with_the_same_outcome(policy, monkeypatch):
    """A layer step whose experts are all resident is held and counted in one pass (_hold_resident): the same
    slots, counters, uses and later evictions as the full pass gives, over steps that hit, miss, and use a fill's
    guesses."""
    import random

    def run(short: bool) -> tuple:
        if not short:
            monkeypatch.setattr(ExpertCache, "_hold_resident", lambda self, layer, experts: None)
        c = _cache(7, policy=policy)
        fill_cache(c)
        rng, slots = random.Random(0), []
        for step in range(60):
            layer = step % LAYERS
            held = c.acquire(layer, sorted(rng.sample(range(4 if step % 5 else EXPERTS), K)))
            slots.append(sorted(held.items()))
            c.release_held(layer, held)
        monkeypatch.undo()
        s = {k: v for k, v in c.stats().items() if k not in ("layers", "read_s", "wait_s")}  # not timings
        return slots, s, dict(c.uses), dict(c.res.slot), dict(c.evicted)

    short, full = run(True), run(False)
    assert short[1]["hits"] > 0 and short[1]["prefetch_hits"] > 0 and short[1]["misses"] > 0
    assert short == full


def test_pins_survive_and_release_drops():
    c = _cache(4, policy="lru")
    c.pin(0, 7)
    for layer in range(LAYERS):
        for e in range(EXPERTS - 1):
            c.release_held(layer, c.acquire(layer, [e]))
    assert (0, 7) in c.resident()
    with pytest.raises(MoepagerError, match="pin fewer"):
        c.pin(0, 6)
        c.pin(1, 6)
    c.unpin(0, 7)
    c.release(0, 7)
    assert (0, 7) not in c.resident()
    c.load(1, 3)
    assert (1, 3) in c.resident()


def test_read_error_gives_the_slot_back():
    c = _cache(3)

    def broken(layer, e, out=None):
        raise OSError("disk on fire")

    c.source.read_expert = broken
    with pytest.raises(OSError):
        c.acquire(0, [1])
    assert c.resident() == [] and len(c.res.free) == 3


def test_dtype_conversion_goes_through_staging():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = _cache(4, dtype=torch.bfloat16)
    held = c.acquire(1, [3])
    assert c.views[held[3]]["gate"].dtype == torch.bfloat16 and c.views[held[3]]["gate"][0, 0].item() == 103.0
    assert not c.direct


def test_queued_guesses_are_cancelled_or_read_on_demand():
    import time

    c = _cache(8, policy="lru")
    read = c.source.read_expert

    def slow(layer, e, out=None):
        time.sleep(0.05)
        return read(layer, e, out)

    c.source.read_expert = slow
    assert c.prefetch(1, [1, 2, 3, 4]) == 4  # one batch each, two prefetch threads: two wait in line
    held = c.acquire(1, [4, 5])  # 4 was guessed right but is still queued: read now; 2 and 3 were wrong
    assert c.views[held[4]]["gate"][0, 0].item() == 104.0 and c.views[held[5]]["up"][0, 0].item() == 105.0
    c.release_held(1, held)
    s = c.stats()
    assert s["prefetch_cancelled"] >= 1
    assert (1, 4) in c.resident() and (1, 5) in c.resident()
    for f in list(c.loading.values()):
        f.exception()
    assert not c.res.in_use  # every hold was given back


def test_a_guess_cancelled_and_made_again_is_read_by_its_newer_batch_only():
    """A queued guess cancelled by its layer's step gives its slot to a miss; guessed again, it gets another
    slot in a newer batch. The older batch, starting late, must not read it into the slot it had (now the
    miss's): that overwrote an expert in use and left the guess's new slot unread."""
    import threading

    from moepager.paging.cache import PREFETCH_THREADS

    c = _cache(8, policy="lru")
    gate = threading.Event()
    blockers = [c.prefetch_pool.submit(gate.wait) for _ in range(PREFETCH_THREADS)]  # no batch starts yet
    assert c.prefetch(1, [2]) == 1
    held = c.acquire(1, [5])  # the guess was wrong: cancelled, its slot free again, taken by 5
    c.release_held(1, held)
    assert c.prefetch(1, [2]) == 1  # guessed again: another slot, a newer batch
    gate.set()
    for f in blockers + list(c.loading.values()):
        f.result()
    for layer, e in [(1, 5), (1, 2)]:
        assert c.views[c.res.slot[(layer, e)]]["gate"][0, 0].item() == 100 * layer + e
    assert not c.res.in_use


class _RecordingCache:
    """What RouterPrefetcher sees of a cache: its capacity and prefetch(), here only recorded."""

    capacity = 64

    def __init__(self):
        self.calls = []

    def prefetch(self, layer, experts):
        self.calls.append((layer, list(experts)))
        return len(self.calls[-1][1])


def test_prefetch_stops_itself_where_guesses_keep_missing():
    cache, guess, x = _RecordingCache(), {"ids": [6, 7]}, torch.zeros(1, D)
    router = lambda x: torch.tensor([guess["ids"]])
    pf = RouterPrefetcher({0: router, 1: router}, cache)

    def token(needed):  # as PagedExperts runs a token: score the layer's guess, then guess the next layer
        for layer in (0, 1):
            pf.observe(layer, needed)
            pf.predict(layer, x)

    for _ in range(WINDOW):  # layer 1 needs 0 and 1, the guess is always 6 and 7
        token([0, 1])
    assert len(cache.calls) == WINDOW and pf.stats()["layers_off"] == [1]
    for _ in range(3):
        token([0, 1])
    assert len(cache.calls) == WINDOW  # no more reads for it
    assert pf.stats()["guesses_skipped"] == 3 and pf.stats()["precision"] == 0.0
    guess["ids"] = [0, 1]  # the guesses turn right: still scored while off, so the layer comes back
    for _ in range(WINDOW):
        token([0, 1])
    assert pf.stats()["layers_off"] == []
    token([0, 1])
    assert cache.calls[-1] == (1, [0, 1])


def test_prefetch_that_hits_never_stops():
    cache = _RecordingCache()
    pf = RouterPrefetcher(
        {0: lambda x: torch.tensor([[0, 1, 2]]), 1: lambda x: torch.tensor([[0, 1, 2]])}, cache
    )
    for _ in range(3 * WINDOW):
        for layer in (0, 1):
            pf.observe(layer, [0, 1])  # 2 of 3 guesses used: above the threshold
            pf.predict(layer, torch.zeros(1, D))
    assert len(cache.calls) == 3 * WINDOW and pf.stats()["layers_off"] == []


def test_random_guesses_stop_being_read(tiny):
    import moepager

    path = tiny("qwen3_moe")[0]  # 16 experts, top 4: a random guess of 4 is right a quarter of the time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = moepager.load(path, expert_memory="50%", prefetch=True)
        plain = moepager.load(path, expert_memory="50%", prefetch=False)
    for e in (engine, plain):  # the layers, where the prefetcher's routers guess (a step graph's are nodes)
        e.model.__class__ = Transformer
    pf = engine.experts.prefetcher
    bad = torch.Generator().manual_seed(0)
    pf.routers = {
        layer: (lambda x: torch.randint(0, 16, (x.shape[0], 4), generator=bad)) for layer in pf.routers
    }
    prompt = [1, 2, 3, 4, 5]
    want = plain.generate(prompt, max_new_tokens=32, stop_ids=[])
    assert engine.generate(prompt, max_new_tokens=32, stop_ids=[]) == want  # guesses never change the output
    s = pf.stats()
    assert s["layers_off"] == [2] and s["guesses_skipped"] > 0
    assert s["reads_started"] <= 4 * (WINDOW + 1)  # read only until the first verdict
