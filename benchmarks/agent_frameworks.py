"""Six client frameworks against `moepager serve`, written as their users write them: plain, streamed,
structured output and a tool call. Prints one JSON line per case: {"framework", "case", "result", "detail"}.

The frameworks are not dependencies of moepager: install the one to try in a throwaway virtual environment
(see benchmarks/agent_frameworks.md), start `moepager serve` (the default model), then:

    python benchmarks/agent_frameworks.py FRAMEWORK --base-url http://127.0.0.1:8000/v1

FRAMEWORK: openai, instructor, langchain-openai, pydantic-ai, openai-agents, litellm. A "tool call" case asks
a question the tool answers, with the framework's default tool_choice (auto: the model may answer in text
instead, which is reported as such), then again forced where the framework has a way to force it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from pydantic import BaseModel, Field

MODEL = "default"
QUESTION = "What is the weather in Paris?"
MAX_TOKENS = 300  # room for structured output and calls; a plain answer asks for 20 tokens


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"sunny, 21 C in {city}"


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                               "required": ["city"], "additionalProperties": False}}}  # fmt: skip


def _openai(base: str) -> dict:
    import openai

    c = openai.OpenAI(base_url=base, api_key="none")
    ask = [{"role": "user", "content": "Say hello."}]
    return {
        "plain": lambda: c.chat.completions.create(model=MODEL, messages=ask, max_tokens=20).choices[0].message.content,
        "streamed": lambda: "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model=MODEL, messages=ask, max_tokens=20, stream=True) if ch.choices),
        "structured": lambda: c.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A person."}],
                                                       response_format=Person, max_tokens=MAX_TOKENS).choices[0].message.parsed,
        "tool call": lambda: _calls(c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER_TOOL], max_tokens=MAX_TOKENS)),
        "tool call (required)": lambda: _calls(c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER_TOOL],
            tool_choice="required", max_tokens=MAX_TOKENS)),
    }  # fmt: skip


def _calls(out) -> str:
    msg = out.choices[0].message
    if not msg.tool_calls:
        return f"TEXT: {msg.content!r}"
    return "; ".join(f"{c.function.name}({c.function.arguments})" for c in msg.tool_calls)


def _instructor(base: str) -> dict:
    import instructor
    import openai

    raw = openai.OpenAI(base_url=base, api_key="none")
    client = instructor.from_openai(raw)  # default mode: TOOLS (a forced function call)
    schema_client = instructor.from_openai(raw, mode=instructor.Mode.JSON_SCHEMA)
    ask = [{"role": "user", "content": "A person."}]
    return {
        "plain": lambda: client.chat.completions.create(model=MODEL, response_model=None, max_tokens=20,
                                                        messages=[{"role": "user", "content": "Say hello."}]
                                                        ).choices[0].message.content,
        "streamed": lambda: list(client.chat.completions.create_partial(model=MODEL, response_model=Person,
                                                                        messages=ask, max_tokens=MAX_TOKENS))[-1],
        "structured": lambda: schema_client.chat.completions.create(model=MODEL, response_model=Person, messages=ask,
                                                                    max_tokens=MAX_TOKENS),
        "tool call": lambda: client.chat.completions.create(model=MODEL, response_model=Person, messages=ask,
                                                            max_tokens=MAX_TOKENS),
    }  # fmt: skip


def _langchain(base: str) -> dict:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=base, api_key="none", max_tokens=MAX_TOKENS)
    weather = tool(get_weather)

    def tool_call(choice=None):
        kw = {"tool_choice": choice} if choice else {}
        msg = llm.bind_tools([weather], **kw).invoke(QUESTION)
        return msg.tool_calls or f"TEXT: {msg.content!r}"

    return {
        "plain": lambda: llm.invoke("Say hello.").content,
        "streamed": lambda: "".join(ch.content for ch in llm.stream("Say hello.")),
        "structured": lambda: llm.with_structured_output(Person).invoke("A person."),
        "structured (function_calling)": lambda: llm.with_structured_output(Person, method="function_calling").invoke(
            "A person."),
        "structured (responses API)": lambda: ChatOpenAI(model=MODEL, base_url=base, api_key="none", max_tokens=MAX_TOKENS,
                                                         use_responses_api=True).invoke("Say hello.").content,
        "tool call": tool_call,
        "tool call (any)": lambda: tool_call("any"),
    }  # fmt: skip


def _pydantic_ai(base: str) -> dict:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=base, api_key="none")
    model = OpenAIChatModel(MODEL, provider=provider)
    settings = {"max_tokens": MAX_TOKENS}

    async def streamed():
        async with Agent(model).run_stream("Say hello.", model_settings=settings) as run:
            return "".join([t async for t in run.stream_text(delta=True)])

    def tool_call(m=model):
        agent = Agent(m, tools=[get_weather])
        out = agent.run_sync(QUESTION, model_settings=settings)
        calls = [p for msg in out.all_messages() for p in msg.parts if p.part_kind == "tool-call"]
        return [f"{c.tool_name}({c.args})" for c in calls] or f"TEXT: {out.output!r}"

    return {
        "plain": lambda: Agent(model).run_sync("Say hello.", model_settings=settings).output,
        "streamed": lambda: asyncio.run(streamed()),
        "structured": lambda: Agent(model, output_type=Person).run_sync("A person.", model_settings=settings).output,
        "tool call": tool_call,
        "tool call (responses API)": lambda: tool_call(OpenAIResponsesModel(MODEL, provider=provider)),
    }  # fmt: skip


def _openai_agents(base: str) -> dict:
    import openai
    from agents import (
        Agent,
        ModelSettings,
        Runner,
        function_tool,
        set_default_openai_client,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)

    def client():  # an async client belongs to one event loop, and each case runs in its own
        set_default_openai_client(openai.AsyncOpenAI(base_url=base, api_key="none"), use_for_tracing=False)

    settings = ModelSettings(max_tokens=MAX_TOKENS)

    async def streamed():
        client()
        run = Runner.run_streamed(Agent("a", model=MODEL, model_settings=settings), "Say hello.")
        text = []
        async for event in run.stream_events():
            if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
                text.append(event.data.delta)
        return "".join(text)

    def tool_call(choice=None):
        s = ModelSettings(max_tokens=MAX_TOKENS, tool_choice=choice) if choice else settings
        agent = Agent("a", model=MODEL, model_settings=s, tools=[function_tool(get_weather)])
        client()
        out = Runner.run_sync(agent, QUESTION, max_turns=3)
        calls = [i.raw_item.name for i in out.new_items if i.type == "tool_call_item"]
        return calls or f"TEXT: {out.final_output!r}"

    return {
        "plain": lambda: client() or Runner.run_sync(Agent("a", model=MODEL, model_settings=settings),
                                                     "Say hello.").final_output,
        "streamed": lambda: asyncio.run(streamed()),
        "structured": lambda: client() or Runner.run_sync(Agent("a", model=MODEL, model_settings=settings,
                                                                output_type=Person),
                                              "A person.").final_output,
        "tool call": tool_call,
        "tool call (required)": lambda: tool_call("required"),
    }  # fmt: skip


def _litellm(base: str) -> dict:
    import litellm

    kw = dict(model=f"openai/{MODEL}", api_base=base, api_key="none", max_tokens=MAX_TOKENS)
    ask = [{"role": "user", "content": "Say hello."}]
    return {
        "plain": lambda: litellm.completion(messages=ask, **kw).choices[0].message.content,
        "streamed": lambda: "".join(ch.choices[0].delta.content or "" for ch in litellm.completion(
            messages=ask, stream=True, **kw)),
        "structured": lambda: Person.model_validate_json(litellm.completion(
            messages=[{"role": "user", "content": "A person."}], response_format=Person, **kw
        ).choices[0].message.content),
        "tool call": lambda: _calls(litellm.completion(messages=[{"role": "user", "content": QUESTION}],
                                                       tools=[WEATHER_TOOL], **kw)),
        "tool call (required)": lambda: _calls(litellm.completion(
            messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER_TOOL], tool_choice="required", **kw)),
    }  # fmt: skip


FRAMEWORKS = {"openai": _openai, "instructor": _instructor, "langchain-openai": _langchain,
              "pydantic-ai": _pydantic_ai, "openai-agents": _openai_agents, "litellm": _litellm}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("framework", choices=sorted(FRAMEWORKS))
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = p.parse_args()
    for case, run in FRAMEWORKS[args.framework](args.base_url).items():
        t0 = time.perf_counter()
        try:
            out = run()
            result = "text" if isinstance(out, str) and out.startswith("TEXT: ") else "ok"
            detail = repr(out)[:160]
        except Exception as e:  # noqa: BLE001 - every failure is a result to report
            result, detail = "error", f"{type(e).__name__}: {e}"[:300]
        print(json.dumps({"framework": args.framework, "case": case, "result": result, "detail": detail,
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
