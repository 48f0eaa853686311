"""What agent frameworks ask of the server, against `moepager serve` in its own process: tool calls on a template
with a native format and on one without (the default model, generic format), each tool_choice, streamed and
not, with tool results sent back; the Responses API; Anthropic's Messages API; the prompt's log-likelihoods.

References are independent: tool arguments are checked with jsonschema against the tool's schema, streamed
calls are rebuilt from their deltas, and echoed log-probabilities are compared with the log-softmax of the
model's own logits computed here (engine.logits: no cache, no server).
"""

import json
import urllib.request

import jsonschema
import openai
import pytest
import torch
from serve_process import serve_process
from test_server_fields import QWEN_LIKE, WEATHER, _check_calls, streamed_calls, write_char_tokenizer
from tiny_models import configs

import moepager
from moepager.generation.tokenizer import Tokenizer
from moepager.generation.tools import generic_messages, template_roles

CITY = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CHOICES = ["auto", "required", "none", {"type": "function", "function": {"name": "get_weather"}}]
SHORT_PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                          "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def chars_dir(tmp_path_factory):
    """A tiny random Qwen2-MoE with a character tokenizer and a Qwen-like template (Hermes tool calls)."""
    import transformers as tf

    path = tmp_path_factory.mktemp("agents_chars")
    torch.manual_seed(0)
    config = configs()["qwen2_moe"]()
    config.max_position_embeddings, config.vocab_size = 2048, 99
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    write_char_tokenizer(path, QWEN_LIKE)
    return path


@pytest.fixture(scope="module")
def native(chars_dir):
    with serve_process(str(chars_dir), "--model-name", "chars") as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120), base


@pytest.fixture(scope="module")
def default():
    """The default model, whose template has no tool-call format: the generic one is used."""
    with serve_process(timeout=300) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300), base


def _ask(client, model, tools, choice, stream, **kw):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice=choice,
                                         stream=stream, temperature=0, **kw)  # fmt: skip
    if not stream:
        c = out.choices[0]
        return c.message.content, c.message.tool_calls, c.finish_reason
    chunks = list(out)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = streamed_calls(chunks)
    return text or None, calls or None, [c.choices[0].finish_reason for c in chunks if c.choices][-1]


def _check_choice(choice, content, calls, finish, tools):
    if choice == "none":
        assert calls is None and finish in ("stop", "length") and "<tool_call>" not in (content or "")
    elif choice == "auto" and calls is None:
        assert finish in ("stop", "length") and not (content or "").startswith("<")
    else:
        assert finish == "tool_calls" and content is None
        _check_calls(calls, tools)
        if isinstance(choice, dict):
            assert {c.function.name for c in calls} == {choice["function"]["name"]}


def _round_trip(client, model, tools, calls) -> int:
    """Send the calls and their results back; the prompt tokens of the answer that follows."""
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        *({"role": "tool", "tool_call_id": c.id, "content": "sunny, 21 C"} for c in calls),
    ]
    out = client.chat.completions.create(
        model=model, messages=messages, tools=tools, max_tokens=8, temperature=0
    )
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    return out.usage.prompt_tokens


# ------------------------------------------------------------------------------------ tools, native format


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_tools_on_a_native_format(native, stream):
    client, _ = native
    tools = [WEATHER]
    for choice in CHOICES:
        content, calls, finish = _ask(client, "chars", tools, choice, stream, max_tokens=300, seed=0,
                                      parallel_tool_calls=False)  # fmt: skip
        _check_choice(choice, content, calls, finish, tools)
        if calls:
            alone = client.chat.completions.create(model="chars", messages=[{"role": "user", "content": "x"}],
                                                   max_tokens=1).usage.prompt_tokens  # fmt: skip
            assert _round_trip(client, "chars", tools, calls) > alone + 60  # tools, call and result rendered


# ---------------------------------------------------------------------- tools, generic format (default)


def test_generic_format_renders_calls_and_results():
    """A template that knows no tools still shows them: the tools' prompt, an earlier call, its result."""
    from moepager.moefy.default_model import default_model_path

    tok = Tokenizer(default_model_path())
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    text = tok.apply_chat_template(generic_messages(messages, [CITY], False, *template_roles(tok)))
    assert '"name": "get_weather"' in text and "Get the current weather in a city" in text  # the tools
    assert '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_tools_on_the_default_model(default, stream):
    client, _ = default
    tools = [CITY]
    for choice in CHOICES:
        content, calls, finish = _ask(client, "default", tools, choice, stream, max_tokens=60,
                                      parallel_tool_calls=False)  # fmt: skip
        _check_choice(choice, content, calls, finish, tools)
        if calls and not stream:
            assert _round_trip(client, "default", tools, calls) > 100


@pytest.mark.slow
def test_a_call_cut_by_max_tokens_shows_no_markup(default):
    client, _ = default
    for stream in (False, True):
        content, _, finish = _ask(client, "default", [CITY], "required", stream, max_tokens=6)
        assert finish == "length" and content is None


# ----------------------------------------------------------------------------------------- Responses API


@pytest.mark.slow
def test_responses_plain_streamed_structured_and_tool(default):
    client, _ = default
    kw = dict(
        model="default", input="Say hello.", instructions="Be brief.", max_output_tokens=8, temperature=0
    )
    whole = client.responses.create(**kw)
    assert whole.object == "response" and whole.status == "incomplete" and whole.output_text
    assert whole.usage.output_tokens == 8 and whole.incomplete_details.reason == "max_output_tokens"
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-1] == "response.incomplete" and [e.sequence_number for e in events] == list(
        range(len(events))
    )
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text

    schema = {"type": "json_schema", "name": "person", "schema": SHORT_PERSON, "strict": True}
    structured = client.responses.create(model="default", input="Describe a person.", text={"format": schema},
                                         max_output_tokens=80, temperature=0)  # fmt: skip
    assert structured.status == "completed"
    jsonschema.validate(json.loads(structured.output_text), SHORT_PERSON)

    tool = {"type": "function", **CITY["function"]}
    called = client.responses.create(model="default", input="What is the weather in Paris?", tools=[tool],
                                     tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                     temperature=0)  # fmt: skip
    (call,) = called.output
    assert call.type == "function_call" and call.name == "get_weather" and called.status == "completed"
    jsonschema.validate(json.loads(call.arguments), CITY["function"]["parameters"])
    items = [{"role": "user", "content": "What is the weather in Paris?"},
             {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
             {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}]  # fmt: skip
    answer = client.responses.create(model="default", input=items, tools=[tool], tool_choice="none",
                                     max_output_tokens=8, temperature=0)  # fmt: skip
    bare = client.responses.create(model="default", input=items[:1], tools=[tool], tool_choice="none",
                                   max_output_tokens=1)  # fmt: skip
    assert answer.output[0].type == "message" and answer.usage.input_tokens > bare.usage.input_tokens + 10
    # the same conversation continued by id: the kept turns come first
    follow = client.responses.create(model="default", previous_response_id=called.id, tools=[tool],
                                     tool_choice="none", max_output_tokens=8, temperature=0,
                                     input=[items[2]])  # fmt: skip
    assert follow.usage.input_tokens == answer.usage.input_tokens and follow.output_text == answer.output_text

    streamed = list(client.responses.create(model="default", input="What is the weather in Paris?", tools=[tool],
                                            tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                            temperature=0, stream=True))  # fmt: skip
    pieces = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert json.loads(pieces) == json.loads(done[0].arguments) == json.loads(call.arguments)


@pytest.mark.slow
def test_responses_refuse_what_they_cannot_do(default):
    client, _ = default
    for kw, param in [({"tools": [{"type": "web_search"}]}, "tools"), ({"reasoning": {"effort": "high"}}, "reasoning"),
                      ({"max_output_tokens": 10**6}, "max_output_tokens"), ({"previous_response_id": "resp_x"},
                      "previous_response_id")]:  # fmt: skip
        with pytest.raises(openai.APIStatusError) as e:
            client.responses.create(model="default", input="hi", **{"max_output_tokens": 4, **kw})
        assert e.value.status_code in (400, 404) and e.value.body["param"] == param


# ------------------------------------------------------------------------------------------ Messages API


def _messages(base: str, body: dict) -> tuple[int, dict | list[tuple[str, dict]]]:
    """POST /v1/messages as Anthropic's clients send it; a streamed answer as (event, data) pairs."""
    req = urllib.request.Request(base + "/v1/messages", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", "x-api-key": "k",
                                          "anthropic-version": "2023-06-01"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    if not body.get("stream"):
        return 200, json.loads(text)
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return 200, events


@pytest.mark.slow
def test_messages_plain_streamed_and_tool(default):
    _, base = default
    ask = {"model": "default", "max_tokens": 8, "system": "Be brief.", "temperature": 0,
           "messages": [{"role": "user", "content": "Say hello."}]}  # fmt: skip
    code, whole = _messages(base, ask)
    assert code == 200 and whole["type"] == "message" and whole["stop_reason"] == "max_tokens"
    assert whole["content"][0]["type"] == "text" and whole["usage"]["output_tokens"] == 8
    code, events = _messages(base, {**ask, "stream": True})
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-2:] == [
        "message_delta",
        "message_stop",
    ]
    text = "".join(d["delta"]["text"] for k, d in events if k == "content_block_delta")
    assert text == whole["content"][0]["text"] and events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    stop = next(w for w in text.split()[1:] if text.find(w) > 0)  # greedy: the same text, cut before it
    code, cut = _messages(base, {**ask, "stop_sequences": [stop]})
    assert (cut["stop_reason"], cut["stop_sequence"]) == ("stop_sequence", stop)
    assert cut["content"][0]["text"] == text[: text.find(stop)]

    tool = {"name": "get_weather", "description": CITY["function"]["description"],
            "input_schema": CITY["function"]["parameters"]}  # fmt: skip
    question = {"role": "user", "content": "What is the weather in Paris?"}
    ask = {"model": "default", "max_tokens": 60, "temperature": 0, "messages": [question], "tools": [tool],
           "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}  # fmt: skip
    code, called = _messages(base, ask)
    (use,) = called["content"]
    assert called["stop_reason"] == "tool_use" and use["type"] == "tool_use" and use["name"] == "get_weather"
    jsonschema.validate(use["input"], tool["input_schema"])
    code, events = _messages(base, {**ask, "stream": True})
    start = next(d["content_block"] for k, d in events if k == "content_block_start")
    partial = "".join(d["delta"]["partial_json"] for k, d in events if k == "content_block_delta")
    assert (
        start["type"] == "tool_use" and start["name"] == "get_weather" and json.loads(partial) == use["input"]
    )
    result = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "sunny"}],
    }
    code, answer = _messages(base, {**ask, "tool_choice": {"type": "none"}, "max_tokens": 8,
                                    "messages": [question, {"role": "assistant", "content": [use]}, result]})  # fmt: skip
    code, bare = _messages(base, {**ask, "tool_choice": {"type": "none"}, "max_tokens": 1})
    assert code == 200 and answer["usage"]["input_tokens"] > bare["usage"]["input_tokens"] + 10
    code, error = _messages(base, {**ask, "top_logprobs": 3})
    assert code == 400 and error["type"] == "error" and "top_logprobs" in error["error"]["message"]


# ------------------------------------------------------------------------------- prompt log-likelihoods


@pytest.mark.slow
def test_echo_logprobs_are_the_log_softmax_of_the_prompt(native, chars_dir):
    client, _ = native
    engine = moepager.load(chars_dir)
    prompt = "The cat sat on the mat."
    ids = engine.tokenizer.encode(prompt)
    expected = torch.log_softmax(engine.logits(ids)[0].double(), dim=-1)  # [T, V]
    for max_tokens, stream in ((0, False), (3, False), (0, True)):
        kw = dict(model="chars", prompt=prompt, echo=True, logprobs=2, max_tokens=max_tokens, temperature=0)
        if stream:
            chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
            text = "".join(c.text for c in chunks)
            tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
            values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
            tops = [t for c in chunks if c.logprobs for t in c.logprobs.top_logprobs]
        else:
            out = client.completions.create(**kw)
            assert out.usage.completion_tokens == max_tokens and out.usage.prompt_tokens == len(ids)
            choice = out.choices[0]
            text, tokens = choice.text, choice.logprobs.tokens
            values, tops = choice.logprobs.token_logprobs, choice.logprobs.top_logprobs
        assert text.startswith(prompt) and len(tokens) == len(ids) + max_tokens
        assert "".join(tokens[: len(ids)]) == prompt and values[0] is None and tops[0] is None
        for i in range(1, len(ids)):  # token i's log-probability after tokens 0..i-1
            assert abs(values[i] - expected[i - 1, ids[i]].item()) < 1e-4
            best = expected[i - 1].topk(2).values
            assert sorted(tops[i].values(), reverse=True) == pytest.approx(best.tolist(), abs=1e-4)


def test_a_reply_read_in_pieces_gives_the_calls_of_the_whole():
    """The streaming reader: any cut of a reply into pieces gives the same calls as the whole reply."""
    import random

    from moepager.generation.tool_stream import ToolCallStream
    from moepager.generation.tools import GENERIC, HERMES, MISTRAL

    hermes = ('<tool_call>\n{ "name" : "f", "arguments": {"a": "x}\\"]", "b": [1, {"c": null}]} }\n</tool_call>\n'
              '<tool_call>\n{"arguments": {}, "name": "g"}\n</tool_call>')  # fmt: skip
    generic = (
        '<tool_call>[{"name": "f", "arguments": {"a": 1}},\n {"name": "g", "arguments": {}}]</tool_call>'
    )
    mistral = '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]'
    cases = [(HERMES, hermes, [("f", {"a": 'x}"]', "b": [1, {"c": None}]}), ("g", {})]),
             (MISTRAL, mistral, [("f", {"a": 1}), ("g", {})]), (GENERIC, generic, [("f", {"a": 1}), ("g", {})])]  # fmt: skip
    for fmt, text, want in cases:
        for seed in range(20):
            rng, reader, pieces, at = random.Random(seed), ToolCallStream(fmt), {}, 0
            while at < len(text):
                n = rng.randint(1, 5)
                for d in reader.feed(text[at : at + n]):
                    if d.kind == "call":
                        assert d.index not in pieces and d.call.name
                        pieces[d.index] = ""
                    else:
                        pieces[d.index] += d.text
                at += n
            assert (
                reader.complete and [(c.name, json.loads(c.arguments_json())) for c in reader.calls] == want
            )
            assert [json.loads(p) for p in pieces.values()] == [a for _, a in want]
    for text, is_calls in (("Hello <tool_call>", False), (" <tool_call>", False), ("<tool_c", True)):
        reader = ToolCallStream(GENERIC)
        reader.feed(text)
        reader.finish()
        assert reader.is_calls is is_calls and reader.text == ("" if is_calls else text)
