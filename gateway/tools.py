"""Tool calling: how a model family writes calls, how tools reach its prompt, and how calls are read back.

Two formats, as vLLM names its parsers:

- ``hermes`` (Qwen2.5, ChatML models, and every model whose template has no tools):
  ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``, one block per call;
- ``llama3_json`` (Llama 3.1+): the reply is ``{"name": "f", "parameters": {...}}``.

A chat template that renders ``tools`` itself gets them through transformers' ``apply_chat_template(...,
tools=...)``. Any other template (SmolLM2's has none) gets them as a system prompt, the Hermes/Qwen
wording (:func:`fallback_system_prompt`), with earlier calls written back as ``<tool_call>`` blocks and
tool results as ``<tool_response>`` user turns, so the hermes format applies.

``required`` and a named tool constrain the whole reply to calls (a ``tool_calls`` grammar in the
generation model); ``auto`` leaves text free and constrains each call once its ``<tool_call>`` begins
(hermes), or is parsed only (llama3_json, which has no marker to start a constraint at).
:class:`ToolCallParser` reads calls from text, incrementally, for streaming: content first, then per
call its index, id and name, then argument fragments, as OpenAI streams them.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ToolFormat(StrEnum):
    HERMES = "hermes"
    LLAMA3_JSON = "llama3_json"


@dataclass(frozen=True)
class ToolStyle:
    """How one model's template handles tools: its format, and whether it renders tools itself."""

    format: ToolFormat
    template_renders_tools: bool

    @classmethod
    def of_template(cls, chat_template: str) -> ToolStyle:
        """Read from the chat template's source: does it use ``tools``, and in which format."""
        renders = "tools" in chat_template
        if renders and "<tool_call>" in chat_template:
            return cls(ToolFormat.HERMES, True)
        # Llama 3.1 names <|python_tag|> and <|eom_id|>; Llama 3.2 and 3.3 only the ipython role of tool results
        if renders and any(mark in chat_template for mark in ("<|python_tag|>", "<|eom_id|>", "ipython")):
            return cls(ToolFormat.LLAMA3_JSON, True)
        return cls(ToolFormat.HERMES, False)  # tools go into a system prompt we write

    @property
    def arguments_key(self) -> str:
        return "parameters" if self.format is ToolFormat.LLAMA3_JSON else "arguments"

    @property
    def begin(self) -> str:
        return "<tool_call>\n" if self.format is ToolFormat.HERMES else ""

    @property
    def end(self) -> str:
        return "\n</tool_call>" if self.format is ToolFormat.HERMES else ""


def fallback_system_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """The tools as a system prompt, in the wording of Qwen2.5's and Hermes' own templates."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{listed}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def fallback_messages(messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation with tools for a template without them: tools in the system prompt, calls and results
    as text in the hermes format."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            calls = [hermes_call(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
            text = "\n".join(([message["content"]] if message.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            out.append({"role": role, "content": message.get("content", "")})
    if tools:
        prompt = fallback_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def hermes_call(name: str, arguments: dict[str, Any]) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def grammar_spec(style: ToolStyle, tools: Sequence[tuple[str, dict[str, Any]]], required: bool, parallel: bool) -> str:
    """The generation model's ``tool_calls`` grammar spec (toolkit.runtime.grammar) for (name, parameters) tools."""
    return json.dumps({
        "type": "tool_calls", "tools": [{"name": n, "parameters": p} for n, p in tools], "begin": style.begin,
        "end": style.end, "arguments_key": style.arguments_key, "required": required,
        "parallel": parallel and style.format is ToolFormat.HERMES,
    })


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    index: int
    id: str
    name: str
    arguments: str = ""  # the JSON text of the arguments object, as the model wrote it
    complete: bool = False


@dataclass
class ParseEvents:
    """What one piece of text added: content, new calls (index, id, name), argument fragments by call index."""

    content: str = ""
    started: list[ParsedCall] = field(default_factory=list)
    arguments: list[tuple[int, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.started or self.arguments)


_HEAD = r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)'
_MAYBE_HEAD = re.compile(r"\s*(\{[^{}\[\]]*)?$")
_MAX_HEAD_CHARS = 1024
_TRIGGER = "<tool_call>"
_PYTHON_TAG = "<|python_tag|>"  # Llama 3.1's marker before a call (a special token, usually decoded away)
_END = "</tool_call>"


class ToolCallParser:
    """Reads tool calls out of generated text, delta by delta.

    ``known`` are the tool names: a block naming another function (or not JSON) is content after all.
    With ``parallel`` false only the first call is kept. Text around calls is content until the first
    call starts; after it, only further calls count (models write nothing useful there).
    """

    def __init__(self, style: ToolStyle, known: Sequence[str], parallel: bool = True):
        self.style = style
        self.known = set(known)
        self.parallel = parallel
        self.calls: list[ParsedCall] = []
        self._buffer = ""  # text not yet decided
        self._state = "text" if style.format is ToolFormat.HERMES else "start"
        self._content: list[str] = []
        self._decoder = json.JSONDecoder()

    @property
    def content(self) -> str:
        return "".join(self._content)

    def push(self, text: str) -> ParseEvents:
        """Feed a text delta; return the content, call starts and argument fragments it completes."""
        events = ParseEvents()
        self._buffer += text
        progress = True
        while progress:
            progress = self._step(events)
        self._content.append(events.content)
        return events

    def finish(self) -> ParseEvents:
        """At the end of the reply: held-back text is content, unless a call already started."""
        events = ParseEvents()
        if self._state in ("text", "start", "head") and not self.calls:
            head = _TRIGGER if self._state == "head" and self.style.format is ToolFormat.HERMES else ""
            events.content = head + self._buffer
        self._buffer = ""
        self._content.append(events.content)
        return events

    def _step(self, events: ParseEvents) -> bool:
        state, buffer = self._state, self._buffer
        if state == "start":  # llama3_json: a reply that starts with "{" is a call
            stripped = buffer.lstrip().removeprefix(_PYTHON_TAG).lstrip()
            if not stripped or (_PYTHON_TAG.startswith(stripped) and stripped != _PYTHON_TAG):
                return False  # nothing decided yet
            self._state = "head" if stripped.startswith("{") else "text"
            self._buffer = stripped if self._state == "head" else buffer
            return True
        if state == "text":
            if self.style.format is ToolFormat.LLAMA3_JSON:
                if not self.calls:
                    events.content += buffer
                self._buffer = ""
                return False
            at = buffer.find(_TRIGGER)
            if at < 0:
                keep = _partial_suffix(buffer, _TRIGGER)
                if not self.calls:
                    events.content += buffer[: len(buffer) - keep]
                self._buffer = buffer[len(buffer) - keep:]
                return False
            if not self.calls:
                events.content += buffer[:at]
            self._buffer, self._state = buffer[at + len(_TRIGGER):], "head"
            return True
        if state == "head":
            match = re.match(_HEAD, buffer)
            if match is None:
                if _MAYBE_HEAD.match(buffer) and len(buffer) < _MAX_HEAD_CHARS:
                    return False  # may still become a call head (no nested value has begun)
                self._give_up(events)
                return True
            name = json.loads(f'"{match.group(1)}"')
            if name not in self.known or (self.calls and not self.parallel):
                self._give_up(events)
                return True
            call = ParsedCall(len(self.calls), new_call_id(), name)
            self.calls.append(call)
            events.started.append(call)
            self._buffer, self._state = buffer[match.end():], "arguments"
            return True
        if state == "arguments":
            call = self.calls[-1]
            whole = call.arguments + buffer
            try:
                _, end = self._decoder.raw_decode(whole)
            except ValueError:  # the arguments object is not closed yet: all of it is arguments
                self._buffer = ""
                if buffer:
                    call.arguments += buffer
                    events.arguments.append((call.index, buffer))
                return False
            fragment = whole[len(call.arguments):end]
            call.arguments += fragment
            call.complete = True
            if fragment:
                events.arguments.append((call.index, fragment))
            self._buffer, self._state = whole[end:], "tail"
            return True
        if state == "tail":  # up to the end of the block (hermes) or the next call (llama3_json: "; {")
            if self.style.format is ToolFormat.LLAMA3_JSON:
                at = buffer.find("{")
                if at < 0:
                    self._buffer = ""
                    return False
                self._buffer, self._state = buffer[at:], "head"
                return True
            at = buffer.find(_END)
            if at < 0:
                return False
            self._buffer, self._state = buffer[at + len(_END):], "text"
            return True
        return False

    def _give_up(self, events: ParseEvents) -> None:
        """Not a call after all: what was held is content (before any call) and parsing goes on as text."""
        head = _TRIGGER if self.style.format is ToolFormat.HERMES else ""
        if not self.calls:
            events.content += head + self._buffer
        self._buffer, self._state = "", "text"


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0
