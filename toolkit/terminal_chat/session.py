"""A chat session: the conversation, its settings, and the slash commands that change them.

Plain Python with no terminal and no network, so every command is tested on its own. The
terminal loop (:mod:`toolkit.terminal_chat.repl`) asks :func:`parse_command` what a line means and applies
it; commands that need the gateway (``/model``) are applied there.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HELP = """\
/reset          forget the conversation (the system prompt stays)
/system TEXT    set the system prompt (bare: show it; `/system none` clears it)
/model NAME     answer with another model (bare: list the models)
/temp X         sampling temperature 0-2 (bare: show; `/temp default`: the gateway's)
/max N          most tokens in one answer (bare: show; `/max default`: the rest of the context)
/save FILE      write the conversation as JSON
/exit           leave (also Ctrl-D, or Ctrl-C at the prompt); Ctrl-C during an answer stops it"""


class Command(enum.Enum):
    RESET = "reset"
    SYSTEM = "system"
    MODEL = "model"
    TEMP = "temp"
    MAX = "max"
    SAVE = "save"
    EXIT = "exit"
    HELP = "help"


_ALIASES = {"quit": Command.EXIT, "q": Command.EXIT, "clear": Command.RESET, "temperature": Command.TEMP,
            "?": Command.HELP}


class CommandError(ValueError):
    """A slash command with a bad name or argument; the message is one line for the user."""


def parse_command(line: str) -> tuple[Command, str] | None:
    """``(command, argument)`` for a ``/command`` line; None for a message to the model."""
    text = line.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, _, argument = text[1:].partition(" ")
    name = name.lower()
    command = _ALIASES.get(name) or next((c for c in Command if c.value == name), None)
    if command is None:
        raise CommandError(f"unknown command /{name}; /help lists them")
    return command, argument.strip()


@dataclass
class ChatSession:
    """The conversation so far and the settings of the next request."""

    model: str | None = None
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user_text: str | None = None) -> list[dict[str, str]]:
        """The messages of the next request: system prompt, the history, then `user_text`."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        out += self.history
        if user_text is not None:
            out.append({"role": "user", "content": user_text})
        return out

    def request(self, user_text: str) -> dict[str, Any]:
        """The body of ``POST /v1/chat/completions`` for `user_text` (unset settings are left to the gateway)."""
        body: dict[str, Any] = {"messages": self.messages(user_text)}
        for key in ("model", "temperature", "max_tokens", "top_p"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        return body

    def record(self, user_text: str, answer: str) -> None:
        """Keep a finished (or stopped) exchange in the history."""
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.history.clear()

    def set_system(self, argument: str) -> str:
        if not argument:
            return f"system prompt: {self.system!r}" if self.system else "no system prompt"
        self.system = None if argument.lower() == "none" else argument
        return "system prompt cleared" if self.system is None else "system prompt set"

    def set_temperature(self, argument: str) -> str:
        if argument:
            self.temperature = None if argument == "default" else _number(argument, "/temp", 0.0, 2.0)
        shown = "the gateway's default" if self.temperature is None else f"{self.temperature:g}"
        return f"temperature: {shown}"

    def set_max_tokens(self, argument: str) -> str:
        if argument:
            self.max_tokens = None if argument == "default" else int(_number(argument, "/max", 1, 1_000_000, True))
        return f"max tokens: {'the rest of the context' if self.max_tokens is None else self.max_tokens}"

    def to_json(self) -> dict[str, Any]:
        return {
            "saved_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model": self.model,
            "settings": {"temperature": self.temperature, "max_tokens": self.max_tokens, "top_p": self.top_p},
            "messages": self.messages(),
        }

    def save(self, argument: str) -> Path:
        """Write the conversation (system prompt included) as JSON to the path in `argument`."""
        if not argument:
            raise CommandError("/save needs a file name, e.g. /save chat.json")
        path = Path(argument).expanduser()
        try:
            path.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as err:
            raise CommandError(f"cannot write {path}: {err.strerror}") from None
        return path


def _number(text: str, command: str, low: float, high: float, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise CommandError(f"{command} takes {kind} from {low:g} to {high:g}, not {text!r}") from None
    if not low <= value <= high:
        raise CommandError(f"{command} takes a value from {low:g} to {high:g}, not {text}")
    return value
