"""The OpenAI-compatible server, driven by the official openai client against a real server on 127.0.0.1.

The server runs in this process (uvicorn in a thread, on a free port) and each test module stops it.
Greedy output over HTTP is compared with `moepager run`, and the batched decode step with model.forward.
"""

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from serve_process import serve_process
from tiny_models import FAMILIES, VOCAB, copy_with_tokenizer

import moepager
from moepager.cli import main as cli_main
from moepager.generation.batching import Scheduler, Sequence
from moepager.generation.generate import SamplingParams
from moepager.model.layers import KVCache
from moepager.serving.server import create_app

KEY = "test-key"
MODEL = "tiny"
CHAT_TEMPLATE = (
    "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    path = copy_with_tokenizer(tiny("mixtral")[0], tmp_path_factory.mktemp("served"), CHAT_TEMPLATE)
    return path


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def _serving(app):
    """Run `app` with uvicorn in a thread on a free loopback port; yield its base URL; stop it after."""
    import uvicorn

    sock = _free_socket()
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(model_dir):
    """(base_url, engine, app) of a live server; stopped when the module's tests are done."""
    engine = moepager.load(model_dir)
    app = create_app(engine, MODEL, api_key=KEY)
    with _serving(app) as base:
        yield base, engine, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


def _run_cli(model_dir, capsys, prompt: str, max_tokens: int, raw: bool) -> dict:
    argv = ["run", str(model_dir), "--prompt", prompt, "--max-tokens", str(max_tokens), "--json"]
    assert cli_main(argv + (["--raw"] if raw else [])) == 0
    return json.loads(capsys.readouterr().out)


def _post(base: str, path: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in lines if ln and not ln.startswith("#"))}


# ---------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_batch_matches_forward(tiny, family):
    model = moepager.load(tiny(family)[0]).model
    g = torch.Generator().manual_seed(0)
    lengths = [3, 11, 1, 6]  # past GPT-OSS's sliding window of 8 too
    batched = [KVCache(model.config.num_layers) for _ in lengths]
    alone = [KVCache(model.config.num_layers) for _ in lengths]
    _check_decode_batch(model, lengths, batched, alone, steps=3, generator=g)
    assert [c.seq_len for c in batched] == [n + 3 for n in lengths]


def _check_decode_batch(model, lengths, batched, alone, steps, generator):
    """Prefill each sequence into both cache lists, then decode_batch must equal decoding each alone."""
    with torch.inference_mode():
        for n, cb, ca in zip(lengths, batched, alone):
            prompt = torch.randint(0, VOCAB, (1, n), generator=generator)
            model(prompt, cb), model(prompt, ca)
        for _ in range(steps):
            tokens = torch.randint(0, VOCAB, (len(lengths),), generator=generator)
            got = model.decode_batch(tokens, batched)
            expected = torch.cat([model(tokens[i].view(1, 1), c)[:, -1] for i, c in enumerate(alone)])
            assert got.shape == (len(lengths), VOCAB)
            assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_decode_batch_with_spilling_kv_caches(tiny, family):
    """The engine's block KV cache, small enough to spill, gives the same batched logits."""
    engine = moepager.load(tiny(family)[0], kv_memory="16KiB", kv_block_size=4)
    model, g = engine.model, torch.Generator().manual_seed(1)
    lengths = [3, 11, 6]
    batched, alone = [engine.new_cache() for _ in lengths], [engine.new_cache() for _ in lengths]
    _check_decode_batch(model, lengths, batched, alone, steps=8, generator=g)
    for c in batched + alone:
        c.close()


def test_scheduler_cancel_frees_the_sequence(model_dir):
    engine = moepager.load(model_dir)
    scheduler = Scheduler(engine)
    scheduler.start()
    events, done = [], threading.Event()

    def on_event(event):
        events.append(event)
        if len(events) == 3:
            seq.cancel()
        if event[0] != "token":
            done.set()

    seq = Sequence([1, 2, 3], 200, SamplingParams(), on_event)
    scheduler.submit(seq)
    assert done.wait(10)
    scheduler.stop()
    assert events[-1] == ("done", "cancelled") and len(events) <= 6
    assert seq.cache is None and seq.finished


# ------------------------------------------------------------------------------------------ the API


def test_health_and_models(server, client):
    with urllib.request.urlopen(server[0] + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_equals_run(server, client, model_dir, capsys):
    ref = _run_cli(model_dir, capsys, "w5 w9 w7", 12, raw=True)
    out = client.completions.create(model=MODEL, prompt="w5 w9 w7", max_tokens=12, temperature=0)
    assert out.choices[0].text == ref["text"]
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (3, 12, 15)


def test_chat_equals_run(server, client, model_dir, capsys):
    ref = _run_cli(model_dir, capsys, "w40 w41", 10, raw=False)
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "w40 w41"}], max_tokens=10, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref["text"]
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 10


def test_streaming_equals_non_streaming(client):
    kw = dict(model=MODEL, max_tokens=9, temperature=0)
    whole = client.completions.create(prompt="w3 w4", **kw).choices[0].text
    chunks = list(client.completions.create(prompt="w3 w4", stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "user", "content": "w3 w4"}]
    whole = client.chat.completions.create(messages=messages, **kw).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9


def test_sse_ends_with_done(server):
    body = json.dumps({"model": MODEL, "prompt": "w1", "max_tokens": 2, "stream": True}).encode()
    req = urllib.request.Request(server[0] + "/v1/completions", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [ln[len("data: ") :] for ln in r.read().decode().splitlines() if ln.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[0])["object"] == "text_completion"


def test_stop_string(client):
    kw = dict(model=MODEL, prompt="w5 w9 w7", max_tokens=12, temperature=0)
    words = client.completions.create(**kw).choices[0].text.split()
    stop = words[4]
    cut = " ".join(words[: words.index(stop)])
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(stop=[stop, "zzz"], stream=True, **kw))
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            out = client.completions.create(stop=stop, **kw)
            text, finish = out.choices[0].text, out.choices[0].finish_reason
        assert text.rstrip() == cut and finish == "stop"


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt="w8", max_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_concurrent_requests_share_decode_steps(server, client):
    prompts = ["w1", "w2 w3 w4 w5 w6", "w7 w8 w9", "w10 w11 w12 w13 w14 w15 w16 w17 w18"]
    kw = dict(model=MODEL, max_tokens=40, temperature=0)
    alone = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    before = _metrics(server[0])
    results = [None] * len(prompts)

    def ask(i):
        chunks = client.completions.create(prompt=prompts[i], stream=True, **kw)
        results[i] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == alone
    after = _metrics(server[0])
    steps = after["moepager_decode_steps_total"] - before["moepager_decode_steps_total"]
    rows = after["moepager_decode_step_sequences_total"] - before["moepager_decode_step_sequences_total"]
    assert rows == len(prompts) * 39 and steps < rows  # some steps ran several sequences at once


def test_paged_experts_in_a_batch(model_dir):
    """Experts paged at half the budget: batched output is still exact, and /metrics shows the reads."""
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4], [40]]
    resident = moepager.load(model_dir)
    expected = [resident.tokenizer.decode(resident.generate(p, 24, stop_ids=[])) for p in prompts]
    engine = moepager.load(model_dir, expert_memory="50%")
    with _serving(create_app(engine, MODEL)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30)
        results = [None] * len(prompts)

        def ask(i):
            out = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=24, temperature=0)
            results[i] = out.choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        m = _metrics(base)
    assert results == expected
    assert m["moepager_expert_read_bytes_total"] > 0 and m["moepager_expert_misses_total"] > 0
    assert "moepager_expert_resident_bytes" in m


class _SlowExperts:
    """Wraps the experts so that a long generation is still running when the client leaves."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args):
        time.sleep(0.004)
        return self.inner(*args)


def test_client_disconnect_cancels_the_sequence(server, client):
    base, engine, _ = server
    engine.model.set_experts(_SlowExperts(engine.experts))
    try:
        before = _metrics(base)["moepager_decode_tokens_total"]
        stream = client.completions.create(
            model=MODEL, prompt="w1 w2", max_tokens=200, temperature=0, stream=True
        )
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + 10
        while _metrics(base)["moepager_active_sequences"] > 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _metrics(base)["moepager_decode_tokens_total"] - before < 150
    finally:
        engine.model.set_experts(engine.experts)


def _failing_experts(*args):
    raise RuntimeError("disk gone")


def test_failed_generation_is_a_500_and_the_server_recovers(server, client):
    _, engine, _ = server
    engine.model.set_experts(_failing_experts)
    try:
        with pytest.raises(openai.InternalServerError, match="disk gone"):
            client.completions.create(model=MODEL, prompt="w1", max_tokens=3)
        with pytest.raises(openai.APIError, match="disk gone"):
            list(client.completions.create(model=MODEL, prompt="w1", max_tokens=3, stream=True))
    finally:
        engine.model.set_experts(engine.experts)
    assert client.completions.create(model=MODEL, prompt="w1", max_tokens=2).usage.completion_tokens == 2


ERRORS = [  # (body, status, param)
    (b"{not json", 400, None),
    ({"prompt": "w1"}, 400, "model"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": "w1", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": 7}, 400, "prompt"),
    ({"model": "no-such-model", "prompt": "w1"}, 404, "model"),
    ({"model": MODEL, "prompt": " ".join(["w1"] * 300)}, 400, "messages"),
    ({"model": MODEL, "prompt": "w1", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "w1", "max_tokens": 1000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "w1", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "w1", "temperature": 5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "w1", "seed": 2**70}, 400, "seed"),
]


@pytest.mark.parametrize("body,status,param", ERRORS)
def test_bad_requests_get_openai_errors(server, body, status, param):
    code, out = _post(server[0], "/v1/completions", body)
    assert code == status
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_chat_errors(server):
    code, out = _post(server[0], "/v1/chat/completions", {"model": MODEL, "messages": "hi"})
    assert code == 400 and out["error"]["param"] == "messages"
    long = [{"role": "user", "content": " ".join(["w2"] * 300)}]
    code, out = _post(server[0], "/v1/chat/completions", {"model": MODEL, "messages": long})
    assert code == 400 and out["error"]["code"] == "context_length_exceeded"


def test_wrong_api_key(server, client):
    code, out = _post(server[0], "/v1/completions", {"model": MODEL, "prompt": "w1"}, key="wrong")
    assert code == 401 and out["error"]["code"] == "invalid_api_key"
    code, _ = _post(server[0], "/v1/completions", {"model": MODEL, "prompt": "w1"}, key=None)
    assert code == 401
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_messages_api_key_and_error_shape(server):
    """Anthropic's clients send the key as x-api-key; errors on /v1/messages take Anthropic's shape."""
    body = json.dumps(
        {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "w1"}]}
    ).encode()

    def post(headers: dict) -> tuple[int, dict]:
        req = urllib.request.Request(server[0] + "/v1/messages", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    code, out = post({"x-api-key": "wrong"})
    assert code == 401 and out == {"type": "error", "error": {"type": "authentication_error",
                                                              "message": "incorrect API key provided"}}  # fmt: skip
    code, out = post({"x-api-key": KEY})
    assert code == 200 and out["type"] == "message" and out["usage"]["output_tokens"] == 2
    code, out = post({"Authorization": f"Bearer {KEY}"})
    assert code == 200


def test_server_survives_bad_requests(server, client):
    for body, _, _ in ERRORS:
        _post(server[0], "/v1/completions", body)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="w1")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "w1"}], max_tokens=-1
        )
    assert client.completions.create(model=MODEL, prompt="w1", max_tokens=2).usage.completion_tokens == 2


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model=MODEL, prompt="w1 w2", max_tokens=3)
    with urllib.request.urlopen(server[0] + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "# TYPE moepager_requests_total counter" in text
    m = _metrics(server[0])
    assert m['moepager_requests_total{path="/v1/completions",status="200"}'] >= 1
    assert m["moepager_completion_tokens_total"] >= 3 and m["moepager_prompt_tokens_total"] >= 2
    assert m['moepager_request_duration_seconds_bucket{le="+Inf"}'] >= 1


@pytest.mark.slow
def test_serve_command(model_dir):
    """`moepager serve` as a user starts it: loopback, a free port, stopped by the test."""
    args = [
        str(model_dir),
        "--model-name",
        MODEL,
        "--expert-memory",
        "50%",
        "--policy",
        "lru",
        "--kv-memory",
        "64KiB",
    ]
    with serve_process(*args, timeout=60) as base:
        code, out = _post(
            base, "/v1/completions", {"model": MODEL, "prompt": "w1", "max_tokens": 3}, key=None
        )
        assert code == 200 and out["usage"]["completion_tokens"] == 3
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            assert "moepager_expert_read_bytes_total" in r.read().decode()  # paged, as asked for


def test_serve_without_model_uses_the_default(monkeypatch, tiny):
    """No MODEL: the embedded default model is loaded and served under the id "default"."""
    import moepager.moefy.default_model as default_model
    import moepager.serving.server as server

    path, _ = tiny("mixtral")
    served = {}
    monkeypatch.setattr(default_model, "default_model_path", lambda: path)
    monkeypatch.setattr(
        server, "serve", lambda engine, name, **kw: served.update(engine=engine, name=name, **kw)
    )
    assert cli_main(["serve", "--port", "8123"]) == 0
    assert served["engine"].path == path and served["name"] == "default"
    assert served["host"] == "127.0.0.1" and served["port"] == 8123
