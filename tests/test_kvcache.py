"""The blocked, spilling KV cache and chunked prefill against the in-RAM KVCache, which the parity tests
tie to transformers: same greedy tokens, logits within 1e-5, with most of the cache on disk."""

import os
import threading

import pytest
import torch
from tiny_models import VOCAB

import moepager
from moepager.generation.batching import Scheduler, Sequence
from moepager.generation.generate import SamplingParams
from moepager.kernels.ggml_float import cached_positions
from moepager.model.kvcache import BlockKVCache
from moepager.model.layers import KVCache

BLOCK = 16
SPILLING = ["mixtral", "gpt_oss", "deepseek_v3", "qwen3_moe"]  # GQA, sliding window 8 + sinks, MLA, head norm


@pytest.fixture(scope="module")
def engines(tiny):
    made = {}

    def get(family):
        if family not in made:
            made[family] = moepager.load(tiny(family)[0])
        return made[family]

    return get


def _block_bytes(engine) -> int:
    """Bytes of one layer's block (k and v) for batch 1, from a probe forward."""
    probe = BlockKVCache(engine.config.num_layers, BLOCK)
    with torch.inference_mode():
        engine.model(torch.zeros(1, 1, dtype=torch.long), probe)
    return probe.resident_bytes // engine.config.num_layers


def _stepwise(engine, ids, cache, prefill):
    with torch.inference_mode():
        steps = [engine.model(ids[:, :prefill], cache)]
        steps += [engine.model(ids[:, t : t + 1], cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("family", SPILLING)
def test_spilled_cache_matches_in_ram(engines, family, tmp_path):
    engine = engines(family)
    layers, block = engine.config.num_layers, _block_bytes(engine)
    budget = 3 * block  # a few blocks in all, fewer than one per layer beyond the tails
    ids = torch.randint(0, VOCAB, (1, 100), generator=torch.Generator().manual_seed(4))
    spilled = BlockKVCache(layers, BLOCK, budget, tmp_path)
    got = _stepwise(engine, ids, spilled, 37)  # the prefill spans blocks and ends mid-block
    expected = _stepwise(engine, ids, KVCache(layers), 37)
    assert (got - expected).abs().max().item() < 1e-5
    total = layers * -(-100 // BLOCK) * block
    assert (
        total >= 4 * budget and spilled.counters["blocks_spilled"] > 0 and spilled.counters["bytes_read"] > 0
    )
    assert spilled.resident_bytes <= budget + layers * block  # the budget plus one writable tail per layer
    spilled.close()


@pytest.mark.parametrize("family", SPILLING)
def test_spilled_generation_gives_the_same_tokens(tiny, engines, family, tmp_path):
    ref = engines(family)
    block = _block_bytes(ref)
    engine = moepager.load(tiny(family)[0], kv_memory=2 * block, kv_block_size=BLOCK, kv_spill_dir=tmp_path,
                           prefill_chunk=13)  # fmt: skip
    prompt = torch.randint(0, VOCAB, (70,), generator=torch.Generator().manual_seed(5))
    expected = ref.generate(prompt, 40, stop_ids=[])
    assert engine.generate(prompt, 40, stop_ids=[]) == expected
    assert engine.stats()["kv_cache"]["blocks_spilled"] > 0


def test_batch_of_two(engines, tmp_path):
    engine = engines("gpt_oss")
    ids = torch.randint(0, VOCAB, (2, 60), generator=torch.Generator().manual_seed(6))
    layers = engine.config.num_layers
    got = _stepwise(engine, ids, BlockKVCache(layers, BLOCK, 1, tmp_path), 20)
    assert (got - _stepwise(engine, ids, KVCache(layers), 20)).abs().max().item() < 1e-5


def test_bfloat16_is_as_close_to_float32_as_the_in_ram_cache(tiny, engines, tmp_path):
    # in bf16 the blocked path accumulates in fp32, so it cannot match bf16 SDPA bit for bit; it must be
    # no less accurate than it, measured against the fp32 model
    engine = moepager.load(tiny("mixtral")[0], dtype="bfloat16")
    ids = torch.randint(0, VOCAB, (2, 60), generator=torch.Generator().manual_seed(6))
    layers = engine.config.num_layers
    got = _stepwise(engine, ids, BlockKVCache(layers, BLOCK, 1, tmp_path), 20).float()
    in_ram = _stepwise(engine, ids, KVCache(layers), 20).float()
    ref = engines("mixtral").logits(ids)
    assert (got - ref).abs().mean() <= 1.1 * (in_ram - ref).abs().mean()


def test_buffered_fallback_when_o_direct_is_refused(engines, tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT")
    engine = engines("mixtral")
    ids = torch.randint(0, VOCAB, (1, 50), generator=torch.Generator().manual_seed(7))
    cache = BlockKVCache(engine.config.num_layers, BLOCK, 1, tmp_path)
    got = _stepwise(engine, ids, cache, 30)
    assert cache.stats()["direct_io"] is False and cache.counters["blocks_spilled"] > 0
    assert (got - _stepwise(engine, ids, KVCache(engine.config.num_layers), 30)).abs().max().item() < 1e-5


def test_spill_file_is_unlinked(engines, tmp_path):
    engine = engines("mixtral")
    cache = BlockKVCache(engine.config.num_layers, BLOCK, 1, tmp_path)
    _stepwise(engine, torch.randint(0, VOCAB, (1, 40)), cache, 40)
    assert cache.counters["blocks_spilled"] > 0 and list(tmp_path.iterdir()) == []


def test_truncate_into_a_spilled_block_then_continue(engines, tmp_path):
    engine = engines("gpt_oss")
    layers = engine.config.num_layers
    ids = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(8))
    cache = BlockKVCache(layers, BLOCK, 1, tmp_path)
    _stepwise(engine, ids, cache, 80)
    cache.truncate(21)  # block 1 was spilled; it comes back as the writable tail
    with torch.inference_mode():
        got = engine.model(ids[:, 21:50], cache)
    assert (got - engine.logits(ids[:, :50])[:, 21:]).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_chunked_prefill_equals_unchunked(tiny, family):
    path = tiny(family)[0]
    whole = moepager.load(path, prefill_chunk=10_000)
    chunked = moepager.load(path, prefill_chunk=7)
    prompt = torch.randint(0, VOCAB, (60,), generator=torch.Generator().manual_seed(9))
    assert chunked.generate(prompt, 20, stop_ids=[]) == whole.generate(prompt, 20, stop_ids=[])
    cache_a, cache_b = KVCache(whole.config.num_layers), KVCache(whole.config.num_layers)
    with torch.inference_mode():
        a = whole.model(prompt[None], cache_a, last_only=True)
        for i in range(0, 60, 7):
            b = chunked.model(prompt[None, i : i + 7], cache_b, last_only=True)
    assert (a - b).abs().max().item() < 1e-5
    assert (cache_a.k[0][:, :, :60] - cache_b.k[0][:, :, :60]).abs().max().item() < 1e-5
    # the server's scheduler prefills in the engine's chunks too: the same tokens, the same prompt logprobs
    events, widths = {}, []
    chunked.model.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[1]))
    for name, e in (("whole", whole), ("chunked", chunked)):
        got, done, scheduler = [], threading.Event(), Scheduler(e)
        scheduler.start()
        seq = Sequence(prompt.tolist(), 20, SamplingParams(stop_ids=[]), lambda ev, got=got, done=done: (
            got.append(ev), ev[0] == "done" and done.set()), prompt_logprobs=2)  # fmt: skip
        scheduler.submit(seq)
        assert done.wait(60)
        scheduler.stop()
        events[name] = got
    assert max(widths) == 7  # no forward of more tokens than a chunk
    tokens = {n: [ev[1] for ev in got if ev[0] == "token"] for n, got in events.items()}
    assert tokens["chunked"] == tokens["whole"] == whole.generate(prompt, 20, stop_ids=[])
    logprobs = {n: next(ev[1] for ev in got if ev[0] == "prompt_logprobs") for n, got in events.items()}
    assert len(logprobs["chunked"]) == len(logprobs["whole"]) == 59
    for a, b in zip(logprobs["chunked"], logprobs["whole"]):
        assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-4


def test_bad_kv_options_are_clear_errors(tiny):
    path = tiny("mixtral")[0]
    with pytest.raises(moepager.MoepagerError, match="block_size"):
        moepager.load(path, kv_memory="1MiB", kv_block_size=0)
    with pytest.raises(moepager.MoepagerError, match="not understood"):
        moepager.load(path, kv_memory="lots")


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_mla_caches_one_latent_per_position(engines, family):
    """MLA runs over its latent (LatentKV): one key of kv_lora_rank + rope dims per position and layer, the
    latent again as its value, where expanded keys and values would hold H x (nope + rope + Dv)."""
    engine = engines(family)
    c, cache = engine.config, KVCache(engine.config.num_layers)
    with torch.inference_mode():
        engine.model(torch.arange(5)[None], cache)
    for k, v in zip(cache.k, cache.v):
        assert (k.shape[1], k.shape[-1], v.shape[1], v.shape[-1]) == (
            1,
            c.kv_lora_rank + c.rope_dim,
            1,
            c.kv_lora_rank,
        )


def test_a_planned_context_bounds_the_buffers(tiny):
    """Under a memory limit the cache's buffers grow by doubling up to the planned context and no further (the
    plan counts its K/V once), past it only to what is asked (the decode step's graph: the planned context's
    multiple of KV_PAD, which the plan counts); the tokens are those of an unbounded cache."""
    path, _ = tiny("qwen3_moe")
    engine = moepager.load(path, memory_limit="1GiB", max_context=100, prefetch=False)
    cache = engine.new_cache()
    assert engine.planned_context() == cache.max_positions == 100
    c = engine.config  # keys, values and values by position, float32, each layer's and one layer's again
    assert engine.experts.cache.footprint["kv_cache"] == 128 * 3 * c.num_kv_heads * c.head_dim * 4 * (
        c.num_layers + 1
    )
    prompt = list(range(3, 40))
    got = list(engine.stream(prompt, 63, temperature=1.0, seed=1, stop_ids=[], cache=cache))
    assert cache.k[0].shape[2] == cached_positions(100) == 128 and cache.seq_len == 99
    unbounded = KVCache(engine.config.num_layers)
    assert got == list(engine.stream(prompt, 63, temperature=1.0, seed=1, stop_ids=[], cache=unbounded))
    assert (
        unbounded.k[0].shape[2] > 100
    )  # doubled past the planned context (the prompt in the limit's chunks)
    k = torch.zeros(1, engine.config.num_kv_heads, 1, engine.config.head_dim)
    cache.reserve(0, 129, k, k)
    assert cache.k[0].shape[2] == 129
