"""Chat datasets: load alpaca, sharegpt and OpenAI-messages files, clean the text, split deterministically.

Every record becomes an :class:`Example` (a conversation in OpenAI message form, the facts a correct
answer must contain, and ``file:line`` of its source). A record that cannot be used is a
:class:`Problem` naming its ``file:line``; the caller decides, from ``data.on_malformed``, whether
that fails the build or is skipped (and counted, and logged).

Formats (``data.format: auto`` detects per record from its keys):

- alpaca: ``{"instruction", "input"?, "output", "system"?, "facts"?}``; the user turn is the
  instruction, followed by a blank line and the input when there is one.
- sharegpt: ``{"conversations": [{"from": "system"|"human"|"gpt", "value"}], "system"?, "facts"?}``.
- openai: ``{"messages": [{"role": "system"|"user"|"assistant", "content"}], "facts"?}``.

``facts`` (optional, any format) lists short strings a correct answer must contain; evaluation
scores exact match on them. ``group`` (optional, any format) names the fact a record teaches, so
its phrasings are split together (see :func:`split_by_phrasing`); without it, records with the same
answer are one group. Other keys (ids, metadata) are ignored, with one warning per file that names
them, never silently.

A file is a JSON array of records or JSON Lines (one record per line); ``.json`` files whose first
character is not ``[`` are read as JSON Lines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.buildsys.config import DataSection
from toolkit.errors import DataError

log = logging.getLogger(__name__)

DATASETS_DIR = Path(__file__).resolve().parent
DEMO_DATASET = DATASETS_DIR / "demo_customer_service.json"
CONTROL_PROMPTS = DATASETS_DIR / "control_prompts.json"

ROLES = ("system", "user", "assistant")
KNOWN_KEYS = {
    "alpaca": frozenset({"instruction", "input", "output", "system", "facts", "group"}),
    "sharegpt": frozenset({"conversations", "system", "facts", "group"}),
    "openai": frozenset({"messages", "facts", "group"}),
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_MAX_WARNINGS = 20  # per load: past this, one summary line instead of a flood


@dataclass(frozen=True)
class Example:
    """One training conversation: OpenAI-style messages, expected facts, and where it came from."""

    messages: list[dict[str, str]]
    facts: list[str] = field(default_factory=list)
    source: str = ""
    group: str = ""  # the record's `group` key; empty when it has none

    @property
    def fact_key(self) -> str:
        """Which fact this example teaches: its group, else its (normalised) answer."""
        return self.group or "answer:" + " ".join(self.answer.casefold().split())

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The conversation up to (not including) the final assistant answer."""
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        """The final assistant answer: the reference for BLEU/ROUGE."""
        return self.messages[-1]["content"]

    @property
    def first_user(self) -> str:
        return next(m["content"] for m in self.messages if m["role"] == "user")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"messages": self.messages, "facts": self.facts, "source": self.source}
        if self.group:
            data["group"] = self.group
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Example:
        return cls(messages=list(data["messages"]), facts=list(data.get("facts", [])), source=data.get("source", ""),
                   group=str(data.get("group", "")))


@dataclass(frozen=True)
class Problem:
    """A malformed record: ``source`` is ``file:line``."""

    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


class _MalformedError(Exception):
    """Internal: one record is unusable; becomes a Problem with its file:line."""


# --- cleaning -----------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_INLINE_SPACE = re.compile(r"[^\S\n]+")  # any whitespace except newline (tabs, NBSP, ideographic space...)
_BLANK_LINES = re.compile(r"\n{3,}")
_LEADING = re.compile(r"^[ \t]*")


def clean_text(text: str) -> str:
    """Normalise one message: NFC, no control characters (``\\n`` and ``\\t`` kept), tidy whitespace.

    Runs of spaces/tabs inside a line become one space, but a line's leading indentation is kept
    (lists and code survive); trailing spaces go; CR/CRLF become ``\\n``; at most one blank line
    in a row; the whole text is stripped. NFC (not NFKC) so full-width Chinese punctuation stays.
    """
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    lines = []
    for line in text.split("\n"):
        indent = _LEADING.match(line).group(0)  # type: ignore[union-attr]  # always matches
        body = _INLINE_SPACE.sub(" ", line[len(indent):]).rstrip()
        lines.append(indent + body if body else "")
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def is_chinese(text: str) -> bool:
    """True when the text contains a CJK ideograph (used for the en/zh language counts)."""
    return any("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" for ch in text)


def language_of(example: Example) -> str:
    return "zh" if any(is_chinese(m["content"]) for m in example.messages if m["role"] != "system") else "en"


# --- reading files ------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _json_array_records(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line, record) for each element of a top-level JSON array, keeping element line numbers."""
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}") from None
    decoder = json.JSONDecoder()
    ws = re.compile(r"[\s,]*")
    idx = text.index("[") + 1
    while True:
        idx = ws.match(text, idx).end()  # type: ignore[union-attr]  # always matches
        if idx >= len(text) or text[idx] == "]":
            return
        value, end = decoder.raw_decode(text, idx)
        yield text.count("\n", 0, idx) + 1, value
        idx = end


def iter_records(path: Path, display: str | None = None) -> Iterator[tuple[str, Any | _MalformedError]]:
    """Yield ``(file:line, record)`` for each record; a bad JSON Lines line yields a _MalformedError instead.

    A JSON array that does not parse is a file-level error (no record can be trusted): DataError.
    """
    name = display or str(path)
    text = _read_text(path)
    if text.lstrip().startswith("["):
        for at_line, record in _json_array_records(text, path):
            yield f"{name}:{at_line}", record
        return
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"{name}:{lineno}", json.loads(line)
        except json.JSONDecodeError as err:
            yield f"{name}:{lineno}", _MalformedError(f"not valid JSON: {err.msg} (column {err.colno})")


def read_jsonl(path: Path) -> list[Example]:
    """Read a stage file written by :func:`write_jsonl` (one Example per line)."""
    out = []
    for lineno, text in enumerate(_read_text(path).splitlines(), start=1):
        if text.strip():
            try:
                out.append(Example.from_dict(json.loads(text)))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{path}:{lineno}: not a stage example line: {err}") from None
    return out


def read_split(stage_dir: Path, split: str) -> list[Example]:
    """Examples of one split ("train", "val", "test") that the data stage wrote into `stage_dir`."""
    path = stage_dir / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"the data stage left no {split} split at {path}; rerun with --force --stages data")
    return read_jsonl(path)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every JSON object of a JSON Lines file a stage wrote."""
    return [json.loads(line) for line in _read_text(path).splitlines() if line.strip()]


def write_jsonl(path: Path, examples: Iterable[Example]) -> int:
    """Write one Example per line as ``{"messages", "facts", "source"}``; return the count."""
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n


# --- record parsing -----------------------------------------------------------------------------


def detect_format(record: dict[str, Any]) -> str:
    """'sharegpt', 'openai' or 'alpaca' from a record's keys; raise _MalformedError if none fits."""
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "instruction" in record or "output" in record:
        return "alpaca"
    keys = ", ".join(sorted(record)) or "none"
    raise _MalformedError(
        f"unknown record format (keys: {keys}); expected instruction/output, conversations or messages"
    )


def _text(value: Any, what: str) -> str:
    if isinstance(value, list):  # OpenAI content parts
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _MalformedError(f"{what}: only text content parts are supported")
            parts.append(part["text"])
        value = "".join(parts)
    if not isinstance(value, str):
        raise _MalformedError(f"{what} must be a string, got {type(value).__name__}")
    return clean_text(value)


def _facts(record: dict[str, Any]) -> list[str]:
    facts = record.get("facts", [])
    if not isinstance(facts, list) or not all(isinstance(f, str) and f.strip() for f in facts):
        raise _MalformedError("facts must be a list of non-empty strings")
    return [clean_text(f) for f in facts]


def _group(record: dict[str, Any]) -> str:
    group = record.get("group", "")
    if not isinstance(group, str):
        raise _MalformedError("group must be a string")
    return group.strip()


def _alpaca(record: dict[str, Any]) -> list[dict[str, str]]:
    for key in ("instruction", "output"):
        if key not in record:
            raise _MalformedError(f"alpaca record is missing '{key}'")
    instruction = _text(record["instruction"], "instruction")
    extra = _text(record.get("input") or "", "input")
    user = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": _text(record["system"], "system")})
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record["output"], "output")}]
    return messages


def _turns(record: dict[str, Any], key: str, role_key: str, text_key: str) -> list[dict[str, str]]:
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise _MalformedError(f"'{key}' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise _MalformedError(f"{key}[{i}] must be an object with '{role_key}' and '{text_key}'")
        raw_role = turn[role_key]
        role = SHAREGPT_ROLES.get(raw_role) if key == "conversations" else raw_role
        if role not in ROLES:
            raise _MalformedError(f"{key}[{i}]: unsupported {role_key} {raw_role!r}")
        messages.append({"role": str(role), "content": _text(turn[text_key], f"{key}[{i}].{text_key}")})
    return messages


def check_messages(messages: list[dict[str, str]]) -> None:
    """Raise _MalformedError unless: optional system first, then user/assistant alternating, ending on assistant."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise _MalformedError("no user/assistant turns")
    for i, msg in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            where = "a system message after the first turn" if msg["role"] == "system" else f"'{msg['role']}'"
            raise _MalformedError(f"wrong role order: turn {i + 1} is {where}, expected '{expected}'")
    if body[-1]["role"] != "assistant":
        raise _MalformedError("the conversation must end with an assistant answer")
    for msg in messages:
        if not msg["content"]:
            raise _MalformedError(f"empty {msg['role']} content")


def parse_record(
    record: Any, fmt: str, system_prompt: str | None = None
) -> tuple[list[dict[str, str]], list[str], str]:
    """One raw record -> (messages, facts, format) in OpenAI form; raises _MalformedError with the reason."""
    if not isinstance(record, dict):
        raise _MalformedError(f"a record must be a JSON object, got {type(record).__name__}")
    kind = detect_format(record) if fmt == "auto" else fmt
    if fmt != "auto" and detect_format(record) != fmt:
        raise _MalformedError(f"record is not in the configured format '{fmt}' (looks like {detect_format(record)})")
    if kind == "alpaca":
        messages = _alpaca(record)
    elif kind == "sharegpt":
        messages = _turns(record, "conversations", "from", "value")
        if record.get("system") and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": _text(record["system"], "system")})
    else:
        messages = _turns(record, "messages", "role", "content")
    check_messages(messages)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": clean_text(system_prompt)})
    return messages, _facts(record), kind


def load_file(path: Path, section: DataSection, display: str | None = None) -> tuple[list[Example], list[Problem]]:
    """Load one dataset file: its usable examples and the problems of the rest."""
    examples: list[Example] = []
    problems: list[Problem] = []
    ignored: set[str] = set()
    for source, record in iter_records(path, display):
        try:
            if isinstance(record, _MalformedError):
                raise record
            messages, facts, kind = parse_record(record, section.format, section.system_prompt)
            group = _group(record)
        except _MalformedError as err:
            problems.append(Problem(source, str(err)))
            continue
        ignored |= set(record) - KNOWN_KEYS[kind]
        examples.append(Example(messages=messages, facts=facts, source=source, group=group))
    if ignored:
        log.warning("%s: ignoring unknown record keys: %s", display or path, ", ".join(sorted(ignored)))
    return examples, problems


def dataset_paths(section: DataSection) -> list[tuple[Path, str]]:
    """(path, display name) of every configured file; the packaged demo dataset when none are."""
    if not section.paths:
        return [(DEMO_DATASET, DEMO_DATASET.name)]
    return [(Path(p), str(p)) for p in section.paths]


def load_examples(section: DataSection) -> tuple[list[Example], list[Problem]]:
    """Load every configured file (or the demo dataset); apply ``data.on_malformed``.

    Returns the usable examples and the malformed records' problems (each logged as a warning).
    With ``on_malformed: fail`` any problem raises DataError naming the first ``file:line``.
    No usable example at all is always a DataError.
    """
    examples: list[Example] = []
    problems: list[Problem] = []
    for path, display in dataset_paths(section):
        got, bad = load_file(path, section, display)
        examples += got
        problems += bad
    if problems and section.on_malformed == "fail":
        more = f" (and {len(problems) - 1} more malformed records)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; fix the record or set data.on_malformed: skip")
    for problem in problems[:_MAX_WARNINGS]:
        log.warning("skipping malformed record %s", problem)
    if len(problems) > _MAX_WARNINGS:
        log.warning("... and %d more malformed records skipped", len(problems) - _MAX_WARNINGS)
    if not examples:
        names = ", ".join(d for _, d in dataset_paths(section))
        raise DataError(f"no usable examples in {names}")
    return examples, problems


# --- split --------------------------------------------------------------------------------------


def split_key(example: Example) -> str:
    """What the split hashes: the first user message, case-folded with whitespace collapsed."""
    return " ".join(example.first_user.casefold().split())


def split_position(example: Example, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) from the seed and the example's split key."""
    digest = hashlib.sha256(f"{seed}\x00{split_key(example)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_examples(examples: list[Example], ratios: tuple[float, float, float], seed: int) -> Splits:
    """Split train/val/test by hashing each example's first user message with the seed.

    Hash-based rather than a seeded shuffle, so an example's split depends only on itself and the
    seed: adding or removing other records never moves it, and duplicate questions always land in
    the same split (no train/test leakage). Ratios hold in expectation, not exactly. So that tiny
    datasets still get a val/test example, an empty val or test split with a non-zero ratio takes
    the train example(s) with the highest hash position. Input order is kept within each split.
    """
    cut_train = ratios[0]
    cut_val = ratios[0] + ratios[1]
    pos = {id(ex): split_position(ex, seed) for ex in examples}
    train = [ex for ex in examples if pos[id(ex)] < cut_train]
    val = [ex for ex in examples if cut_train <= pos[id(ex)] < cut_val]
    test = [ex for ex in examples if pos[id(ex)] >= cut_val]
    for part, ratio in ((val, ratios[1]), (test, ratios[2])):
        if not part and ratio > 0 and len(train) > 1:
            moved = max(train, key=lambda ex: pos[id(ex)])
            train.remove(moved)
            part.append(moved)
    return Splits(train=train, val=val, test=test)


def split_by_phrasing(examples: list[Example], ratios: tuple[float, float, float], seed: int) -> Splits:
    """Hold out phrasings of facts the model is taught, never whole facts.

    Examples are grouped by :attr:`Example.fact_key`; within a group, identical questions count as
    one phrasing and the phrasings are ordered by the seeded hash of :func:`split_position`. The first
    phrasing goes to test when the group has at least two, the next to val when it has at least
    three; every other phrasing trains. So each test (and val) question asks a fact that training
    teaches in other words, and a fact with a single phrasing is only trained on. A zero val or
    test share in `ratios` keeps that split empty. Input order is kept within each split.
    """
    groups: dict[str, dict[str, list[Example]]] = {}
    for ex in examples:
        groups.setdefault(ex.fact_key, {}).setdefault(split_key(ex), []).append(ex)
    where: dict[int, str] = {}
    for phrasings in groups.values():
        ordered = sorted(phrasings, key=lambda key: hashlib.sha256(f"{seed}\x00{key}".encode()).digest())
        held = []
        if ratios[2] > 0 and len(ordered) >= 2:
            held.append("test")
        if ratios[1] > 0 and len(ordered) >= 2 + len(held):
            held.append("val")
        for i, key in enumerate(ordered):
            for ex in phrasings[key]:
                where[id(ex)] = held[i] if i < len(held) else "train"
    parts: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for ex in examples:
        parts[where[id(ex)]].append(ex)
    return Splits(train=parts["train"], val=parts["val"], test=parts["test"])


def resolve_split_by(examples: list[Example], split_by: str) -> str:
    """``data.split_by: auto``: by phrasing when some fact has two or more distinct phrasings, else by hash."""
    if split_by != "auto":
        return split_by
    phrasings: dict[str, set[str]] = {}
    for ex in examples:
        phrasings.setdefault(ex.fact_key, set()).add(split_key(ex))
    return "phrasing" if any(len(p) >= 2 for p in phrasings.values()) else "hash"


def split_dataset(examples: list[Example], split_by: str, ratios: tuple[float, float, float], seed: int) -> Splits:
    """The configured split (``split_by`` already resolved): by phrasing or by question hash."""
    if split_by == "phrasing":
        return split_by_phrasing(examples, ratios, seed)
    return split_examples(examples, ratios, seed)


def load_control_prompts() -> list[str]:
    """The packaged general prompts whose base-model answers become self-distilled control examples."""
    data = json.loads(_read_text(CONTROL_PROMPTS))
    return [clean_text(p) for p in data["prompts"]]
