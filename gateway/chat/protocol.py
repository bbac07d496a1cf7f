"""Request and response models of ``/v1/chat`` and the OpenAI-compatible ``/v1/chat/completions``.

Requests are strict (``extra="forbid"``): a misspelt or unsupported parameter is a 422 that names
it, rather than silently ignored. Requests convert themselves to the generation model's inputs.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from gateway.triton import GenerationInputs
from toolkit.repository import contract

Role = Literal["system", "developer", "user", "assistant", "tool"]
MAX_STOP_CHARS = 256  # stop strings are matched against every new piece of text: keep them short
MAX_TOP_K = 1_000_000  # above any vocabulary; Triton's top_k is INT32
MAX_REPETITION_PENALTY = 10.0
MAX_NAME_CHARS = 256


def _unicode_text(text: str) -> str:
    """Refuse text that is not valid Unicode: JSON's "\\ud800" escapes decode to a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text is not valid Unicode (a lone surrogate at character {err.start})") from None
    return text


Text = Annotated[str, AfterValidator(_unicode_text)]
# No NaN or infinity (Python's JSON parser accepts the literals NaN and Infinity).
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


MAX_TOOLS = 128
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionCall(BaseModel):
    """A call as the model wrote it: the function's name and its arguments as a JSON text."""

    model_config = _STRICT
    name: Text = Field(max_length=MAX_NAME_CHARS)
    arguments: Text

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError as err:
            raise ValueError(f"function.arguments is not valid JSON: {err}") from None
        if not isinstance(parsed, dict):
            raise ValueError("function.arguments must be a JSON object")
        return value

    def parsed_arguments(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.arguments)
        return parsed


class ToolCall(BaseModel):
    model_config = _STRICT
    id: Text = Field(max_length=MAX_NAME_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """One turn; content may be a string or a list of text parts (as the OpenAI API allows).

    An assistant turn may hold ``tool_calls`` (and no content); a ``tool`` turn answers one call by its id.
    """

    model_config = _STRICT
    role: Role
    content: Text | list[TextPart] | None = None
    name: Text | None = Field(default=None, max_length=MAX_NAME_CHARS)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: Text | None = Field(default=None, max_length=MAX_NAME_CHARS)

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages may have tool_calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages may have a tool_call_id")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def chars(self) -> int:
        return len(self.text()) + sum(len(c.function.arguments) for c in self.tool_calls or [])

    def to_template(self) -> dict[str, Any]:
        """The message as the chat template sees it (``developer`` is the newer name of ``system``).

        Tool calls carry their arguments as a dict, as transformers' chat templates expect.
        """
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": c.function.parsed_arguments()}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            message["name"] = self.name
        return message


class SamplingFields(BaseModel):
    """Sampling parameters shared by both chat endpoints."""

    model_config = _STRICT

    model: Text | None = Field(
        default=None, max_length=MAX_NAME_CHARS, description="A repository model; default: the gateway's default."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Default: the rest of the model's context."
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=MAX_TOP_K, description="Extension: 0 disables.")
    repetition_penalty: float | None = Field(
        default=None, gt=0.0, le=MAX_REPETITION_PENALTY, description="Extension: 1 disables."
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Text | list[Text] | None = Field(
        default=None, description=f"Up to 4 strings of at most {MAX_STOP_CHARS} characters that end the reply "
        "(not sent)."
    )
    ignore_eos: bool = Field(
        default=contract.DEFAULT_IGNORE_EOS,
        description="Extension (as in vLLM): generate past the end-of-turn token until max_tokens or a stop string; "
        "benchmark clients use it for fixed output lengths.",
    )

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must have at most {MAX_STOP_CHARS} characters")
        return stops

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])  # normalised to a list by the validator

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def to_generation_inputs(
        self, prompt_ids: list[int], max_tokens: int, default_temperature: float, stop_token_ids: list[int]
    ) -> GenerationInputs:
        """The generation model's inputs for this request."""
        return GenerationInputs(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=contract.DEFAULT_TOP_P if self.top_p is None else self.top_p,
            top_k=contract.DEFAULT_TOP_K if self.top_k is None else self.top_k,
            seed=self.seed,
            repetition_penalty=(contract.DEFAULT_REPETITION_PENALTY if self.repetition_penalty is None
                                else self.repetition_penalty),
            stop_token_ids=tuple(stop_token_ids),
            ignore_eos=self.ignore_eos,
        )


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema that is valid against its metaschema (draft 2020-12 unless it says otherwise)."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as err:
        where = "/".join(str(p) for p in err.absolute_path)
        raise ValueError(f"not a valid JSON Schema{f' at {where}' if where else ''}: {err.message}") from None
    except Exception as err:  # a $schema that is not a string, a metaschema it cannot resolve, ...
        raise ValueError(f"not a valid JSON Schema: {type(err).__name__}: {str(err)[:200]}") from None
    return schema


JsonSchema = Annotated[dict[str, Any], AfterValidator(_json_schema)]


class FunctionDefinition(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=TOOL_NAME)
    description: Text | None = None
    parameters: JsonSchema | None = Field(default=None, description="JSON Schema of the arguments object.")
    strict: bool | None = Field(default=None, description="Accepted; calls are always constrained to the schema.")

    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class ToolDefinition(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=TOOL_NAME)


class NamedToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    name: str = Field(pattern=TOOL_NAME)
    description: Text | None = None
    schema_: JsonSchema = Field(alias="schema", default_factory=dict)
    strict: bool | None = Field(default=None, description="Accepted; the output always follows the schema.")


class ResponseFormat(BaseModel):
    """``text`` (the default), ``json_object`` (any JSON object) or ``json_schema`` (valid against its schema)."""

    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and only allowed with it")
        return self


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions`` (OpenAI)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Newer name of max_tokens."
    )
    n: int = Field(default=1, ge=1, le=128, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(default=None, max_length=MAX_NAME_CHARS)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    logprobs: bool | None = Field(default=None, description="Each generated token's log-probability.")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=contract.MAX_TOP_LOGPROBS, description="Alternatives per token (needs logprobs)."
    )
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = Field(default=None, description="Default: auto with tools, else none.")
    parallel_tool_calls: bool | None = Field(default=None, description="Default true: several calls in one reply.")

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        choice = self.tool_choice
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names the function '{choice.function.name}', which is not in tools "
                             f"({', '.join(names) or 'none given'})")
        if choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        if self.calls_tools() and choice not in (None, "auto") and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValueError("response_format cannot constrain a reply that tool_choice requires to be a tool call")
        called: set[str] = set()
        for index, message in enumerate(self.messages):
            called.update(c.id for c in message.tool_calls or [])
            if message.role == "tool" and message.tool_call_id not in called:
                raise ValueError(f"messages[{index}] answers tool_call_id '{message.tool_call_id}', which no earlier "
                                 "assistant message called")
        return self

    def effective_tool_choice(self) -> str | NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def calls_tools(self) -> bool:
        """Whether the reply may hold tool calls (tools given and tool_choice is not none)."""
        return bool(self.tools) and self.effective_tool_choice() != "none"

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]

    def message_count_and_chars(self) -> tuple[int, int]:
        tools = sum(len(t.model_dump_json()) for t in self.tools or [])
        return len(self.messages), sum(m.chars() for m in self.messages) + tools


class SimpleChatRequest(SamplingFields):
    """``POST /v1/chat``: a conversation, or one user message."""

    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    message: Text | None = Field(default=None, min_length=1, description="Shorthand for one user message.")
    response_format: ResponseFormat | None = Field(default=None, description="As in /v1/chat/completions.")

    @model_validator(mode="after")
    def _one_of(self) -> SimpleChatRequest:
        if any(m.role == "tool" or m.tool_calls for m in self.messages or []):
            raise ValueError("tool calls and tool messages need /v1/chat/completions")
        if (self.messages is None) == (self.message is None):
            raise ValueError("send either 'messages' (a list of turns) or 'message' (one user message)")
        return self

    def template_messages(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return [m.to_template() for m in self.messages]
        return [{"role": "user", "content": self.message or ""}]

    def message_count_and_chars(self) -> tuple[int, int]:
        if self.messages is not None:
            return len(self.messages), sum(m.chars() for m in self.messages)
        return 1, len(self.message or "")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


FinishReason = Literal["stop", "length", "tool_calls"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_empty_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("tool_calls") is None:  # as OpenAI: the key only when there are calls
            data.pop("tool_calls", None)
        return data


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """OpenAI's streamed tool call: index, id, type and name first, then argument fragments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class SimpleChatResponse(BaseModel):
    model: str
    response: str
    finish_reason: FinishReason
    usage: Usage


def openapi_examples() -> dict[str, Any]:
    """An example body for /docs."""
    return {
        "model": None,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 64,
        "temperature": 0,
    }
