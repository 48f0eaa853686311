"""KV offload on a longer context: peak memory and tokens/s with the KV cache in RAM vs spilled to disk,
and time to first token when a saved session is resumed vs recomputing the prefix.

The model is a synthetic Mixtral-layout MoE (hidden 512, 8 layers, 8 heads, MHA so the cache is large:
32 KiB of fp32 K/V per token) written with transformers' config classes. Each configuration runs in its own
child process; peak RSS is VmHWM, reset after loading, so it covers generation alone.

    python benchmarks/kv_offload.py [--context 4096] [--decode 64] [--kv-memory 16MiB]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 1024


def build(out: Path) -> None:
    import transformers as tf

    if (out / "config.json").exists():
        return
    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=512, num_hidden_layers=8,
                              num_attention_heads=8, num_key_value_heads=8, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=16384, initializer_range=0.05,
                              bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def child(args) -> dict:
    """One measurement in this process; prints a JSON record."""
    import moepager

    kv = (
        {"kv_memory": args.kv_memory, "kv_block_size": 256, "kv_spill_dir": args.spill_dir}
        if args.spill
        else {}
    )
    engine = moepager.load(args.model, prefill_chunk=args.prefill_chunk, **kv)
    ids = prompt(args.context)
    record = {"mode": args.mode, "rss_after_load": _rss("VmRSS")}
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) so it measures generation only
        f.write("5")
    if args.mode in ("ram", "spill"):
        out = engine.generate(ids, args.decode, stop_ids=[])
        record.update(engine.stats())
        record["tokens"] = out
    elif args.mode == "save":  # build the session the resume run starts from
        t0 = time.perf_counter()
        list(engine.stream_session(args.session, ids, 1, stop_ids=[]))
        record["save_s"] = time.perf_counter() - t0 - engine.timings.prefill_s
        record["session_bytes"] = os.path.getsize(args.session)
    elif args.mode in ("resume", "recompute"):  # the conversation goes on by a few new tokens
        more = ids + prompt(16, seed=1)
        t0 = time.perf_counter()
        if args.mode == "resume":
            first = next(iter(engine.stream_session(args.session, more, 1, stop_ids=[])))
            record["session_reused_tokens"] = engine.session_reused_tokens
        else:
            first = next(iter(engine.stream(more, 1, stop_ids=[])))
        record["ttft_s"] = time.perf_counter() - t0
        record["first_token"] = first
        record["prefill_tokens"] = engine.timings.prefill_tokens
    record["peak_rss"] = _rss("VmHWM")
    return record


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_child(model: Path, mode: str, a, **extra) -> dict:
    argv = [sys.executable, __file__, "--child", mode, "--model", str(model), "--context", str(a.context),
            "--decode", str(a.decode), "--kv-memory", a.kv_memory, "--spill-dir", a.spill_dir,
            "--prefill-chunk", str(a.prefill_chunk)]  # fmt: skip
    for k, v in extra.items():
        argv += [f"--{k}", str(v)] if v is not True else [f"--{k}"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }  # spinning waits collapse when shared
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=4096, help="prompt tokens")
    p.add_argument("--decode", type=int, default=64, help="tokens generated after the prompt")
    p.add_argument("--kv-memory", default="16MiB", help="KV RAM budget of the spilled run")
    p.add_argument(
        "--prefill-chunk", type=int, default=512, help="prompt tokens per forward pass (every run)"
    )
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "moepager-kv-bench"))
    p.add_argument("--spill-dir", default=None)
    p.add_argument("--child")
    p.add_argument("--model")
    p.add_argument("--session")
    p.add_argument("--spill", action="store_true")
    a = p.parse_args()
    a.spill_dir = a.spill_dir or a.workdir
    if a.child:
        a.mode = a.child
        print(json.dumps(child(a)))
        return
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    build(model)
    kv_per_token = 8 * 2 * 8 * 64 * 4
    print(f"model: synthetic Mixtral layout, hidden 512, 8 layers, 8 heads (MHA), 4 experts top-2, fp32; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"context {a.context} prompt tokens + {a.decode} generated; KV cache at the end "
          f"{mib(kv_per_token * (a.context + a.decode))}; spilled run budget {a.kv_memory}, blocks of 256; "
          f"prefill chunk {a.prefill_chunk}")  # fmt: skip
    ram = run_child(model, "ram", a)
    spill = run_child(model, "spill", a, spill=True)
    assert spill["tokens"] == ram["tokens"], "spilled generation differs from the in-RAM one"
    print(
        "\n| KV cache | peak RSS while generating | RSS after load | prefill tok/s | decode tok/s | KV resident | read from disk | read wait |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in (("in RAM (KVCache)", ram), (f"spilled, {a.kv_memory}", spill)):
        kv = r.get("kv_cache")
        disk = (
            f"{mib(kv['resident_bytes'])} | {mib(kv['bytes_read'])} | {kv['read_wait_s']:.2f} s"
            if kv
            else "- | - | -"
        )
        print(f"| {name} | {mib(r['peak_rss'])} | {mib(r['rss_after_load'])} | {r['prefill_tokens_per_s']:.0f} | "
              f"{r['decode_tokens_per_s']:.2f} | {disk} |")  # fmt: skip
    print(f"generated tokens identical: {spill['tokens'] == ram['tokens']}")

    session = work / "bench.session"
    session.unlink(missing_ok=True)
    saved = run_child(model, "save", a, session=session)
    resume = run_child(model, "resume", a, session=session)
    recompute = run_child(model, "recompute", a)
    assert resume["first_token"] == recompute["first_token"]
    print(f"\nsession: {mib(saved['session_bytes'])} written in {saved['save_s']:.2f} s "
          f"(temp file, fsync, rename)")  # fmt: skip
    print("| first token after 16 new tokens | time to first token | prompt tokens computed | peak RSS |")
    print("| --- | --- | --- | --- |")
    print(
        f"| resume the session | {resume['ttft_s']:.2f} s | {resume['prefill_tokens']} | {mib(resume['peak_rss'])} |"
    )
    print(f"| recompute the prefix | {recompute['ttft_s']:.2f} s | {recompute['prefill_tokens']} | "
          f"{mib(recompute['peak_rss'])} |")  # fmt: skip
    print(f"same first token: {resume['first_token'] == recompute['first_token']}")


if __name__ == "__main__":
    main()
