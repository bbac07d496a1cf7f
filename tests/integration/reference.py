"""An independent reading of a model's tokenizer files: the raw ``tokenizers`` library and plain jinja2.

The gateway renders prompts and decodes replies through transformers. Tests take their expected
prompt ids and text from here instead, so a regression in the gateway's rendering or decoding
cannot move both sides of an assertion at once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer


class ReferenceTokenizer:
    """tokenizer.json through the tokenizers library; chat_template.jinja through jinja2 as transformers sets it up."""

    def __init__(self, tokenizer_dir: Path) -> None:
        self.raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        # Chat templates expect transformers' tojson: key order kept, no HTML escaping.
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        self.template = env.from_string((tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8"))

    def render_ids(self, messages: Sequence[dict[str, Any]],
                   tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        text = self.template.render(messages=list(messages), add_generation_prompt=True, tools=tools)
        return self.raw.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """The reply text; a character cut off by max_tokens is dropped, as a stream drops it."""
        return self.raw.decode(list(ids), skip_special_tokens=True).rstrip("\ufffd")
