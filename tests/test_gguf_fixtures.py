"""GGUF files written by llama.cpp's own converter (f32, q8_0) and quantizer (q4_0), committed in fixtures/gguf with
the tiny checkpoints they were made from (fixtures/make_gguf_fixtures.py; PROVENANCE.json names the llama.cpp
commit). An f32 file runs as transformers runs its checkpoint; every file gives the logits llama.cpp gave for it
(stored beside it, and recomputed where llama-cpp-python is installed)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from quality import expert_share_error, zeroed_experts
from tiny_models import record_gpt_oss_projections

import moepager
from moepager.paging import paged

FIXTURES = Path(__file__).parent / "fixtures" / "gguf"
PROVENANCE = json.loads((FIXTURES / "PROVENANCE.json").read_text())
IDS = torch.tensor([PROVENANCE["logits_ids"]])  # [1, T]: the tokens llama.cpp's stored logits are for
# "moefy": moefy's own Qwen2-MoE output (its shared-expert gate once made llama.cpp's logits NaN)
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "moefy"]
TYPES = ["f32", "q8_0", "q4_0"]
# moepager computes a q8_0 or q4_0 file with llama.cpp's own kernels (activations rounded to 8 bits, integer dot
# products; fp16 rows with fp16 activations; DeepSeek's MLA over its latent, k_b and v_b as products of their
# own), so most files give llama.cpp's logits bit for bit (measured 0 for Mixtral, Qwen3-MoE, OLMoE and
# DeepSeek-V2/V3, f32 files within 6e-7). The rest differ where the float parts around the kernels do, and 8-bit
# rounding carries an ulp across a boundary now and then: GPT-OSS (its f32 file is already 1.3e-4 from llama.cpp,
# which is also how far llama.cpp is from transformers; quantized 1.0-2.8e-2), Qwen2-MoE q4_0 (3.7e-3)
LLAMA_CPP_REL = {"f32": 1e-5, "q8_0": 1e-5, "q4_0": 1e-5}
LOOSER = {("gpt_oss", "f32"): 3e-4, ("gpt_oss", "q8_0"): 0.04, ("gpt_oss", "q4_0"): 0.04,
          ("qwen2_moe", "q4_0"): 1e-2}  # fmt: skip
SHARE = 0.4


@pytest.fixture(scope="module")
def reference():
    """family -> (transformers model of the fixture's checkpoint, its logits for IDS, the same with its routed
    experts zeroed)."""
    import transformers as tf

    made = {}

    def get(family):
        if family not in made:
            ref = tf.AutoModelForCausalLM.from_pretrained(FIXTURES / family, dtype=torch.float32).eval()
            with torch.no_grad():
                made[family] = (ref, ref(IDS).logits, zeroed_experts(ref)(IDS).logits)
        return made[family]

    return get


def gguf(family: str, kind: str) -> Path:
    return FIXTURES / f"{family}.{kind}.gguf"


def llama_cpp_logits(family: str, kind: str) -> torch.Tensor:
    return torch.from_numpy(np.load(f"{gguf(family, kind)}.logits.npy"))[None]  # [1, T, V]


def relative(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """[tokens] |got - want| / |want| over the vocabulary."""
    return ((got - want).norm(dim=-1) / want.norm(dim=-1)).flatten()


def greedy(ref, prompt: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens by full forwards (transformers' generate would keep the fixtures' eos token out)."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, ref(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, prompt.shape[1] :].tolist()


def test_fixtures_are_small_and_from_llama_cpp():
    assert len(PROVENANCE["llama_cpp_commit"]) == 40 and PROVENANCE["llama_cpp_python"]
    for family in FAMILIES:
        for kind in TYPES:
            assert gguf(family, kind).stat().st_size < 300_000
        assert (FIXTURES / family / "model.safetensors").stat().st_size < 300_000


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_file_runs_like_its_checkpoint(reference, family):
    ref, expected, _ = reference(family)
    resident = moepager.load(gguf(family, "f32"))
    paged = moepager.load(gguf(family, "f32"), expert_memory="50%", prefetch=False)
    for engine in (resident, paged):
        assert (engine.logits(IDS) - expected).abs().max().item() < 1e-4
    prompt = IDS[:, :5]
    want = greedy(ref, prompt, 12)
    assert resident.generate(prompt[0], max_new_tokens=12, stop_ids=[]) == want
    assert paged.generate(prompt[0], max_new_tokens=12, stop_ids=[]) == want


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_file_gives_llama_cpps_logits(reference, family, kind):
    _, exact, zeroed = reference(family)
    want = llama_cpp_logits(family, kind)
    got = moepager.load(gguf(family, kind)).logits(IDS)
    assert relative(got, want).max().item() < LOOSER.get((family, kind), LLAMA_CPP_REL[kind])
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # measured against what the routed experts add (quality.py), the difference is at most 0.2 of it (Q8_0
    # Qwen2-MoE), and the model without its routed experts (the negative control) is ~1 on every token
    assert expert_share_error(got, want, zeroed).max().item() < SHARE
    assert expert_share_error(zeroed, want, zeroed).min().item() > SHARE
    if kind != "f32":  # and a quantized file is not run as its unquantized checkpoint
        assert (got - exact).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_under_a_memory_limit_the_embedding_is_read_from_the_file(family, monkeypatch):
    """--memory-limit frees the token embedding's table for the expert cache: each token's row is read from the
    file (here whatever a token reads: these models are tiny). The logits are the resident engine's bit for bit
    (which test_file_gives_llama_cpps_logits holds to llama.cpp's), with llama.cpp's argmax, prefill and decode
    alike: a row read wrongly, or a neighbour's row, changes them."""
    resident = moepager.load(gguf(family, "q8_0"))
    monkeypatch.setattr(paged, "ROWS_FROM_FILE_TOKEN_BYTES", 0)
    limited = moepager.load(gguf(family, "q8_0"), memory_limit="1GiB", max_context=64)
    embed = limited.model.embed
    assert embed.read_rows is not None and embed.blocks.numel() == 0
    got = limited.logits(IDS)
    assert torch.equal(got.argmax(-1), llama_cpp_logits(family, "q8_0").argmax(-1))
    assert torch.equal(got, resident.logits(IDS))
    prompt = IDS[0, :5].tolist()
    decode = lambda e: list(e.stream(prompt, 12, temperature=1.0, seed=3))  # noqa: E731
    assert decode(limited) == decode(resident)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        embed(torch.tensor([limited.config.vocab_size]))
    assert limited.identity() == resident.identity()  # a saved session resumes under either


def test_the_embedding_of_a_model_whose_token_reads_little_stays_in_memory():
    """A row read from the disk would be a noticeable part of a small model's token: under a limit its table is
    kept, and counted in the plan."""
    engine = moepager.load(gguf("qwen3_moe", "q8_0"), memory_limit="1GiB", max_context=64)
    assert paged.token_bytes(engine.model, engine.source) < paged.ROWS_FROM_FILE_TOKEN_BYTES
    assert engine.model.embed.read_rows is None and engine.model.embed.blocks.numel() > 0


def test_an_embedding_the_output_head_shares_stays_in_memory(monkeypatch):
    """A tied head that computes from the embedding's own bytes (not repacked) keeps them: reading the rows from
    the file would free nothing."""
    from moepager.paging.paged import embedding_from_file

    monkeypatch.setattr(paged, "ROWS_FROM_FILE_TOKEN_BYTES", 0)
    engine = moepager.load(gguf("qwen3_moe", "q8_0"))
    model, own = engine.model, engine.model.lm_head.blocks
    model.lm_head.blocks = model.embed.blocks
    embedding_from_file(model, engine.source)
    assert model.embed.read_rows is None and model.embed.blocks.numel() > 0
    model.lm_head.blocks = own
    embedding_from_file(model, engine.source)
    assert model.embed.read_rows is not None and model.embed.blocks.numel() == 0


LLAMA_CPP = """
import sys
import numpy as np
import llama_cpp
path, out, ids = sys.argv[1], sys.argv[2], [int(i) for i in sys.argv[3].split(",")]
llm = llama_cpp.Llama(path, n_ctx=64, n_batch=64, logits_all=True, type_k=0, type_v=0, n_threads=1, verbose=False)
llm.eval(ids)
np.save(out, np.asarray(llm.scores[: len(ids)], dtype=np.float32))
"""


def test_stored_logits_are_what_llama_cpp_computes(tmp_path):
    """Where llama-cpp-python is installed: the stored logits are recomputed (one file per type). llama.cpp runs
    in its own process: its libggml and the libggml-python wheel's share a soname, so one process holds one."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: the files are checked against the llama.cpp logits stored "
                    "beside them (written by make_gguf_fixtures.py --llama-python)")  # fmt: skip
    for family, kind in [
        ("qwen3_moe", "f32"),
        ("gpt_oss", "q8_0"),
        ("deepseek_v3", "q4_0"),
        ("moefy", "q8_0"),
    ]:
        out = tmp_path / f"{family}.{kind}.npy"
        ids = ",".join(map(str, IDS[0].tolist()))
        subprocess.run([sys.executable, "-c", LLAMA_CPP, str(gguf(family, kind)), str(out), ids], check=True,
                       timeout=300)  # fmt: skip
        now = torch.from_numpy(np.load(out))[None]
        assert relative(now, llama_cpp_logits(family, kind)).max().item() < 1e-5


def test_gpt_oss_file_reaches_llama_cpps_clamp(reference):
    """llama.cpp clamps GPT-OSS's gate (above) and up (both sides) projections at a fixed 7; the fixture's
    projections pass it, so the tests above compare the clamp with transformers' and llama.cpp's."""
    import transformers as tf

    ref = tf.AutoModelForCausalLM.from_pretrained(FIXTURES / "gpt_oss", dtype=torch.float32).eval()
    assert ref.config.swiglu_limit == 7.0
    seen = record_gpt_oss_projections(ref)  # each expert call's projections, before clamping
    with torch.no_grad():
        assert torch.equal(ref(IDS).logits, reference("gpt_oss")[1])
    gate_up = torch.cat(
        [g.reshape(-1, g.shape[-1]) for g in seen]
    )  # [tokens * K, 2I], gate and up interleaved
    gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    assert gate.max() > 7 and up.max() > 7 and up.min() < -7


def test_headers_read_as_gguf_py_reads_them(tmp_path):
    """sources/gguf_file.read_header against gguf-py's own reader: every field's value and every tensor's place,
    on each committed file; a cut-off file is a clear error."""
    from gguf import GGUFReader

    from moepager.errors import CorruptFile
    from moepager.sources.gguf_file import read_header

    for path in sorted(FIXTURES.glob("*.gguf")):
        fields, tensors = read_header(path)
        reader = GGUFReader(path)
        assert fields == {name: f.contents() for name, f in reader.fields.items()}
        want = {t.name: (tuple(int(s) for s in t.shape), int(t.tensor_type), int(t.n_bytes), int(t.data_offset))
                for t in reader.tensors}  # fmt: skip
        assert {n: (t.shape, t.tensor_type, t.n_bytes, t.data_offset) for n, t in tensors.items()} == want
    cut = tmp_path / "cut.gguf"
    whole = gguf("qwen3_moe", "q8_0")
    cut.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(CorruptFile, match="not a readable GGUF file"):
        read_header(cut)
    cut.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(CorruptFile, match="runs past its end"):
        read_header(cut)
    damaged = bytearray(whole.read_bytes())
    damaged[24:32] = (1 << 60).to_bytes(8, "little")  # the first key's length: read no further than the file
    cut.write_bytes(damaged)
    with pytest.raises(CorruptFile, match="its header runs past its end"):
        read_header(cut)
