"""Quantized experts: exact layouts, bounded rounding error, kernels equal to dequantize-then-matmul, and the
whole model's cost measured against the unquantized one."""

import pytest
import torch
import torch.nn.functional as F
from quality import LIMITS, check_lossy, zeroed_experts
from tiny_models import FAMILIES, VOCAB

import moepager
from moepager.kernels.intquant import (
    _KERNEL_LAYOUTS,
    cpu_int4_layout,
    linear,
    pack_int4,
    quantize,
    unpack_int4,
)
from moepager.model.config import ModelConfig
from moepager.model.moe import expert_forward
from moepager.store.encoding import QuantizingSource, convert_expert, expert_from_tensors, expert_tensors
from moepager.store.open_model import open_source


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["rows", *_KERNEL_LAYOUTS])
@pytest.mark.parametrize("shape", [(112, 64), (64, 32), (16, 8), (48, 2), (2, 16)])
def test_int4_layouts_round_trip(layout, shape):
    codes = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = pack_int4(codes, layout)
    assert packed.shape == (shape[0], shape[1] // 2)
    assert torch.equal(unpack_int4(packed, layout), codes)


def test_cpu_layout_is_what_torch_packs():
    layout = cpu_int4_layout()
    if layout is None:
        pytest.skip("this CPU's int4 kernel packs in a layout moepager does not know; int4 dequantizes")
    codes = torch.randint(0, 16, (208, 256), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(theirs, pack_int4(codes.to(torch.uint8), layout))


@pytest.mark.parametrize("shape", [(64, 128), (48, 256), (30, 40)])
def test_int8_error_is_half_a_step(shape):
    w = _randn(*shape) * 0.1
    q = quantize(w, "int8")
    step = q.scales.float()[:, None]  # [N, 1]
    err = (q.dequantize() - w).abs()
    assert (err <= step / 2 * 1.0001 + 1e-7).all()
    assert q.nbytes == shape[0] * shape[1] + 2 * shape[0]


@pytest.mark.parametrize("shape,group", [((64, 128), 128), ((64, 96), 32), ((32, 16), 16)])
def test_int4_error_is_half_a_step(shape, group):
    w = _randn(*shape) * 0.1
    q = quantize(w, "int4")
    assert q.group_size == group
    n, k = shape
    step = q.scales[..., 0].float().t().repeat_interleave(group, dim=1)  # [N, K]
    err = (q.dequantize() - w).abs()
    # half a step, plus the bf16 rounding of the stored zero point (ulp of |zero| <= |w| max of the group)
    zero = q.scales[..., 1].float().t().abs().repeat_interleave(group, dim=1)
    assert (err <= step / 2 + zero * 2**-8 + 1e-7).all()
    assert q.nbytes == n * k // 2 + 4 * n * (k // group)


def test_quantize_keeps_zero_rows_and_constant_groups_exact():
    w = torch.zeros(32, 64)
    assert torch.equal(quantize(w, "int8").dequantize(), w)
    w[3] = 0.5  # one value per int4 group: zero point, no step
    assert torch.equal(quantize(w, "int4").dequantize(), w)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_linear_kernels_match_dequantized_matmul(kind, tokens):
    w = quantize(_randn(128, 256, seed=3) * 0.05, kind)
    x = _randn(tokens, 256, seed=4)
    reference = F.linear(x, w.dequantize())  # fp32 math on the very same weights
    got = linear(x, w.data, None, w.scales)  # the in-memory form: codes and scales
    assert w._kernel_ok(x) == (kind == "int8" or cpu_int4_layout() is not None)
    assert got.dtype == x.dtype and got.shape == reference.shape
    # the kernels take bf16 activations: a relative error of a few bf16 ulps, nothing from the weights
    assert ((got - reference).abs().max() / reference.abs().max()).item() < 1e-2
    assert torch.equal(w.with_layout("rows").dequantize(), w.dequantize())  # layouts move bytes, not values


def test_dequantize_path_is_exact():
    """Shapes the kernels reject (and CUDA) compute F.linear on the dequantized weights, bit for bit."""
    w = quantize(_randn(30, 40, seed=5), "int4")  # 30 rows: no kernel tile fits
    x = _randn(3, 40, seed=6)
    assert torch.equal(linear(x, w), F.linear(x, w.dequantize()))
    w8 = quantize(_randn(32, 24, seed=7), "int8")  # K = 24: the int8 kernel needs K % 16 == 0
    assert torch.equal(linear(x[:, :24], w8), F.linear(x[:, :24], w8.dequantize()))


def test_linear_with_a_tensor_is_f_linear():
    x, w, b = _randn(4, 32, seed=8), _randn(16, 32, seed=9), _randn(16, seed=10)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    got = linear(x, w.bfloat16())  # a bf16 expert in an fp32 model computes in bf16, answers in fp32
    assert got.dtype == torch.float32
    assert torch.equal(got, F.linear(x.bfloat16(), w.bfloat16()).float())


def test_stored_form_round_trips():
    w = {"gate": _randn(64, 32), "up": _randn(64, 32), "down": _randn(32, 64), "down_bias": _randn(32)}
    for kind in ("int8", "int4"):
        q = convert_expert(w, kind)
        stored, encoding = expert_tensors(q)
        assert encoding == kind and set(stored) == set(q)
        back = expert_from_tensors({k: v.clone() for k, v in stored.items()}, encoding)
        assert all(torch.equal(back[k], q[k]) for k in q)
    assert expert_tensors(w) == (w, "plain")


@pytest.mark.parametrize("kind,tol", [("int8", 0.02), ("int4", 0.2)])
def test_expert_forward_close_to_float(kind, tol):
    d, i = 64, 128
    float_w = {
        "gate": _randn(i, d, seed=12) * 0.1,
        "up": _randn(i, d, seed=13) * 0.1,
        "down": _randn(d, i, seed=14) * 0.1,
    }
    q = convert_expert(float_w, kind)
    x = _randn(6, d, seed=15)
    swiglu = ModelConfig("t", 1, d, 1, 1, 1, d, 1, 1e-6)
    ref = expert_forward(float_w, x, swiglu)
    got = expert_forward(q, x, swiglu)
    assert ((got - ref).norm() / ref.norm()).item() < tol


def test_quantizing_source_reads_fill_buffers(tiny):
    path, _ = tiny("qwen2_moe")  # moe_intermediate 16: down has K = 16, gate/up N = 16
    src = QuantizingSource(open_source(path), "int4")
    w = src.read_expert(0, 1)
    assert set(w) == {"gate", "up", "down", "gate_scales", "up_scales", "down_scales"}
    out = src.read_expert(0, 1, out={k: torch.empty_like(v) for k, v in w.items()})
    assert all(torch.equal(out[k], w[k]) for k in w)
    assert src.expert_nbytes(0, 1) == open_source(path).expert_nbytes(0, 1)  # disk bytes are the source's


@pytest.fixture(scope="module")
def logits_of(tiny):
    """family -> (ids, transformers' logits, the same model's logits with its routed experts zeroed)."""
    made = {}

    def get(family):
        if family not in made:
            ref = tiny(family)[1]
            ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(16))
            with torch.no_grad():
                made[family] = (ids, ref(ids).logits, zeroed_experts(ref)(ids).logits)
        return made[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("experts_dtype", ["bf16", "int8", "int4"])
def test_model_with_quantized_experts_stays_close(tiny, logits_of, family, experts_dtype):
    path, _ = tiny(family)
    ids, exact, zeroed = logits_of(family)
    lossy = moepager.load(path, experts_dtype=experts_dtype)
    got = lossy.logits(ids)
    check_lossy(got, exact, zeroed, LIMITS[experts_dtype])
    agree = (got.argmax(-1) == exact.argmax(-1)).float().mean().item()
    assert agree >= {"bf16": 0.9, "int8": 0.8, "int4": 0.5}[experts_dtype]
    assert lossy.experts.nbytes() < moepager.load(path).experts.nbytes()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_a_model_without_its_experts_fails_every_quantized_check(tiny, logits_of, tmp_path, family):
    """The negative control: moepager running the checkpoint with every routed expert zeroed passes none of the
    limits above (a plain relative logit error would not tell it apart: 0.07-0.58 on these models, int4's size)."""
    ids, exact, zeroed = logits_of(family)
    zeroed_experts(tiny(family)[1]).save_pretrained(tmp_path)
    got = moepager.load(tmp_path).logits(ids)
    assert (got - zeroed).abs().max().item() < 1e-4  # it is the zeroed model
    for limit in sorted(set(LIMITS.values())):
        with pytest.raises(AssertionError, match="median share"):
            check_lossy(got, exact, zeroed, limit)


def test_unknown_experts_dtype_is_a_clear_error(tiny):
    path, _ = tiny("mixtral")
    with pytest.raises(moepager.MoepagerError, match="experts dtype 'int3'"):
        moepager.load(path, experts_dtype="int3")


@pytest.mark.parametrize("experts_dtype", ["int8", "int4"])
def test_quantized_store_reads_fewer_bytes_and_pages(tiny, tmp_path, experts_dtype):
    from moepager.store.convert import convert

    path, _ = tiny("mixtral")
    store = convert(path, tmp_path / "store", progress=False, experts_dtype=experts_dtype, dense_dtype="fp32")
    at_load = moepager.load(path, experts_dtype=experts_dtype)
    from_store = moepager.load(store)
    paged = moepager.load(store, expert_memory="25%", prefetch=False)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(17))
    expected = at_load.logits(ids)
    assert torch.equal(
        from_store.logits(ids), expected
    )  # the store holds exactly what load-time quantization makes
    assert torch.equal(paged.logits(ids), expected)  # and paging it changes nothing
    prompt = ids[0, :4]
    assert paged.generate(prompt, 12, stop_ids=[]) == at_load.generate(prompt, 12, stop_ids=[])
    src, plain = open_source(store), open_source(path)
    assert src.expert_nbytes(0, 0) < plain.expert_nbytes(0, 0)
    stats = paged.stats()["experts"]
    assert stats["bytes_read"] > 0


def test_unknown_dense_dtype_is_a_clear_error(tiny, tmp_path):
    from moepager.store.convert import convert

    with pytest.raises(moepager.MoepagerError, match="dense dtype 'int8'"):
        convert(tiny("mixtral")[0], tmp_path / "s", progress=False, dense_dtype="int8")


def test_cli_convert_and_run_quantized(tiny, tmp_path, capsys):
    from moepager.cli import main

    path, _ = tiny("mixtral")
    out = tmp_path / "q"
    assert (
        main(["convert", str(path), str(out), "--experts-dtype", "int4", "--dense-dtype", "bf16", "--quiet"])
        == 0
    )
    assert main(["run", str(out), "--prompt-ids", "1,2,3", "--max-tokens", "3", "--json"]) == 0
    assert (
        main(["run", str(path), "--prompt-ids", "1,2,3", "--max-tokens", "3", "--experts-dtype", "int8"]) == 0
    )
    assert capsys.readouterr().out.count("\n") >= 2
