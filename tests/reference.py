"""An independent reading of a model's tokenizer files: the raw ``tokenizers`` library and plain jinja2.

The gateway and the build render prompts and decode replies through transformers. Tests (unit and
integration) take their expected prompt ids and text from here instead, so a regression in that
rendering or decoding cannot move both sides of an assertion at once.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from tokenizers import Tokenizer


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ReferenceTokenizer:
    """tokenizer.json through the tokenizers library; a chat template through jinja2 as transformers sets it up.

    The template is the directory's ``chat_template.jinja`` unless `template` (its text) is given; the special
    tokens a template may name come from ``special_tokens_map.json`` (read as plain JSON).
    """

    def __init__(self, tokenizer_dir: Path, template: str | None = None) -> None:
        self.raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
        text = template if template is not None else (tokenizer_dir / "chat_template.jinja").read_text("utf-8")
        self.template = env.from_string(text)
        specials_path = tokenizer_dir / "special_tokens_map.json"
        specials = json.loads(specials_path.read_text("utf-8")) if specials_path.is_file() else {}
        self.specials = {k: v["content"] if isinstance(v, dict) else v for k, v in specials.items()
                         if k.endswith("_token") and v}

    def render_ids(self, messages: Sequence[dict[str, Any]],
                   tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        text = self.template.render(messages=list(messages), add_generation_prompt=True, tools=tools,
                                    **self.specials)
        return self.raw.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """The reply text; a character cut off by max_tokens is dropped, as a stream drops it."""
        return self.raw.decode(list(ids), skip_special_tokens=True).rstrip("\ufffd")

    def token_id(self, token: str) -> int:
        found = self.raw.token_to_id(token)
        assert found is not None, token
        return int(found)
