"""What OpenAI clients send, against a real server on 127.0.0.1 with the official openai client: logprobs,
penalties, logit_bias, n choices, structured output, tool calls, refused fields and the body limit.

The model is a tiny random Qwen2-MoE with a character-level byte tokenizer (every printable ASCII character
is a token), so constrained decoding can spell any JSON, and a chat template in the Hermes tool-call format.
References are independent: the model's own logits through `engine.logits` (no cache, no server), transformers'
repetition penalty, jsonschema.
"""

import json
import socket
import threading
import time
import urllib.request

import jsonschema
import openai
import pytest
import torch
from test_server import _post, _serving
from tiny_models import configs

import moepager
from moepager.cli import main as cli_main
from moepager.serving.server import create_app

MODEL = "chars"
TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t.function.name }} {% endfor %}</tools>\n"
    'Call a tool as <tool_call>\n{"name": N, "arguments": A}\n</tool_call><|im_end|>\n{% endif %}'
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ c.function.name }}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city", "days", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def _byte_level_chars() -> list[str]:
    """GPT-2's byte-level symbols of tab, newline and printable ASCII (space is "Ġ", newline "Ċ")."""
    printable = list(range(ord("!"), ord("~") + 1))
    shifted = {b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in printable and b < 161)}
    return [shifted.get(b, chr(b)) for b in [9, 10, *range(32, 127)]]


def write_char_tokenizer(out, chat_template: str) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(_byte_level_chars())}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save(str(out / "tokenizer.json"))
    cfg = {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": chat_template}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(openai client, engine, base url, submitted sequences) of a live server on the character model."""
    import transformers as tf

    path = tmp_path_factory.mktemp("chars")
    torch.manual_seed(0)
    config = configs()["qwen2_moe"]()
    config.max_position_embeddings = 2048
    config.vocab_size = 99  # the tokenizer's: 97 characters and 2 special tokens, so every id has text
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    write_char_tokenizer(path, TEMPLATE)
    engine = moepager.load(path)
    app = create_app(engine, MODEL, max_body_bytes=2 * 2**20)
    submitted = []
    submit = app.state.scheduler.submit
    app.state.scheduler.submit = lambda seq: (submitted.append(seq), submit(seq))[1]
    with _serving(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        yield client, engine, base, submitted


def _log_softmax_after(engine, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(engine.logits(ids)[0, -1].double(), dim=-1)  # [V]


def _ids(engine, texts: list[str]) -> list[int]:
    """Token ids of single-character token texts (ids follow the byte order of the vocabulary)."""
    return [[9, 10, *range(32, 127)].index(ord(t)) for t in texts]


# --------------------------------------------------------------------------------------------- logprobs


def test_completion_logprobs_are_the_models_log_softmax(served):
    client, engine, _, submitted = served
    prompt = "Hello, world"
    for stream in (False, True):
        kw = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
        if stream:
            chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
            tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
            values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
            tops = [t for c in chunks if c.logprobs for t in c.logprobs.top_logprobs]
            text = "".join(c.text for c in chunks)
        else:
            choice = client.completions.create(**kw).choices[0]
            tokens, values = choice.logprobs.tokens, choice.logprobs.token_logprobs
            tops, text = choice.logprobs.top_logprobs, choice.text
            assert choice.logprobs.text_offset == [
                sum(len(t) for t in tokens[:i]) for i in range(len(tokens))
            ]
        assert "".join(tokens) == text and len(tokens) == 6
        ids = engine.tokenizer.encode(prompt)
        for token, value, top in zip(tokens, values, tops):
            expected = _log_softmax_after(engine, ids)
            tid = _ids(engine, [token])[0]
            assert abs(value - expected[tid].item()) < 1e-4
            best = expected.topk(3)
            assert len(top) == 3 and abs(max(top.values()) - best.values[0].item()) < 1e-4
            ids.append(tid)
    assert submitted[-1].processor is not None


def test_chat_logprobs_and_no_processor_without_them(served):
    client, engine, _, submitted = served
    messages = [{"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=2)  # fmt: skip
    content = out.choices[0].logprobs.content
    ids = engine.tokenizer.encode_chat(messages)
    for entry in content:
        expected = _log_softmax_after(engine, ids)
        tid = _ids(engine, [entry.token])[0]
        assert abs(entry.logprob - expected[tid].item()) < 1e-4
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        assert abs(entry.top_logprobs[0].logprob - expected.max().item()) < 1e-4
        ids.append(tid)
    assert "".join(e.token for e in content) == out.choices[0].message.content
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert submitted[-1].processor is None  # a plain request pays nothing per token


# ------------------------------------------------------------------------------------ penalties and bias


def _greedy_reference(engine, prompt: list[int], n: int, adjust) -> list[int]:
    out = []
    for _ in range(n):
        logits = engine.logits(prompt + out)[0, -1]
        tok = adjust(logits, prompt, out).argmax().item()
        out.append(tok)
    return out


def _greedy_ids(client, engine, prompt: str, n: int, **kw) -> list[int]:
    text = (
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, **kw)
        .choices[0]
        .text
    )
    return engine.tokenizer.encode(text)


def test_presence_and_frequency_penalties_follow_openai(served):
    client, engine, _, _ = served
    prompt, n = "abcabc", 12
    ids = engine.tokenizer.encode(prompt)
    plain = _greedy_ids(client, engine, prompt, n)
    for fp, pp in ((1.5, 0.0), (0.0, 2.0), (0.7, -0.5)):

        def adjust(logits, prompt_ids, out, fp=fp, pp=pp):
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[-1]).float()
            return logits - fp * counts - pp * (counts > 0).float()

        got = _greedy_ids(client, engine, prompt, n, frequency_penalty=fp, presence_penalty=pp)
        assert got == _greedy_reference(engine, ids, n, adjust)
    assert _greedy_ids(client, engine, prompt, n, frequency_penalty=2.0) != plain
    assert len(set(plain)) < len(set(_greedy_ids(client, engine, prompt, n, presence_penalty=2.0)))


def test_repetition_penalty_matches_transformers(served):
    from transformers import RepetitionPenaltyLogitsProcessor

    client, engine, _, _ = served
    prompt, n = "abcabc", 10
    ids = engine.tokenizer.encode(prompt)
    hf = RepetitionPenaltyLogitsProcessor(1.8)

    def adjust(logits, prompt_ids, out):
        return hf(torch.tensor([prompt_ids + out]), logits[None].clone())[0]

    got = _greedy_ids(client, engine, prompt, n, extra_body={"repetition_penalty": 1.8})
    assert got == _greedy_reference(engine, ids, n, adjust)


def test_logit_bias(served):
    client, engine, _, _ = served
    z = _ids(engine, ["z"])[0]
    out = client.completions.create(model=MODEL, prompt="abc", max_tokens=5, temperature=1, seed=3,
                                    logit_bias={str(z): 100})  # fmt: skip
    assert out.choices[0].text == "zzzzz"
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=MODEL, prompt="abc", max_tokens=2, logit_bias={"100000": 1})


# --------------------------------------------------------------------------------------------- n choices


def test_n_choices_with_a_seed(served):
    client, _, _, _ = served
    kw = dict(model=MODEL, prompt="Once", max_tokens=12, temperature=1.0, seed=42, n=2)
    first = client.completions.create(**kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert len(texts) == 2 and texts[0] != texts[1]
    assert [c.text for c in sorted(client.completions.create(**kw).choices, key=lambda c: c.index)] == texts
    assert first.usage.completion_tokens == 24
    streamed = ["", ""]
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3,
                                          max_tokens=6, temperature=1.0, seed=7)  # fmt: skip
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) == 3


# ------------------------------------------------------------------------------------- structured output


def _chat(client, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe someone"}], **kw
    )


@pytest.mark.slow
def test_json_object_always_parses(served):
    client, _, _, _ = served
    objects = []
    for seed in range(6):
        out = _chat(
            client, response_format={"type": "json_object"}, max_tokens=1500, temperature=1.0, seed=seed
        )
        choice = out.choices[0]
        assert choice.finish_reason == "stop"
        objects.append(json.loads(choice.message.content))
        assert isinstance(objects[-1], dict)
    assert any(objects)  # not only {}


def test_json_whitespace_is_bounded(served):
    """A model that would write newlines forever still ends its JSON: at most 20 whitespace characters a gap."""
    import re

    client, engine, _, _ = served
    newline = str(_ids(engine, ["\n"])[0])
    out = _chat(client, response_format={"type": "json_object"}, max_tokens=1500, temperature=1.0, seed=1,
                logit_bias={newline: 100})  # fmt: skip
    text = out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop" and isinstance(json.loads(text), dict)
    assert "\n" * 20 in text and max(len(m) for m in re.findall(r"\s+", text)) <= 20


def test_json_schema_output_validates(served):
    client, _, _, _ = served
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        out = _chat(client, response_format=fmt, max_tokens=300, temperature=1.0, seed=seed)
        jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
        assert out.choices[0].finish_reason == "stop"
    chunks = list(_chat(client, response_format=fmt, max_tokens=300, temperature=1.0, seed=5, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_cut_json_reports_length(served):
    client, _, _, _ = served
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    out = _chat(client, response_format=fmt, max_tokens=5, temperature=1.0, seed=0)
    assert out.choices[0].finish_reason == "length"  # cut: not claimed complete


def test_bad_schema_is_a_400(served):
    client, _, _, _ = served
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, response_format=bad, max_tokens=5)
    assert e.value.body["param"] == "response_format"


# ------------------------------------------------------------------------------------------- tool calls


def _check_calls(calls, tools):
    by_name = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])


def test_tool_calls_required_and_named(served):
    client, _, _, _ = served
    tools = [WEATHER, CLOCK]
    for seed in range(3):
        out = _chat(client, tools=tools, tool_choice="required", max_tokens=400, temperature=1.0, seed=seed,
                    parallel_tool_calls=False)  # fmt: skip
        assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None
        _check_calls(out.choices[0].message.tool_calls, tools)
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = _chat(client, tools=tools, tool_choice=named, max_tokens=400, temperature=1.0, seed=1)
    calls = out.choices[0].message.tool_calls
    _check_calls(calls, tools)
    assert [c.function.name for c in calls] == ["get_weather"]
    # parallel calls (the default) continue while the model writes another call; cut, it says so, and the
    # markup of the cut call never reaches content
    out = _chat(client, tools=tools, tool_choice="required", max_tokens=30, temperature=1.0, seed=0)
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content is None


def streamed_calls(chunks) -> list:
    """The tool calls of streamed chunks, checked for OpenAI's shape: a call's id, type and name come once,
    in its first delta; its arguments come in pieces after."""
    from openai.types.chat.chat_completion_message_tool_call import ChatCompletionMessageToolCall

    calls: dict[int, dict] = {}
    for chunk in chunks:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if tc.index not in calls:
                assert tc.id and tc.type == "function" and tc.function.name and tc.function.arguments == ""
                calls[tc.index] = {"id": tc.id, "type": "function", "function": {"name": tc.function.name,
                                                                                  "arguments": ""}}  # fmt: skip
            else:
                assert tc.id is None and tc.function.name is None
                calls[tc.index]["function"]["arguments"] += tc.function.arguments
    return [ChatCompletionMessageToolCall.model_validate(calls[k]) for k in sorted(calls)]


def test_tool_calls_streamed_and_auto(served):
    client, _, _, _ = served
    tools = [WEATHER]
    kw = dict(
        tools=tools,
        tool_choice="required",
        max_tokens=400,
        temperature=1.0,
        seed=2,
        parallel_tool_calls=False,
    )
    chunks = list(_chat(client, stream=True, **kw))
    calls = streamed_calls(chunks)
    _check_calls(calls, tools)
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(pieces) > 3  # the arguments came as they were written, not at once
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    whole = _chat(client, **kw).choices[0].message.tool_calls  # the same seed: the same call
    assert [json.loads(c.function.arguments) for c in whole] == [
        json.loads(c.function.arguments) for c in calls
    ]
    for seed in range(3):  # auto: text or calls, and calls are valid whenever they come
        choice = _chat(client, tools=tools, max_tokens=300, temperature=1.0, seed=seed).choices[0]
        if choice.message.tool_calls:
            _check_calls(choice.message.tool_calls, tools)
        else:
            assert not choice.message.content.startswith("<")
    none = _chat(client, tools=tools, tool_choice="none", max_tokens=5, temperature=0).choices[0]
    assert none.message.tool_calls is None and none.finish_reason == "length"


def test_tool_history_reaches_the_template(served):
    client, _, _, _ = served
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=3)
    assert out.usage.prompt_tokens > 60  # the tool list, the call and its result are in the prompt


QWEN_LIKE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}"
    "\n</tools><|im_end|>\n{%- endif %}{%- for message in messages %}<|im_start|>{{ message.role }}\n"
    "{{ message.content }}{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '<tool_call>\n{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}{%- endif %}<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- endif %}"
)


def test_template_with_tools_renders_as_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from moepager.generation.tokenizer import Tokenizer

    write_char_tokenizer(tmp_path, QWEN_LIKE)
    tool = {"type": "function", "function": {"name": "f", "description": "a < b & 'c'", "parameters": PERSON}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": {"name": "é<"}}}]},
        {"role": "tool", "content": "ok"},
    ]  # fmt: skip
    ours = Tokenizer(tmp_path).apply_chat_template(messages, tools=[tool])
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), chat_template=QWEN_LIKE)
    assert ours == hf.apply_chat_template(messages, tools=[tool], tokenize=False, add_generation_prompt=True)
    assert "a < b & 'c'" in ours and "<tool_call>" in ours


def test_tools_on_a_tokenizer_grammars_cannot_read_are_a_400(model_dir_words):
    engine = moepager.load(model_dir_words)
    with _serving(create_app(engine, MODEL)) as base:
        code, out = _post(base, "/v1/chat/completions", {"model": MODEL, "tools": [WEATHER],
                          "messages": [{"role": "user", "content": "w1"}]}, key=None)  # fmt: skip
    assert code == 400 and out["error"]["param"] == "tools"


@pytest.fixture(scope="module")
def model_dir_words(tiny, tmp_path_factory):
    from tiny_models import copy_with_tokenizer

    return copy_with_tokenizer(
        tiny("mixtral")[0], tmp_path_factory.mktemp("words"), "{{ messages[0].content }}"
    )


# ------------------------------------------------------------------------------------- fields and limits


@pytest.mark.parametrize(
    "field,value",
    [("reasoning_effort", "low"), ("audio", {"voice": "alloy", "format": "mp3"}), ("store", True),
     ("verbosity", "high"), ("no_such_field", 1), ("web_search_options", {})],
)  # fmt: skip
def test_unsupported_chat_field_is_a_400_naming_it(served, field, value):
    client, _, _, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, max_tokens=2, extra_body={field: value})
    assert e.value.body["param"] == field and field in e.value.body["message"]


@pytest.mark.parametrize("field,value", [("suffix", "end"), ("best_of", 3)])
def test_unsupported_completion_field_is_a_400_naming_it(served, field, value):
    client, _, _, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="a", max_tokens=2, **{field: value})
    assert e.value.body["param"] == field


def test_harmless_fields_are_accepted(served):
    client, _, _, _ = served
    out = _chat(client, max_tokens=2, user="someone", metadata={"k": "v"}, store=False, service_tier="auto",
                stream_options=None, parallel_tool_calls=True, modalities=["text"])  # fmt: skip
    assert out.usage.completion_tokens == 2
    out = client.completions.create(model=MODEL, prompt="a", max_tokens=2, echo=False, best_of=1, user="u")
    assert out.usage.completion_tokens == 2


def _health_latencies(base: str, stop: threading.Event) -> list[float]:
    times = []
    while not stop.is_set():
        t0 = time.perf_counter()
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            r.read()
        times.append(time.perf_counter() - t0)
    return times


@pytest.mark.parametrize("size,status", [(5 * 10**6, 413), (19 * 10**5, 400), (24000, 400)])
def test_large_body_while_health_answers(served, size, status):
    """5 MB: refused unread. 1.9 MB (under the body limit): too many characters for the context, refused
    before tokenizing. 24 kB: could fit, so tokenized (off the event loop), then too many tokens."""
    _, _, base, _ = served
    body = json.dumps({"model": MODEL, "prompt": "a" * size}).encode()
    result = {}

    def upload():
        result["answer"] = _post(base, "/v1/completions", body, key=None)

    stop = threading.Event()
    thread = threading.Thread(target=upload)
    t0 = time.perf_counter()
    thread.start()
    times = []
    watcher = threading.Thread(target=lambda: times.extend(_health_latencies(base, stop)))
    watcher.start()
    thread.join(30)
    time.sleep(0.2)
    stop.set()
    watcher.join(10)
    code, out = result["answer"]
    assert code == status and out["error"]["code"] in ("request_too_large", "context_length_exceeded")
    assert times and max(times) < 0.1, (sorted(times)[-3:], len(times), time.perf_counter() - t0)


def test_body_without_length_is_limited_too(served):
    import http.client

    _, _, base, _ = served
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (b"x" * 2**16 for _ in range(64))  # 4 MiB, sent chunked: no Content-Length to refuse early
    conn.request("POST", "/v1/completions", body=chunks, encode_chunked=True,
                 headers={"Content-Type": "application/json"})  # fmt: skip
    answer = conn.getresponse()
    assert answer.status == 413
    conn.close()


def test_serve_on_a_taken_port_fails_before_loading(capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        t0 = time.perf_counter()
        # a model path that does not exist: the port error comes first, so nothing was loaded
        assert cli_main(["serve", "/no/such/model", "--port", str(port)]) == 2
        elapsed = time.perf_counter() - t0
    finally:
        taken.close()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"127.0.0.1:{port}" in err and "--port" in err
    assert elapsed < 5


def test_expert_cache_metrics_do_not_mislead(tiny):
    engine = moepager.load(tiny("mixtral")[0], expert_memory="50%")
    with _serving(create_app(engine, MODEL)) as base:
        _post(base, "/v1/completions", {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 8}, key=None)
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            text = r.read().decode()
    m = {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines() if ln and ln[0] != "#")}
    hits, pre, miss = (m[f"moepager_expert_{k}_total"] for k in ("hits", "prefetch_hits", "misses"))
    assert miss > 0 and m["moepager_expert_read_bytes_total"] > 0
    assert abs(m["moepager_expert_hit_ratio"] - hits / (hits + pre + miss)) < 1e-9
    assert "# TYPE moepager_request_duration_seconds histogram" in text
    assert (
        "# TYPE moepager_expert_read_bytes_total counter" in text
        or "# TYPE moepager_expert_read_bytes counter" in text
    )


def test_mistral_tool_calls_after_a_special_token(tmp_path):
    """Mistral's format: the special [TOOL_CALLS] token (named in the grammar by id), then a JSON list."""
    from tokenizers import AddedToken, Tokenizer

    from moepager.generation.constrain import Grammars, lark_grammar
    from moepager.generation.tool_stream import ToolCallStream
    from moepager.generation.tools import MISTRAL, tool_grammar

    write_char_tokenizer(tmp_path, "[TOOL_CALLS]")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("[TOOL_CALLS]", special=True)])
    opener = tok.token_to_id("[TOOL_CALLS]")
    grammars = Grammars(tok.to_str(), tok.get_vocab_size(), [tok.token_to_id("<|im_end|>")])
    g = torch.Generator().manual_seed(0)
    for choice in ("required", "auto"):
        constraint = grammars.matcher(
            lark_grammar(tool_grammar(MISTRAL, [WEATHER], choice, None, False, opener))
        )
        out = [opener] if choice == "auto" else []  # auto: the model chose to call
        for t in out:
            constraint.advance(t)
        while not constraint.finished and len(out) < 500:
            logits = torch.randn(1, tok.get_vocab_size(), generator=g)
            t = int(torch.multinomial(torch.softmax(constraint.mask_(logits), -1), 1, generator=g))
            constraint.advance(t)
            out.append(t)
        assert out[0] == opener and constraint.finished
        reader = ToolCallStream(MISTRAL, opener_hidden=True)  # the special token is not in the text
        reader.feed(tok.decode(out))
        assert reader.complete and len(reader.calls) == 1
        jsonschema.validate(json.loads(reader.calls[0].arguments_json()), WEATHER["function"]["parameters"])
