"""Tool definitions and checks shared by the tool-calling tests (SmolLM2's fallback rendering, Qwen2's template)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone.",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
                   "required": ["timezone"], "additionalProperties": False}}}
TOOLS: list[Any] = [WEATHER, CLOCK]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK_WEATHER: list[Any] = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def check_calls(calls: list[Any], allowed: set[str]) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def streamed_calls(client: openai.OpenAI, model: str, **request: Any) -> tuple[list[dict[str, Any]], str | None, str]:
    """Tool calls assembled from deltas, checking OpenAI's order: index, id, type and name first, then arguments."""
    calls: dict[int, dict[str, Any]] = {}
    finish, content = None, ""
    for chunk in client.chat.completions.create(model=model, stream=True, **request):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:
                assert delta.id and delta.type == "function" and delta.function and delta.function.name
                assert delta.function.arguments == ""
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert delta.id is None and delta.function is not None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert list(calls) == list(range(len(calls)))
    return [calls[i] for i in sorted(calls)], finish, content


def required_or_named_calls(client: openai.OpenAI, model: str, choice: Any, **extra: Any) -> None:
    """tool_choice required or named: valid calls only (finish_reason tool_calls), the stream the same."""
    allowed = {choice["function"]["name"]} if isinstance(choice, dict) else set(PARAMETERS)
    request = {"messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": choice, "max_tokens": 120, "temperature": 0,
               **extra}
    reply = client.chat.completions.create(model=model, **request)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and not message.content
    check_calls(message.tool_calls or [], allowed)
    streamed, finish, content = streamed_calls(client, model, **request)
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in streamed] == \
        [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def auto_calls(client: openai.OpenAI, model: str, **extra: Any) -> None:
    """tool_choice auto: text, or calls that validate; streamed the same way."""
    request = {"messages": ASK_WEATHER, "tools": TOOLS, "max_tokens": 120, "temperature": 0, **extra}
    reply = client.chat.completions.create(model=model, **request)
    message = reply.choices[0].message
    streamed, finish, content = streamed_calls(client, model, **request)
    assert finish == reply.choices[0].finish_reason
    if message.tool_calls:
        assert finish == "tool_calls"
        check_calls(message.tool_calls, set(PARAMETERS))
        assert [(c["name"], c["arguments"]) for c in streamed] == \
            [(c.function.name, c.function.arguments) for c in message.tool_calls]
    else:
        assert finish in ("stop", "length") and content == (message.content or "") and not streamed


def two_turn_conversation(client: openai.OpenAI, model: str, **extra: Any) -> Any:
    """A call (required), its result as a tool message, then a reply without tools; returns the second reply."""
    first = client.chat.completions.create(model=model, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, temperature=0, **extra)
    call = (first.choices[0].message.tool_calls or [])[0]
    result = '{"temperature": 18, "sky": "clear"}'
    messages: list[Any] = [*ASK_WEATHER, first.choices[0].message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": result}]
    second = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                            max_tokens=40, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length") and not second.choices[0].message.tool_calls
    alone = client.chat.completions.create(model=model, messages=ASK_WEATHER, max_tokens=1, temperature=0)
    # The prompt holds the call and its result: at least the tokens of both more than the question alone.
    assert second.usage is not None and alone.usage is not None
    grown = second.usage.prompt_tokens - alone.usage.prompt_tokens
    assert grown > len(call.function.arguments) // 4 + len(result) // 4
    return second
