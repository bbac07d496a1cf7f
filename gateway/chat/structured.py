"""What a chat completion asks beyond text: the prompt with tools, the grammar its reply must follow, its calls.

:func:`chat_render` turns a request into the prompt plan for one model: tools rendered by the model's
own chat template where it takes them, else as a system prompt (:mod:`gateway.tools`); and the
grammar spec (``toolkit.runtime.grammar``) from ``response_format`` or from ``tool_choice``:
``required`` and a named tool constrain the reply to calls, ``auto`` constrains each call once it
starts (hermes), ``none`` leaves tools out of the prompt.
"""

from __future__ import annotations

from typing import Any

from gateway.chat.protocol import ChatCompletionRequest, NamedToolChoice
from gateway.chat.serving import PromptPlan, Render, response_format_spec
from gateway.registry import ModelEntry
from gateway.tools import ToolCallParser, ToolFormat, ToolStyle, fallback_messages, grammar_spec


def tool_style(entry: ModelEntry) -> ToolStyle:
    return ToolStyle.of_template(entry.tokenizer.chat_template)


def _tool_grammar(request: ChatCompletionRequest, style: ToolStyle) -> str | None:
    choice = request.effective_tool_choice()
    parallel = request.parallel_tool_calls is not False
    tools = [(t.function.name, t.function.parameters_schema()) for t in request.tools or []]
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t[0] == choice.function.name]
        return grammar_spec(style, named, required=True, parallel=False)
    if choice == "required":
        return grammar_spec(style, tools, required=True, parallel=parallel)
    if style.format is ToolFormat.HERMES:  # auto: free text, each <tool_call> constrained
        return grammar_spec(style, tools, required=False, parallel=parallel)
    return None  # llama3_json auto: no marker to start a constraint at; the reply is parsed


def chat_render(request: ChatCompletionRequest) -> Render:
    """The prompt plan of a chat completion for a given model (runs in a worker thread)."""
    messages = request.template_messages()
    calls_tools = request.calls_tools()
    tools: list[dict[str, Any]] = [t.model_dump(exclude_none=True) for t in request.tools or []] if calls_tools \
        else []

    def render(entry: ModelEntry) -> PromptPlan:
        style = tool_style(entry)
        tokenizer = entry.tokenizer
        if style.template_renders_tools:
            prompt_ids = tokenizer.render_ids(messages, tools=tools or None)
        elif tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            prompt_ids = tokenizer.render_ids(fallback_messages(messages, tools))
        else:
            prompt_ids = tokenizer.render_ids(messages)
        grammar = _tool_grammar(request, style) if calls_tools else response_format_spec(request.response_format)
        return PromptPlan(prompt_ids, grammar)

    return render


def tool_parser(request: ChatCompletionRequest, entry: ModelEntry) -> ToolCallParser | None:
    """A parser for the reply's calls when the request lets the model call tools; else None."""
    if not request.calls_tools():
        return None
    names = [t.function.name for t in request.tools or []]
    choice = request.effective_tool_choice()
    parallel = request.parallel_tool_calls is not False and not isinstance(choice, NamedToolChoice)
    return ToolCallParser(tool_style(entry), names, parallel)
