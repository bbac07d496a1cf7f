"""Control examples: general conversations mixed into fine-tuning so the model keeps its general answers.

The control stage writes them (the base model's own answers, self-distilled) and the fine-tune
stage reads them; this module is the file format both use, one JSON object a line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from toolkit.model_io.modeling import Messages


@dataclass(frozen=True)
class ControlExample:
    """One conversation; `finished` is False when the reply was cut at the generation cap."""

    messages: Messages
    finished: bool


def write_control(path: Path, examples: Iterable[ControlExample]) -> None:
    """Write `examples` as JSON lines (tagged as self-distilled)."""
    with path.open("w", encoding="utf-8") as fh:
        for c in examples:
            fh.write(json.dumps({"messages": c.messages, "finished": c.finished, "source": "self-distilled"},
                                ensure_ascii=False) + "\n")


def read_control(path: Path) -> list[ControlExample]:
    """The examples a control stage wrote."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [ControlExample(r["messages"], bool(r["finished"])) for r in rows]
