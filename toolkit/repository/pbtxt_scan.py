"""``config.pbtxt`` read with the standard library only: for the generation model inside Triton.

Triton's python backend runs the generation model in an environment without protobuf (the
``Dockerfile.triton`` image installs numpy, onnxruntime and pydantic only), so it cannot use
:func:`toolkit.repository.pbtxt.read_config`. This reads protobuf text format generically (fields,
nested messages, lists, strings with escapes, comments) and returns the top-level facts the
generation model needs; ``tests/unit/test_triton_config.py`` holds it to ``read_config``'s answers
on every config the writer produces.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TOKEN = re.compile(r"""\s+|\#[^\n]*|(?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')|(?P<punct>[{}\[\]:<>,;])"""
                    r"""|(?P<word>[^\s{}\[\]:<>,;"'#]+)""")
_CLOSE = {"{": "}", "<": ">"}


@dataclass(frozen=True)
class ConfigFacts:
    """What the generation model reads from a core model's config."""

    name: str = ""
    platform: str = ""
    backend: str = ""
    max_batch_size: int = 0
    parameters: dict[str, str] = field(default_factory=dict)


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"unexpected character {text[pos]!r} at offset {pos}")
        pos = match.end()
        if match.lastgroup:
            out.append(match.group(match.lastgroup))
    return out


def _value(token: str) -> Any:
    if token[0] in "\"'":
        try:  # text format escapes non-ASCII as octal UTF-8 bytes: read the literal as bytes
            return ast.literal_eval("b" + token).decode("utf-8")
        except (SyntaxError, ValueError):  # raw non-ASCII characters in a hand-written file
            return ast.literal_eval(token)
    return token  # numbers, booleans and enum names stay text: callers convert what they use


def _message(tokens: list[str], pos: int, close: str | None) -> tuple[dict[str, list[Any]], int]:
    fields: dict[str, list[Any]] = {}
    while pos < len(tokens):
        token = tokens[pos]
        if token == close:
            return fields, pos + 1
        if token in ",;":
            pos += 1
            continue
        name, pos = token, pos + 1
        if tokens[pos] == ":":
            pos += 1
        if tokens[pos] == "[":  # a list of scalars or of messages
            pos += 1
            while tokens[pos] != "]":
                if tokens[pos] == ",":
                    pos += 1
                    continue
                item, pos = _item(tokens, pos)
                fields.setdefault(name, []).append(item)
            pos += 1
        else:
            item, pos = _item(tokens, pos)
            fields.setdefault(name, []).append(item)
    if close is not None:
        raise ValueError(f"missing {close!r}")
    return fields, pos


def _item(tokens: list[str], pos: int) -> tuple[Any, int]:
    if tokens[pos] in _CLOSE:
        return _message(tokens, pos + 1, _CLOSE[tokens[pos]])
    value, pos = _value(tokens[pos]), pos + 1
    while pos < len(tokens) and tokens[pos][0] in "\"'" and isinstance(value, str):
        value, pos = value + _value(tokens[pos]), pos + 1  # adjacent strings concatenate
    return value, pos


def parse_text(text: str) -> dict[str, list[Any]]:
    """Protobuf text format as nested dicts: field name -> list of values (scalars as text, messages as dicts)."""
    fields, _ = _message(_tokens(text), 0, None)
    return fields


def scan_config(path: Path) -> ConfigFacts:
    """Name, platform, backend, max_batch_size and string parameters of a ``config.pbtxt``."""
    fields = parse_text(path.read_text(encoding="utf-8"))

    def scalar(name: str, default: str = "") -> str:
        return str(fields.get(name, [default])[-1])

    parameters = {}
    for entry in fields.get("parameters", []):
        value = entry.get("value", [{}])[-1]
        parameters[str(entry.get("key", [""])[-1])] = str(value.get("string_value", [""])[-1])
    return ConfigFacts(name=scalar("name"), platform=scalar("platform"), backend=scalar("backend"),
                       max_batch_size=int(scalar("max_batch_size", "0")), parameters=parameters)
