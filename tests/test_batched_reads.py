"""Batched expert reads (ModelSource.read_experts) and the cache's use of them: same bytes as one read per
expert, a few large requests per layer step, checksums still checked, failed batches leave nothing behind."""

import random
import shutil
import warnings

import pytest
import torch
from tiny_models import build

from moepager.errors import CorruptFile
from moepager.model.moe import bank_spec
from moepager.paging.cache import ExpertCache
from moepager.sources.checkpoint import Checkpoint
from moepager.store.convert import convert
from moepager.store.format import EXPERTS_FILE, read_manifest
from moepager.store.reading import StoreSource
from moepager.system.direct_reader import ALIGN, DirectReader

KINDS = ["checkpoint", "sharded", "store", "store_int8", "store_int4", "gpt_oss", "gpt_oss_store"]


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    """folders(kind) -> (path, source class): each model written once per module."""
    made = {}

    def get(kind):
        if kind not in made:
            tmp = tmp_path_factory.mktemp(kind)
            family = "gpt_oss" if kind.startswith("gpt_oss") else "mixtral"
            if kind == "sharded":  # experts spread over several files: a batch spans them
                build("qwen3_moe", tmp / "src", max_shard_size="20KB")
                made[kind] = (tmp / "src", Checkpoint)
            elif "store" in kind:
                dtype = kind.split("_")[-1] if kind.startswith("store_") else None
                made[kind] = (convert(tiny(family)[0], tmp / "store", progress=False, experts_dtype=dtype),
                              StoreSource)  # fmt: skip
            else:
                made[kind] = (tiny(family)[0], Checkpoint)
        return made[kind]

    return get


def _open(folders, kind, **reader):
    path, cls = folders(kind)
    return cls(path, reader=DirectReader(**reader))


def _bank(source, n):
    """n slots laid out as the expert cache lays them (fused gate_up, int4 scales as strided views), filled
    with a byte pattern so that any byte a read misses shows."""
    template = source.read_expert(*source.expert_keys()[0])
    bank = bank_spec(template).allocate(n, "cpu")
    for t in bank.storage.values():
        t.view(-1).view(torch.uint8).fill_(0xA5)
    return bank


@pytest.mark.parametrize("chunk", [None, ALIGN], ids=["whole", "4KiB-chunks"])
@pytest.mark.parametrize("kind", KINDS)
def test_batched_reads_equal_per_expert_reads(folders, kind, chunk):
    source = _open(folders, kind, **({"chunk_bytes": chunk} if chunk else {}))
    keys = source.expert_keys()
    want = {k: source.read_expert(*k) for k in keys}
    order = random.Random(0).sample(keys, len(keys))  # any order, any mix of layers
    bank = _bank(source, len(order))
    source.read_experts(order, bank.slots)
    for key, slot in zip(order, bank.slots):
        assert set(slot) == set(want[key])
        for name, t in want[key].items():
            assert torch.equal(slot[name], t), (kind, key, name)


@pytest.mark.parametrize("kind", ["checkpoint", "store", "gpt_oss"])
def test_batched_reads_into_plain_and_converted_outs(folders, kind):
    """Destinations that cannot take the stored bytes (another dtype) are decoded and copied."""
    source = _open(folders, kind)
    keys = source.expert_keys()[:5]
    want = [source.read_expert(*k) for k in keys]
    outs = [{n: torch.empty_like(t, dtype=torch.float64) for n, t in w.items()} for w in want]
    source.read_experts(keys, outs)
    for w, out in zip(want, outs):
        assert all(torch.equal(out[n], w[n].double()) for n in w)


@pytest.mark.parametrize("kind", ["checkpoint", "store"])
def test_a_layer_is_one_read(folders, kind):
    """A layer's experts lie next to each other (safetensors names sort them so; a store writes them so)."""
    source = _open(folders, kind)
    layer0 = [k for k in source.expert_keys() if k[0] == 0]
    bank = _bank(source, len(layer0))
    source.reader.reset_stats()
    source.read_experts(layer0, bank.slots)
    stats = source.reader.stats()
    assert stats["reads"] == 1


def _config(source):
    return source.config


def _cache(source, budget=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ExpertCache(source, _config(source), budget, **kw)


@pytest.mark.parametrize("kind", ["checkpoint", "store"])
def test_a_layer_step_costs_a_few_reads(folders, kind):
    source = _open(folders, kind)
    cache = _cache(source, io_threads=2)
    layer = source.expert_keys()[0][0]
    experts = [e for lay, e in source.expert_keys() if lay == layer]
    source.reader.reset_stats()
    held = cache.acquire(layer, experts)
    assert len(held) == len(experts) > 2
    # one batch per reading thread, each batch one span: not one read (or three) per expert
    assert source.reader.stats()["reads"] <= 2
    for e, slot in held.items():
        want = source.read_expert(layer, e)
        assert all(torch.equal(cache.views[slot][n], t) for n, t in want.items())
    cache.release_held(layer, held)
    s = cache.stats()
    assert s["misses"] == len(experts) and s["bytes_read"] == sum(
        source.expert_nbytes(layer, e) for e in experts
    )
    cache.close()


class PerExpertOnly:
    """A source without read_experts: the cache reads it one expert at a time."""

    def __init__(self, inner):
        self.inner, self.path, self.config = inner, inner.path, inner.config

    def expert_keys(self):
        return self.inner.expert_keys()

    def expert_nbytes(self, layer, e):
        return self.inner.expert_nbytes(layer, e)

    def read_expert(self, layer, e, out=None):
        return self.inner.read_expert(layer, e, out)


def test_cache_without_read_experts_falls_back(folders):
    source = PerExpertOnly(_open(folders, "store"))
    cache = _cache(source, io_threads=2)
    experts = list(range(source.config.num_experts))
    held = cache.acquire(0, experts)
    for e, slot in held.items():
        want = source.read_expert(0, e)
        assert all(torch.equal(cache.views[slot][n], t) for n, t in want.items())
    assert source.inner.reader.stats()["reads"] >= len(experts)  # one read per expert at least
    cache.release_held(0, held)
    cache.close()


@pytest.fixture
def damaged(folders, tmp_path):
    """A copy of the mixtral store with one byte of expert 3 of layer 0 flipped."""
    path = tmp_path / "store"
    shutil.copytree(folders("store")[0], path)
    entry = read_manifest(path).experts[(0, 3)]
    with open(path / EXPERTS_FILE, "r+b") as f:
        f.seek(entry.offset + entry.nbytes // 2)
        b = f.read(1)
        f.seek(entry.offset + entry.nbytes // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    return path


@pytest.mark.parametrize("chunk", [None, ALIGN], ids=["whole", "4KiB-chunks"])
def test_damaged_expert_in_a_batch_raises(damaged, chunk):
    source = StoreSource(damaged, reader=DirectReader(**({"chunk_bytes": chunk} if chunk else {})))
    keys = [(0, e) for e in range(source.config.num_experts)]
    with pytest.raises(CorruptFile, match="checksum mismatch for expert 3 of layer 0"):
        source.read_experts(keys, _bank(source, len(keys)).slots)
    unchecked = StoreSource(damaged, verify_checksums=False)
    unchecked.read_experts(keys, _bank(unchecked, len(keys)).slots)  # reads, damage and all


def test_damaged_expert_frees_its_slots(damaged):
    source = StoreSource(damaged)
    cache = _cache(source, io_threads=2)
    experts = list(range(source.config.num_experts))
    with pytest.raises(CorruptFile, match="checksum mismatch for expert 3 of layer 0"):
        cache.acquire(0, experts)
    resident = cache.resident()
    assert (0, 3) not in resident  # never left in a slot, half filled
    assert not cache.res.in_use  # the step let go of everything it held
    assert len(resident) + len(cache.res.free) == cache.capacity
    for layer, e in resident:  # what stayed was read whole and checked
        want = source.read_expert(layer, e)
        slot = cache.res.slot[(layer, e)]
        assert all(torch.equal(cache.views[slot][n], t) for n, t in want.items())
    with pytest.raises(CorruptFile):  # asked again, it is read again, not served from a stale slot
        cache.acquire(0, [3])
    held = cache.acquire(0, [e for e in experts if e != 3])  # the rest still work
    cache.release_held(0, held)
    assert not cache.res.in_use
    cache.close()


def test_damaged_prefetch_frees_its_slots(damaged):
    source = StoreSource(damaged)
    cache = _cache(source)
    cache.prefetch(0, [1, 2, 3])
    with pytest.raises(CorruptFile):
        cache.acquire(0, [3, 0])  # the guess of 3 is read (by a prefetch thread or with the miss) and fails
    for f in list(cache.loading.values()):  # the other guesses may still be landing
        f.exception()
    assert (0, 3) not in cache.resident() and not cache.res.in_use
    assert len(cache.resident()) + len(cache.res.free) == cache.capacity
    cache.close()


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("chunk", [ALIGN, 3 * ALIGN, 1 << 20])
def test_read_pieces_covers_every_range_in_order(tmp_path, direct, chunk):
    import os

    path = tmp_path / "data.bin"
    data = os.urandom(40 * ALIGN + 77)
    path.write_bytes(data)
    rng = random.Random(chunk)
    ranges = [(path, 0, 5), (path, 5, ALIGN), (path, len(data) - 9, 9), (path, 7 * ALIGN + 3, 0)]
    for _ in range(30):
        a = rng.randrange(len(data) - 1)
        ranges.append((path, a, rng.randrange(1, min(6 * ALIGN, len(data) - a) + 1)))
    reader = DirectReader(direct=direct, chunk_bytes=chunk)
    got = [bytearray() for _ in ranges]
    for i, pos, view in reader.read_pieces(ranges):
        assert pos == len(got[i])  # a range's pieces come in order, without gaps
        assert 0 < len(view) <= chunk
        got[i] += view
    assert [bytes(g) for g in got] == [data[off : off + n] for _, off, n in ranges]
    stats = reader.stats()
    # overlapping and neighbouring ranges share reads: the whole file is read about once, in chunk-sized reads
    assert stats["bytes_read"] <= len(data) + ALIGN
    assert stats["reads"] <= len(data) // chunk + 2
    with pytest.raises(CorruptFile, match="truncated"):
        list(reader.read_pieces([(path, len(data) - 4, 8)]))
