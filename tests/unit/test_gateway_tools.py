"""Tool calls read back from text (any split of the stream), the tool styles of templates, the fallback prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.tools import ToolCallParser, ToolFormat, ToolStyle, fallback_messages, grammar_spec

HERMES = ToolStyle(ToolFormat.HERMES, template_renders_tools=False)
LLAMA3 = ToolStyle(ToolFormat.LLAMA3_JSON, template_renders_tools=True)
TWO_CALLS = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], '
             '"note": "a } and a \\" inside"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
             "</tool_call>")
SMOLLM_TEMPLATE = (Path(__file__).resolve().parents[1] / "fixtures" / "smollm2_tokenizer" / "chat_template.jinja")


def _parse(style: ToolStyle, text: str, step: int, known: tuple[str, ...] = ("get_weather", "get_time"),
           parallel: bool = True) -> tuple[str, list[tuple[str, str, bool]], dict[int, str], list[str]]:
    """Feed `text` in pieces of `step` characters; the content, calls, streamed arguments and start order."""
    parser = ToolCallParser(style, known, parallel)
    arguments: dict[int, str] = {}
    started: list[str] = []
    events = [parser.push(text[i:i + step]) for i in range(0, len(text), step)] + [parser.finish()]
    for event in events:
        started += [c.name for c in event.started]
        for index, fragment in event.arguments:
            assert index in range(len(started)), "arguments before their call started"
            arguments[index] = arguments.get(index, "") + fragment
    content = "".join(e.content for e in events)
    assert content == parser.content
    return content, [(c.name, c.arguments, c.complete) for c in parser.calls], arguments, started


@pytest.mark.parametrize("step", [1, 2, 3, 5, 11, 1000])
def test_hermes_calls_come_out_the_same_whatever_the_stream_split(step: int) -> None:
    content, calls, arguments, started = _parse(HERMES, TWO_CALLS, step)
    assert content == "Let me check. "
    first_args = '{"city": "Paris", "days": [1, 2], "note": "a } and a \\" inside"}'
    assert calls == [("get_weather", first_args, True), ("get_time", "{}", True)]
    assert arguments == {0: first_args, 1: "{}"} and started == ["get_weather", "get_time"]
    assert json.loads(first_args)["note"] == 'a } and a " inside'


def test_only_the_first_call_without_parallel_calls() -> None:
    _, calls, _, _ = _parse(HERMES, TWO_CALLS, 4, parallel=False)
    assert [c[0] for c in calls] == ["get_weather"]


@pytest.mark.parametrize("text", ["no call at all, just < and <tool and {json}", "<tool_call>\nnot json</tool_call>",
                                  '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>'])
def test_text_that_is_not_a_call_of_a_known_tool_is_content(text: str) -> None:
    for step in (1, 7, 1000):
        content, calls, _, _ = _parse(HERMES, text, step)
        assert calls == [] and content == text


def test_a_call_cut_by_max_tokens_is_a_call_with_incomplete_arguments() -> None:
    content, calls, arguments, _ = _parse(HERMES, '<tool_call>\n{"name": "get_time", "arguments": {"zone": "C', 3)
    assert content == "" and calls == [("get_time", '{"zone": "C', False)] and arguments == {0: '{"zone": "C'}


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_llama3_json_calls(step: int) -> None:
    text = ' <|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", ' \
           '"parameters": {"zone": "CET"}}'
    content, calls, _, _ = _parse(LLAMA3, text, step)
    assert content == "" and [(c[0], c[1]) for c in calls] == [("get_weather", '{"city": "Oslo"}'),
                                                               ("get_time", '{"zone": "CET"}')]
    content, calls, _, _ = _parse(LLAMA3, 'It is sunny. {"name": "get_weather"}', step)
    assert calls == [] and content == 'It is sunny. {"name": "get_weather"}'


def test_tool_styles_are_read_from_the_template() -> None:
    """The published templates (llama.cpp's copies, tests/family_models.py): Qwen's <tool_call> blocks, Llama 3.2's
    JSON with "parameters"; the others render no tools, so the gateway's own system prompt carries them."""
    from tests import family_models as families

    assert ToolStyle.of_template(SMOLLM_TEMPLATE.read_text()) == HERMES  # no tools: our system prompt
    published = {name: ToolStyle.of_template(families.template_text(family))
                 for name, family in families.FAMILIES.items()}
    assert published["qwen2.5"] == published["qwen3"] == ToolStyle(ToolFormat.HERMES, True)
    assert published["llama3.2"] == LLAMA3
    assert published["mistral"] == published["phi3"] == published["gemma2"] == HERMES
    llama31 = "{%- if tools %}{{- '<|start_header_id|>ipython' }}{%- endif %}{{- '<|python_tag|>' }}<|eom_id|>"
    assert ToolStyle.of_template(llama31) == LLAMA3
    assert (LLAMA3.begin, LLAMA3.arguments_key) == ("", "parameters")


def test_fallback_messages_put_tools_in_the_system_prompt_and_calls_in_hermes_text() -> None:
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}]},
        {"role": "tool", "content": "12:00", "tool_call_id": "c1"},
    ]
    out = fallback_messages(messages, tools)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools") and json.dumps(tools[0]) in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    assert out[3]["content"] == "<tool_response>\n12:00\n</tool_response>"
    assert fallback_messages(messages[1:2], tools)[0]["role"] == "system"  # added when there is none


def test_grammar_specs_follow_the_style() -> None:
    tools = [("get_time", {"type": "object"})]
    hermes = json.loads(grammar_spec(HERMES, tools, required=True, parallel=True))
    assert hermes == {"type": "tool_calls", "tools": [{"name": "get_time", "parameters": {"type": "object"}}],
                      "begin": "<tool_call>\n", "end": "\n</tool_call>", "arguments_key": "arguments",
                      "required": True, "parallel": True}
    llama = json.loads(grammar_spec(LLAMA3, tools, required=True, parallel=True))
    assert (llama["begin"], llama["arguments_key"], llama["parallel"]) == ("", "parameters", False)
