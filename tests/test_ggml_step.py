"""A GGUF model's decode step as one ggml graph (kernels/ggml_step.py, model/ggml_decode.py): the logits of its
layers computed one by one (GgmlBlock, three graphs a layer), bit for bit, and the eager path wherever the
step graph does not apply."""

import ctypes
import platform
import sys
from pathlib import Path

import pytest
import torch

import moepager
from moepager.kernels import ggml, ggml_library, ggml_routing, ggml_step, host_entry, host_nodes
from moepager.model.decoder import Transformer
from moepager.model.ggml_decode import GgmlDecodeTransformer
from moepager.model.layers import KVCache

FIXTURES = Path(__file__).parent / "fixtures" / "gguf"
IDS = torch.randint(3, 128, (1, 90), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def routing_in_the_librarys_order(monkeypatch):
    """Route in the loaded libggml's own float order, as llama.cpp built for this CPU would: every token through the
    step graph, where moepager would otherwise emulate another form (the wheel's AVX2 build on an AVX-512 CPU)
    for the tokens whose routers nearly tie."""
    monkeypatch.setattr(ggml_routing, "avx512", lambda: ggml_library.simd_form() == "AVX-512")


@pytest.fixture
def steps(monkeypatch) -> list[int]:
    """Counts the step graph's calls."""
    calls, step = [], ggml_step.decode_step
    monkeypatch.setattr(ggml_step, "decode_step", lambda *a: calls.append(1) or step(*a))
    return calls


def decode(model, prompt: int, tokens: int, then: int = 0) -> list[torch.Tensor]:
    """Logits of a prompt of `prompt` tokens, then of `tokens` decoded one at a time (teacher forced), then of
    `then` more tokens at once (what a chat turn appends to the cache)."""
    cache, n = KVCache(model.config.num_layers), prompt + tokens
    with torch.no_grad():
        out = [model(IDS[:, :prompt], cache=cache)]
        out += [model(IDS[:, i : i + 1], cache=cache) for i in range(prompt, n)]
        if then:
            out.append(model(IDS[:, n : n + then], cache=cache))
    return out


@pytest.mark.parametrize(
    "name",
    [
        "qwen3_moe.q4_0",
        "olmoe.q8_0",
        "qwen2_moe.q4_0",
        "mixtral.q8_0",
        "moefy.q4_0",
        "qwen3_moe.f32",
        "qwen2_moe.f32",
    ],
)
def test_a_decode_step_in_one_graph_is_its_layers_bit_for_bit(name, routing_in_the_librarys_order, steps):
    """q/k norms per head, over the projection or none; qkv biases; a gated shared expert; dense layers; float32
    files (their matrices computed by ggml as llama.cpp computes them): 70 decoded tokens (past a window of 64
    cached positions), then a turn of 5 tokens over the cache the graph wrote, equal to the layers' own logits."""
    engine = moepager.load(FIXTURES / f"{name}.gguf")
    model = engine.model
    assert type(model) is GgmlDecodeTransformer
    one_graph = decode(model, 8, 70, then=5)
    assert len(steps) == 70  # every decoded token, and only those
    model.__class__ = Transformer
    layers = decode(model, 8, 70, then=5)
    assert all(torch.equal(a, b) for a, b in zip(one_graph, layers))


def test_the_step_graph_steps_aside(routing_in_the_librarys_order, steps, monkeypatch):
    """A batch and a hook run the layers instead."""
    engine = moepager.load(FIXTURES / "qwen3_moe.q4_0.gguf")
    model = engine.model
    decode(model, 4, 2)
    assert len(steps) == 2
    with torch.no_grad():
        model.decode_batch(IDS[0, :2], [KVCache(model.config.num_layers) for _ in range(2)])
    handle = model.layers[1].ffn.register_forward_hook(lambda *a: None)
    decode(model, 4, 2)
    handle.remove()
    decode(model, 4, 2)
    assert len(steps) == 4


@pytest.mark.parametrize("name, close", [("qwen3_moe.q4_0", 1.0), ("moefy.q4_0", None)])
@pytest.mark.parametrize("budget", [None, "30%"])
def test_a_step_in_another_float_form_hands_near_ties_to_the_layers(name, close, budget, monkeypatch):
    """Where llama.cpp's float form for this CPU is not the library's (emulated here on any CPU), a decoded token is
    still one graph, and one whose router nearly ties is computed again by the layers, which route its close rows
    in that form (ggml_routing.softmax_topk): the logits are the layers' own bit for bit, resident and paged. Every
    token ties where CLOSE takes every row; on the default model's file (router logits within 2^-16) some do."""
    monkeypatch.setattr(ggml_routing, "avx512", lambda: ggml_library.simd_form() != "AVX-512")
    monkeypatch.setattr(
        GgmlDecodeTransformer, "_ties_often", lambda self: False
    )  # every token tries the step
    if close is not None:
        monkeypatch.setattr(ggml_routing, "CLOSE", close)
    calls, emulated = {"decode_step": [], "decode_step_paged": []}, []
    for fn, made in calls.items():
        step = getattr(ggml_step, fn)
        monkeypatch.setattr(ggml_step, fn, lambda *a, step=step, made=made: made.append(step(*a)) or made[-1])
    soft_max = ggml_routing.soft_max
    monkeypatch.setattr(ggml_routing, "soft_max", lambda *a: emulated.append(1) or soft_max(*a))
    runs = []
    for in_graphs in (True, False):
        engine = moepager.load(
            FIXTURES / f"{name}.gguf", **({} if budget is None else {"expert_memory": budget})
        )
        if not in_graphs:
            engine.model.__class__ = Transformer
        runs.append(decode(engine.model, 8, 30))
    made = calls["decode_step" if budget is None else "decode_step_paged"]
    handed = sum(logits is None for logits in made)
    assert len(made) == 30 and emulated
    assert handed == 30 if close is not None else 0 < handed < 30
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _counters(stats: dict) -> dict:
    """An expert cache's stats without its timings."""
    if not isinstance(stats, dict):
        return stats
    return {k: _counters(v) for k, v in stats.items() if not k.endswith("_s")}


@pytest.mark.parametrize("name", ["qwen3_moe.q4_0", "qwen2_moe.q4_0", "moefy.q4_0", "qwen3_moe.f32"])
@pytest.mark.parametrize("budget", ["100%", "30%"])
def test_a_paged_decode_step_is_its_layers_bit_for_bit(
    name, budget, routing_in_the_librarys_order, monkeypatch
):
    """Experts in an expert cache: one graph a token, the host choosing slots (and reading misses) in a node at
    each router, equal to the layers' own logits; at 30% experts are evicted and read again, and the graph's
    guesses of the next layer's experts are the prefetcher's own (the same hits, reads and guesses as the layers'
    path makes). A shared expert (qwen2_moe), dense layers (moefy's)."""
    calls, paged_step = [], ggml_step.decode_step_paged
    monkeypatch.setattr(ggml_step, "decode_step_paged", lambda *a: calls.append(1) or paged_step(*a))
    runs = []
    for in_graphs in (True, False):
        engine = moepager.load(FIXTURES / f"{name}.gguf", expert_memory=budget, prefetch=True)
        if not in_graphs:
            engine.model.__class__ = Transformer
        runs.append((decode(engine.model, 8, 70, then=5), _counters(engine.experts.stats())))
    assert len(calls) == 70
    (graphs, stats), (layers, layer_stats) = runs
    assert stats["misses"] > 0 and (budget == "100%" or stats["evictions"] > 0)
    assert (stats["prefetch"] is None) == (budget == "100%")
    assert stats == layer_stats
    assert all(torch.equal(a, b) for a, b in zip(graphs, layers))


@pytest.mark.parametrize("budget", [None, "30%"])
def test_one_step_graph_attends_over_every_n_kv_its_cache_holds(budget, routing_in_the_librarys_order):
    """Past each 64 positions and when the cache buffers grow the step graph is reshaped, not built again
    (ggml_step.Window): from position 70 to 299 (n_kv 128 in the prompt's buffers of 140 positions, 192 to 320 in
    the 384 they grew to) and again from 100 (128, 192) its logits are the layers' own bit for bit, every expert
    resident or paged, from one build."""
    ids = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(1))
    runs = []
    for in_graphs in (True, False):
        ggml.clear_graphs()
        engine = moepager.load(FIXTURES / "qwen3_moe.q4_0.gguf", expert_memory=budget)
        if not in_graphs:
            engine.model.__class__ = Transformer
        cache = KVCache(engine.model.config.num_layers)
        with torch.no_grad():
            out = [engine.model(ids[:, :70], cache=cache)]
            out += [engine.model(ids[:, i : i + 1], cache=cache) for i in range(70, 300)]
            cache.truncate(100)  # a conversation going back: n_kv 128 again, in the grown buffers
            out += [engine.model(ids[:, i : i + 1], cache=cache) for i in range(200, 240)]
        runs.append(out)
        steps = [key for key in ggml._graphs if "step" in key[0]]
        assert len(steps) == (1 if in_graphs else 0)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_read_that_fails_inside_the_paged_step_graph_is_raised_and_holds_nothing(
    routing_in_the_librarys_order, monkeypatch
):
    """A miss read by the host node in the middle of the graph fails: the step raises the read's own error once
    the graph returns, no expert stays held, and the next step (the read working again) gives the layers'
    logits."""
    calls, paged_step = [], ggml_step.decode_step_paged
    monkeypatch.setattr(ggml_step, "decode_step_paged", lambda *a: calls.append(1) or paged_step(*a))
    engine = moepager.load(FIXTURES / "qwen3_moe.q4_0.gguf", expert_memory="30%")
    model, cache = engine.model, engine.experts.cache
    source, read = cache.source, cache.source.read_experts
    kv = KVCache(model.config.num_layers)
    with torch.no_grad():
        model(IDS[:, :8], cache=kv)

        def failing(*a, **k):
            raise OSError("disk gone")

        monkeypatch.setattr(source, "read_experts", failing)
        with pytest.raises(OSError, match="disk gone"):
            for i in range(8, 40):  # until a token misses
                model(IDS[:, i : i + 1], cache=kv)
        assert not cache.res.in_use and kv.seq_len == i  # the failed position is decoded again
        monkeypatch.setattr(source, "read_experts", read)
        again = model(IDS[:, i : i + 1], cache=kv)
        assert len(calls) == i - 8 + 2  # the steps up to the failed one, and that one again
        model.__class__ = Transformer
        reference = KVCache(model.config.num_layers)
        model(IDS[:, :i], cache=reference)
        assert torch.equal(again, model(IDS[:, i : i + 1], cache=reference))


def test_a_fill_at_load_changes_what_is_read_not_the_logits():
    """Experts read into every slot at load (ExpertCache.fill): fewer misses while decoding, the same logits."""
    runs = []
    for fill in (False, True):
        engine = moepager.load(FIXTURES / "qwen3_moe.q4_0.gguf", expert_memory="30%", fill=fill)
        runs.append((decode(engine.model, 8, 20), engine.experts.stats()))
    (cold, cold_stats), (filled, filled_stats) = runs
    assert all(torch.equal(a, b) for a, b in zip(cold, filled))
    assert filled_stats["prefetch_hits"] > 0 and filled_stats["misses"] < cold_stats["misses"]


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64", reason="the native entry is x86-64 Linux code"
)
def test_only_ggml_s_first_thread_enters_a_host_node(routing_in_the_librarys_order, monkeypatch):
    """A host node's native entry (kernels/host_entry.py) returns on ggml's other threads before Python: the
    node's Python function sees the first thread only, where without the entry it sees every thread, and the
    logits are the same bits."""
    monkeypatch.setattr(ggml, "SMALL_WORK", 0)  # the tiny model's graphs on two threads, not the caller's one
    monkeypatch.setattr(ggml, "_threads", lambda: 2)
    node = host_nodes.Holds._node
    runs = []
    for entry in (True, False):
        if not entry:
            monkeypatch.setattr(host_nodes, "first_thread_only", lambda fn: fn)
            monkeypatch.setattr(host_nodes, "enter_on_missing", lambda fn, *a: fn)
        seen = set()
        monkeypatch.setattr(host_nodes.Holds, "_node", lambda self, *a: seen.add(a[3:5]) or node(self, *a))
        engine = moepager.load(FIXTURES / "qwen3_moe.q4_0.gguf", expert_memory="30%")
        runs.append((decode(engine.model, 8, 12), seen))
    (logits, seen), (plain_logits, plain_seen) = runs
    assert seen == {(0, 2)} and plain_seen == {(0, 2), (1, 2)}
    assert all(torch.equal(a, b) for a, b in zip(logits, plain_logits))


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64", reason="the native entry is x86-64 Linux code"
)
def test_the_native_entry_enters_python_only_where_a_slot_was_not_found():
    """host_entry.enter_on_missing: ggml's first thread enters the node's function where one of its k slots is
    negative (not in the cache's table), with ggml's arguments as they came; other threads never."""
    seen = []
    fn = ggml_library.HostFn(lambda dst, a, b, ith, nth, layer: seen.append((dst, a, b, ith, nth, layer)))
    slots = (ctypes.c_int32 * 3)(4, 0, 7)
    entry = host_entry.enter_on_missing(fn, ctypes.addressof(slots), 3)
    entry(1, 2, 3, 0, 2, 5)
    assert seen == []  # every slot found
    for missing in range(3):
        slots[missing] = -1
        entry(1, 2, 3, 0, 2, 5)
        entry(1, 2, 3, 1, 2, 5)  # not the first thread
        slots[missing] = missing
    assert seen == [(1, 2, 3, 0, 2, 5)] * 3
    one = (ctypes.c_int32 * 1)(-1)
    host_entry.enter_on_missing(fn, ctypes.addressof(one), 1)(None, None, None, 0, 1, None)
    assert seen[-1] == (None, None, None, 0, 1, None) and len(seen) == 4


@pytest.mark.parametrize("budget", ["100%", "30%"])
def test_a_token_whose_experts_are_all_cached_runs_no_python_inside_its_graph(
    budget, routing_in_the_librarys_order, monkeypatch
):
    """Prefetch off (the CPU's default): the step graph looks each router's ids up in the cache's slot table and
    its host node enters Python only at a layer whose experts are not all there. The logits are the layers' own
    bit for bit, and the cache ends as the layers' path leaves it (the same hits, misses, evictions, uses and
    experts resident: the policy saw the same steps in the same order); so it does where the native entry is
    missing and every node enters Python."""
    node, entered = host_nodes.Holds._node, []

    def counted(self, *a):
        if not a[3]:  # ggml's first thread
            entered.append(a[5] or 0)
        return node(self, *a)

    monkeypatch.setattr(host_nodes.Holds, "_node", counted)
    runs = []
    for path in ("table", "no native entry", "layers"):
        if path == "no native entry":
            monkeypatch.setattr(host_nodes, "enter_on_missing", lambda fn, *a: fn)
        ggml.clear_graphs()
        engine = moepager.load(FIXTURES / "qwen3_moe.q4_0.gguf", expert_memory=budget)
        if path == "layers":
            engine.model.__class__ = Transformer
        assert engine.experts.prefetcher is None
        logits, entries = [], []
        for _ in range(2):  # a second conversation: with room for all, every expert is in the cache by then
            entered.clear()
            misses = engine.experts.stats()["misses"]
            logits += decode(engine.model, 8, 40)
            entries.append((len(entered), engine.experts.stats()["misses"] - misses))
        state = (
            _counters(engine.experts.stats()),
            sorted(engine.experts.resident()),
            engine.experts.cache.uses,
        )
        runs.append((logits, state, entries))
    (table, state, entries), (plain, plain_state, plain_entries), layers = runs
    steps = 40 * sum(1 for lay in engine.model.layers if hasattr(lay.ffn, "router"))
    assert all(n == steps for n, _ in plain_entries)
    assert all(n <= misses for n, misses in entries)  # each node entered had an expert to read
    assert entries[1][0] == 0 if budget == "100%" else entries[1][0] > 0
    assert state == plain_state == layers[1]
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(table, plain, layers[0]))


def test_experts_read_into_the_cache_are_repacked_straight_from_the_read(monkeypatch):
    """A miss's blocks go from the read's staging into their slot in llama.cpp's layout (ExpertBank.land): none
    is copied into a slot as read first, and the logits are those of every expert resident."""
    from moepager.kernels import ggml_repack
    from moepager.system import direct_reader

    copied, landed, copy, land = [], [], direct_reader.copy_piece, ggml_repack.repack
    monkeypatch.setattr(direct_reader, "copy_piece", lambda *a: copied.append(1) or copy(*a))
    monkeypatch.setattr(ggml_repack, "repack", lambda *a: landed.append(len(a) == 4) or land(*a))
    path = FIXTURES / "qwen3_moe.q4_0.gguf"
    paged = moepager.load(path, expert_memory="30%")
    if not paged.experts.cache.banks[0].down.layout:
        pytest.skip("llama.cpp keeps this file's rows as they are on this CPU: nothing to repack")
    landed.clear(), copied.clear()  # the dense weights read and repacked at load
    logits = decode(paged.model, 8, 12)
    assert paged.experts.stats()["misses"] > 0 and landed and all(landed) and not copied
    assert all(torch.equal(a, b) for a, b in zip(logits, decode(moepager.load(path).model, 8, 12)))
