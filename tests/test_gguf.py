"""MoE GGUF files (llama.cpp names, stacked experts) written with the gguf package, run vs transformers."""

import gguf
import numpy as np
import pytest
import torch
from gguf_vocab import add_vocab
from llama_numerics import emulate_llama_numerics
from quality import LIMITS, check_lossy, zeroed_experts
from tiny_models import VOCAB, randomize

import moepager
from moepager.kernels import ggml
from moepager.sources.checkpoint import Checkpoint
from moepager.sources.gguf import EXPERT_BIASES, EXPERT_PARTS, GLOBAL_NAMES, LAYER_NAMES, GgufSource
from moepager.store.open_model import open_source

Q = gguf.GGMLQuantizationType
ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe",
        "deepseek_v3": "deepseek2", "gpt_oss": "gpt-oss"}  # fmt: skip
# moepager name -> llama.cpp's; GPT-OSS's pre-FFN norm and DeepSeek's split kv_b are written apart
_TO_GGUF = {v: k for k, v in {**LAYER_NAMES, **GLOBAL_NAMES}.items()
            if k != "post_attention_norm.weight"}  # fmt: skip


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows of llama-architecture models."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Rows of 256 -> Q4_K blocks (the gguf package only dequantizes this type): per 32-value sub-block a
    6-bit scale and min of the block's fp16 d and dmin, 4-bit codes; x ~= d * sc * q - dmin * m."""
    x = w.reshape(-1, 8, 32).astype(np.float32)  # [blocks, sub-blocks, 32]
    lo, hi = np.minimum(x.min(-1), 0), x.max(-1)
    step, low = (hi - lo) / 15, -lo  # [blocks, 8]
    d = np.maximum(step.max(-1) / 63, 1e-8).astype(np.float16)
    dmin = np.maximum(low.max(-1) / 63, 1e-8).astype(np.float16)
    sc = np.clip(np.round(step / d.astype(np.float32)[:, None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.round(low / dmin.astype(np.float32)[:, None]), 0, 63).astype(np.uint8)
    scale = (d.astype(np.float32)[:, None] * sc)[..., None]
    offset = (dmin.astype(np.float32)[:, None] * mn)[..., None]
    q = np.clip(np.round((x + offset) / scale), 0, 15).astype(np.uint8)  # [blocks, 8, 32]
    packed_scales = np.concatenate([
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=-1)  # fmt: skip
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # sub-blocks 2c and 2c+1 share 32 bytes
    blocks = np.concatenate(
        [d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), packed_scales, qs], axis=-1
    )
    return blocks.reshape(*w.shape[:-1], w.shape[-1] // 256 * 144)


def _add(writer, name: str, w: np.ndarray, qtype) -> None:
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F32  # rows that are not whole blocks: llama.cpp's quantizer keeps them unquantized too
    if qtype == Q.F32:
        writer.add_tensor(name, w)
    elif qtype == Q.F16:
        writer.add_tensor(name, w.astype(np.float16))
    elif qtype == Q.Q4_K:
        writer.add_tensor(name, quantize_q4_k(w), raw_dtype=qtype)
    else:
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)


MATRICES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "token_embd.weight",
            "output.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight")  # fmt: skip


def write_gguf(folder, out, expert_type=Q.F32, dense_type=Q.F32, down_types=None, vocab=None) -> None:
    """The checkpoint in `folder` as llama.cpp would write it: stacked experts, its names, its metadata.
    dense_type: the type of the dense matrices (norms and routers stay F32); down_types: layer -> the type of
    that layer's down experts, where it differs (as in a Q4_K_M file); vocab: tokenizer metadata
    (gguf_vocab.py)."""
    ckpt = Checkpoint(folder)
    c, raw = ckpt.config, ckpt.raw_config
    arch = ARCH[c.family]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(raw.get("intermediate_size", c.moe_intermediate_size))
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    if c.attention == "mla":  # as llama.cpp's converter: MQA over the latent, per-head sizes apart
        w.add_key_length(c.kv_lora_rank + c.rope_dim)
        w.add_value_length(c.kv_lora_rank)
        w.add_key_length_mla(c.head_dim)
        w.add_value_length_mla(c.v_head_dim)
        w.add_q_lora_rank(c.q_lora_rank)
        w.add_kv_lora_rank(c.kv_lora_rank)
        w.add_rope_dimension_count(c.rope_dim)
        w.add_leading_dense_block_count(c.moe_layers.index(True))
        w.add_expert_shared_count(c.shared_expert_size // c.moe_intermediate_size)
        w.add_expert_weights_scale(c.routed_scaling_factor)
        w.add_expert_weights_norm(c.norm_topk_prob)
        w.add_expert_group_count(c.n_group)
        w.add_expert_group_used_count(c.topk_group)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    else:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    if c.rope["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(c.rope["factor"])
        w.add_rope_scaling_orig_ctx_len(c.rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(c.rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(c.rope["beta_slow"])
    if c.family == "gpt_oss":
        w.add_sliding_window(next(x for x in c.sliding_windows if x))
    w.add_rope_freq_base(c.rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.top_k)
    if arch != "llama":
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if c.shared_expert_size and c.attention != "mla":
        w.add_expert_shared_feed_forward_length(c.shared_expert_size)
    if c.family == "qwen2_moe":
        w.add_expert_weights_norm(c.norm_topk_prob)
    if vocab is not None:
        add_vocab(w, vocab)
    sd = ckpt.dense_state_dict()
    if c.tie_embeddings:
        sd.pop("lm_head.weight")
    for name, t in sd.items():
        parts = name.split(".")
        if parts[0] == "layers":
            gname = f"blk.{parts[1]}.{_TO_GGUF['.'.join(parts[2:])]}"
        else:
            gname = _TO_GGUF[name]
        a = t.float().numpy()
        if gname.endswith("attn_kv_b.weight"):  # split as the converter does: k_b transposed, v_b
            kv = a.reshape(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, -1)
            _add(w, gname.replace("kv_b", "k_b"), kv[:, : c.qk_nope_head_dim].transpose(0, 2, 1), Q.F32)
            _add(w, gname.replace("kv_b", "v_b"), kv[:, c.qk_nope_head_dim :], Q.F32)
            continue
        if c.family == "gpt_oss" and gname.endswith("ffn_norm.weight"):
            gname = gname.replace("ffn_norm", "post_attention_norm")
        if arch == "llama" and gname.endswith("attn_q.weight"):
            a = llama_permute(a, c.num_heads)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            a = llama_permute(a, c.num_kv_heads)
        elif gname.endswith("ffn_gate_inp_shexp.weight"):
            a = a.reshape(-1)  # llama.cpp keeps the shared-expert gate as a [D] vector
        _add(w, gname, a, dense_type if gname.endswith(MATRICES) else Q.F32)
    for layer in range(c.num_layers):
        if not c.moe_layers[layer]:
            continue
        experts = [ckpt.read_expert(layer, e) for e in range(c.num_experts)]
        for gname, part in {**EXPERT_PARTS, **EXPERT_BIASES}.items():
            if part not in experts[0]:
                continue
            stacked = np.stack(
                [x[part].float().numpy() for x in experts]
            )  # [E, rows(, cols)], expert outermost
            qtype = (down_types or {}).get(layer, expert_type) if part == "down" else expert_type
            _add(w, f"blk.{layer}.{gname}", stacked, Q.F32 if part.endswith("bias") else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_files(tiny, tmp_path_factory):
    made = {}

    def get(family, expert_type=Q.F32):
        key = (family, expert_type)
        if key not in made:
            path = tmp_path_factory.mktemp("gguf") / f"{family}-{expert_type.name}.gguf"
            write_gguf(tiny(family)[0], path, expert_type)
            made[key] = path
        return made[key]

    return get


@pytest.mark.parametrize("family", list(ARCH))
def test_f32_gguf_matches_transformers(tiny, gguf_files, family):
    _, ref = tiny(family)
    path = gguf_files(family)
    assert isinstance(open_source(path), GgufSource)
    engine = moepager.load(path)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    assert (engine.logits(ids) - expected).abs().max().item() < 1e-4
    prompt = ids[0, :5]
    with torch.no_grad():
        greedy = ref.generate(prompt[None], max_new_tokens=16, min_new_tokens=16, do_sample=False)[
            0, 5:
        ].tolist()
    assert engine.generate(prompt, max_new_tokens=16, stop_ids=[]) == greedy


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.F16])
def test_expert_reads_equal_gguf_dequantization(gguf_files, qtype):
    path = gguf_files("mixtral", qtype)
    src = GgufSource(path)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    for layer, e in [(0, 0), (1, 3)]:
        got = src.read_expert(layer, e)
        floats = GgufSource(path, compact=False).read_expert(layer, e)
        for gname, part in EXPERT_PARTS.items():
            t = tensors[f"blk.{layer}.{gname}"]
            assert t.tensor_type == qtype
            full = gguf.quants.dequantize(t.data, t.tensor_type)  # [E, rows, cols], the package's reference
            expected = torch.from_numpy(np.asarray(full[e], dtype=np.float32))
            assert torch.equal(floats[part].float(), expected)
            # kept as the file's blocks (fp16 rows too), which decode to the same floats
            assert torch.equal(got[part], torch.from_numpy(np.asarray(t.data)[e].copy()).view(torch.uint8))
            assert torch.equal(ggml.dequantize(qtype, got[part]), expected)
        per_expert = sum(tensors[f"blk.{layer}.{g}"].n_bytes for g in EXPERT_PARTS) // 4
        assert src.expert_nbytes(layer, e) == per_expert  # one range per matrix: the quantized bytes only


@pytest.mark.parametrize("qtype,min_agree", [(Q.Q8_0, 0.9), (Q.Q4_0, 0.6)])
def test_quantized_gguf_runs_close_to_the_reference(tiny, gguf_files, qtype, min_agree):
    _, ref = tiny("mixtral")
    engine = moepager.load(gguf_files("mixtral", qtype))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, zeroed = ref(ids).logits, zeroed_experts(ref)(ids).logits
    got = engine.logits(ids)
    check_lossy(got, expected, zeroed, LIMITS[qtype.name])
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= min_agree


def test_q4_k_experts(tmp_path):
    """Q4_K needs rows of 256: a one-layer Mixtral with D = I = 256."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        initializer_range=0.05,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    ref = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(ref)
    ref.save_pretrained(tmp_path / "hf")
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", Q.Q4_K)
    src = GgufSource(tmp_path / "m.gguf")
    t = next(
        t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors if t.name == "blk.0.ffn_down_exps.weight"
    )
    full = gguf.quants.dequantize(t.data, t.tensor_type)
    assert torch.equal(
        ggml.dequantize(Q.Q4_K, src.read_expert(0, 2)["down"]),
        torch.from_numpy(np.asarray(full[2], dtype=np.float32)),
    )
    engine = moepager.load(tmp_path / "m.gguf")
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, zeroed = ref(ids).logits, zeroed_experts(ref)(ids).logits
    check_lossy(engine.logits(ids), expected, zeroed, LIMITS["Q4_K"])


def test_gguf_with_quantized_experts_at_load(tiny, gguf_files):
    """A GGUF's experts can be re-quantized for the CPU kernels like any source's."""
    path = gguf_files("mixtral", Q.Q8_0)
    exact, q8 = moepager.load(path), moepager.load(path, experts_dtype="int8")
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        zeroed = zeroed_experts(tiny("mixtral")[1])(ids).logits
    check_lossy(q8.logits(ids), exact.logits(ids), zeroed, LIMITS["int8"])


def test_cli_runs_a_gguf(gguf_files, capsys):
    from moepager.cli import main

    assert (
        main(["run", str(gguf_files("mixtral")), "--prompt-ids", "1,2,3", "--max-tokens", "4", "--json"]) == 0
    )
    assert '"token_ids"' in capsys.readouterr().out


def test_not_a_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(moepager.MoepagerError, match="not a readable GGUF"):
        moepager.load(bad)
    with pytest.raises(moepager.MoepagerError, match="no such GGUF"):
        moepager.load(tmp_path / "missing.gguf")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_compact_gguf_computes_as_llama_cpp(tiny, tmp_path, family, monkeypatch):
    """Blocks kept as they are (attention, embedding, output, shared expert, experts with a type per layer)
    are computed as llama.cpp computes them: the dequantized model with each matrix's input rounded to 8-bit
    blocks (llama_numerics.py, written independently of the kernels), resident and paged, in a fraction of
    the dequantized model's memory."""
    path = tmp_path / "m.gguf"
    write_gguf(tiny(family)[0], path, Q.Q8_0, dense_type=Q.Q8_0, down_types={1: Q.Q4_0})
    floats = moepager.load(GgufSource(path, compact=False))
    compact = moepager.load(path)
    paged = moepager.load(path, expert_memory="25%", prefetch=False)
    assert compact.experts.nbytes() < floats.experts.nbytes() * (0.3 if family == "mixtral" else 0.8)
    assert not any(p.dtype == torch.float32 and p.dim() == 2 and p.shape[0] > 64
                   for n, p in compact.model.named_parameters() if "router" not in n)  # fmt: skip
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    unrounded = floats.logits(ids)
    emulate_llama_numerics(floats, compact, monkeypatch)
    expected = floats.logits(ids)
    assert (expected - unrounded).abs().max().item() > 1e-3  # the rounding is visible at this tolerance
    for engine in (compact, paged):
        # summation order moves a value by an ulp, which can carry an activation across a rounding boundary
        # (seen at one of 24 positions, in some families): that position's logits then move by up to ~4e-3
        per_position = (engine.logits(ids) - expected).abs().amax(-1)  # [2, 12]
        assert per_position.max().item() < 1e-2 and (per_position < 1e-5).float().mean().item() > 0.9
    prompt = ids[0, :5]
    greedy = floats.generate(prompt, max_new_tokens=16, stop_ids=[])
    assert compact.generate(prompt, max_new_tokens=16, stop_ids=[]) == greedy
    assert paged.generate(prompt, max_new_tokens=16, stop_ids=[]) == greedy
    assert paged.stats()["experts"]["misses"] > 0


def test_batched_reads_of_blocks_equal_one_by_one(tiny, tmp_path):
    """A layer's experts read together land in flat slot buffers exactly as read one at a time."""
    path = tmp_path / "m.gguf"
    write_gguf(tiny("mixtral")[0], path, Q.Q4_0, down_types={1: Q.Q8_0})
    src = GgufSource(path)
    keys = [(0, 1), (0, 3), (1, 0), (1, 2)]
    size = {p: max(n for (_, n, _, _) in [src.experts[k][p] for k in keys]) for p in EXPERT_PARTS.values()}
    outs = [{p: torch.zeros(n, dtype=torch.uint8) for p, n in size.items()} for _ in keys]
    reads = src.reader.stats()["reads"]
    src.read_experts(keys, outs)
    assert src.reader.stats()["reads"] - reads <= 2  # each layer's experts lie together: one span each
    for key, out in zip(keys, outs):
        one = src.read_expert(*key)
        for part, t in one.items():
            assert torch.equal(out[part][: t.numel()], t.flatten())
