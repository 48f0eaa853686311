"""A GGUF made from a checkpoint runs `moepager run --prompt` exactly like that checkpoint: the same prompt
ids (its own tokenizer and chat template, read from the GGUF), the same generated ids and text, in fp32.

GGUFs come from llama.cpp's own converter when $LLAMA_CPP_CONVERT names its convert_hf_to_gguf.py, and always
from the in-process writer of test_gguf.py (the converter's names, layout and tokenizer metadata)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf_vocab import hf_vocab, smollm2_gguf, spm_vocab, train_sentencepiece
from test_gguf import write_gguf
from tiny_models import configs, randomize

from moepager.cli import main

PROMPT = "The capital of France is"


def tiny_with_tokenizer(family: str, kind: str, out: Path, converter: bool = False) -> tuple[Path, dict]:
    """A tiny random checkpoint of `family` whose vocabulary is a real tokenizer's: "spm" (SentencePiece
    trained here) or "smollm2" (SmolLM2's byte-level BPE with its chat template). -> (folder, GGUF vocab)"""
    import transformers as tf

    out.mkdir(parents=True)
    if kind == "spm":
        model_file = train_sentencepiece(out)
        (out / "tokenizer.vocab").unlink()
        cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "add_bos_token": True}  # fmt: skip
        (out / "tokenizer_config.json").write_text(json.dumps(cfg))
        tok = tf.AutoTokenizer.from_pretrained(out)
    else:
        gguf = smollm2_gguf()
        tok = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(out)  # tokenizer.json: what the checkpoint side reads
    config = configs()[family]()
    config.vocab_size, config.bos_token_id, config.eos_token_id = len(tok), tok.bos_token_id, tok.eos_token_id
    if converter and family == "qwen3_moe":
        config.mlp_only_layers = []  # llama.cpp's converter does not map Qwen3-MoE's dense MLP layers
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model)
    model.save_pretrained(out)
    vocab = (
        spm_vocab(model_file)
        if kind == "spm"
        else {**hf_vocab(out, "smollm"), "chat_template": tok.chat_template}
    )
    return out, vocab


def run_json(model: Path, capsys) -> dict:
    assert main(["run", str(model), "--prompt", PROMPT, "--max-tokens", "12", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def prompt_ids(model: Path) -> tuple[list[int], str | None]:
    """The ids `run --prompt` feeds the model (through the chat template when there is one), and the template."""
    import moepager

    tok = moepager.load(model).tokenizer
    ids = tok.encode_chat([{"role": "user", "content": PROMPT}]) if tok.chat_template else tok.encode(PROMPT)
    return ids, tok.chat_template


def check_same_run(folder: Path, gguf: Path, capsys, chat: bool) -> None:
    ids, template = prompt_ids(folder)
    assert prompt_ids(gguf) == (ids, template) and len(ids) > 5 and (template is not None) == chat
    want, got = run_json(folder, capsys), run_json(gguf, capsys)
    assert got["token_ids"] == want["token_ids"] and len(want["token_ids"]) == 12
    assert got["text"] == want["text"] and want["text"].strip()
    assert want["stats"]["prefill_tokens"] == len(ids)


CASES = [("mixtral", "spm"), ("qwen3_moe", "smollm2")]
# DeepSeek-V3 (MLA with kv_b split in two, sigmoid group routing) and GPT-OSS (biases, sinks, YaRN, windows)
CONVERTED = [*CASES, ("deepseek_v3", "smollm2"), ("gpt_oss", "smollm2")]


@pytest.mark.slow
@pytest.mark.parametrize("family,kind", CASES)
def test_written_gguf_runs_like_its_checkpoint(tmp_path, capsys, family, kind):
    folder, vocab = tiny_with_tokenizer(family, kind, tmp_path / "hf")
    gguf = tmp_path / "model.gguf"
    write_gguf(folder, gguf, vocab=vocab)
    check_same_run(folder, gguf, capsys, chat=kind == "smollm2")
    # bench's prompt: the same English text through the GGUF's vocabulary as through the folder's
    from moepager.bench import make_prompt

    n_vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    (a, how), (b, _) = make_prompt(gguf, n_vocab, 16), make_prompt(folder, n_vocab, 16)
    assert a == b and how.startswith("English text")


def converter() -> Path:
    script = Path(os.environ.get("LLAMA_CPP_CONVERT", "")).expanduser()
    if not script.name or not script.is_file():
        pytest.skip("set $LLAMA_CPP_CONVERT to llama.cpp's convert_hf_to_gguf.py to test GGUFs it writes")
    return script


def convert(script: Path, folder: Path, out: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}  # the converter's own gguf package
    cmd = [sys.executable, str(script), str(folder), "--outfile", str(out), "--outtype", "f32"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family,kind", CONVERTED)
def test_converted_gguf_runs_like_its_checkpoint(tmp_path, capsys, family, kind):
    script = converter()
    folder, _ = tiny_with_tokenizer(family, kind, tmp_path / "hf", converter=True)
    check_same_run(folder, convert(script, folder, tmp_path / "model.gguf"), capsys, chat=kind == "smollm2")
