"""EngineOptions: load()'s options as one typed object, built from flat names, from the command line's flags,
and taken by load() in either form with the same result."""

import pytest
import torch

import moepager
from moepager.cli import build_parser
from moepager.cli.model_options import engine_options
from moepager.runtime.options import EngineOptions, PagingOptions


def test_flat_names_land_in_their_groups():
    o = EngineOptions.of(device="cpu", dtype="float32", expert_memory="25%", pins=[[0, 3]], kv_memory="64MiB",
                         experts_dtype="int8", ray="local", ray_replicate=1, speculate="ngram", draft_tokens=2)  # fmt: skip
    assert (o.device, o.dtype) == ("cpu", "float32")
    assert o.paging == PagingOptions(expert_memory="25%", pins=((0, 3),)) and o.paging.enabled
    assert o.kv.kv_memory == "64MiB" and o.kv.kv_block_size == 256
    assert o.quant.experts_dtype == "int8"
    assert (o.distributed.ray, o.distributed.ray_replicate) == ("local", 1)
    assert (o.speculation.speculate, o.speculation.draft_tokens) == ("ngram", 2)
    later = EngineOptions.of(o, memory_limit="1GiB")  # a base, with one option changed
    assert later.paging.memory_limit == "1GiB" and later.paging.expert_memory == "25%" and later.kv == o.kv
    assert not EngineOptions().paging.enabled


def test_an_unknown_option_is_refused_by_name():
    with pytest.raises(TypeError, match="unknown engine options: expert_memroy"):
        EngineOptions.of(expert_memroy="25%")
    with pytest.raises(TypeError, match="unknown engine options"):
        moepager.load(None, cache_size="1GiB")


def test_the_command_line_builds_them_in_one_place():
    args = build_parser().parse_args(["run", "m", "--expert-memory", "25%", "--pin", "0:1,2:3", "--no-prefetch",
                                      "--kv-memory", "8MiB", "--speculate", "self", "--dtype", "float32"])  # fmt: skip
    source, o = engine_options(args, "m")
    assert source == "m" and o.dtype == "float32"
    assert o.paging.expert_memory == "25%" and o.paging.pins == ((0, 1), (2, 3)) and not o.paging.prefetch
    assert o.kv.kv_memory == "8MiB" and o.kv.prefill_chunk is None and o.speculation.speculate == "self"
    serve = build_parser().parse_args(["serve", "m", "--memory-limit", "1GiB"])  # serve has fewer flags
    _, s = engine_options(serve, "m")
    assert s.paging.memory_limit == "1GiB" and s.paging.prefetch is None and s.paging.pins == ()
    assert o.paging.fill is None and s.paging.fill is None  # the default: a fill under a memory limit only
    for command in ("run", "serve"):
        for flag, field, value in (("--fill", "fill", True), ("--no-fill", "fill", False),
                                   ("--prefetch", "prefetch", True), ("--no-prefetch", "prefetch", False)):  # fmt: skip
            _, f = engine_options(build_parser().parse_args([command, "m", flag]), "m")
            assert getattr(f.paging, field) is value


def test_load_takes_the_object_or_the_flat_names_alike(tiny):
    path = tiny("qwen3_moe")[0]
    ids = torch.tensor([[1, 5, 9, 2]])
    flat = moepager.load(path, expert_memory="50%", dtype="float32")
    typed = moepager.load(path, EngineOptions(dtype="float32", paging=PagingOptions(expert_memory="50%")))
    assert hasattr(flat.experts, "stats") and hasattr(typed.experts, "stats")  # both page
    a, b = flat.model(ids), typed.model(ids)
    assert torch.equal(a, b)
