"""The terminal side of ``toolkit chat``: the prompt loop, streamed answers rendered with rich, one-shot mode.

While an answer streams, a transient ``Live`` shows the tail of its Markdown that fits the
screen; when it ends, the whole answer is printed once as Markdown, so the scrollback holds it
cleanly. Ctrl-C while an answer streams stops it (the HTTP stream is closed, the gateway cancels
the generation) and keeps what arrived; Ctrl-C or Ctrl-D at the prompt leaves. A failed request
prints one line and leaves the conversation as it was before it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.markup import escape
from rich.segment import Segment

from toolkit.terminal_chat.gateway_client import ChatError, GatewayClient, StreamEvent
from toolkit.terminal_chat.session import HELP, ChatSession, Command, CommandError, parse_command

PROMPT = "you> "

with contextlib.suppress(ImportError):  # line editing and history for input(), where available
    import readline  # noqa: F401


class _MarkdownTail:
    """The last lines of a Markdown text that fit the terminal, so a long answer scrolls while it streams."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(Markdown(self.text), options.update(height=None), pad=False)
        for line in lines[-max(1, console.size.height - 2):]:
            yield from line
            yield Segment.line()


class ChatRepl:
    """One chat session on one gateway: answers go to `out`, notes and errors to `err`."""

    def __init__(self, client: GatewayClient, session: ChatSession, out: Console, err: Console) -> None:
        self.client = client
        self.session = session
        self.out = out
        self.err = err

    def note(self, text: str) -> None:
        self.err.print(f"[dim]{escape(text)}[/]", highlight=False)

    def error(self, text: str) -> None:
        self.err.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)

    def stream(self, question: str, stop_on_interrupt: bool = True) -> tuple[str, StreamEvent | None]:
        """Ask; render the answer as it streams. Returns its text and the final event (None: stopped by Ctrl-C)."""
        events = self.client.stream_chat(self.session.request(question))
        parts: list[str] = []
        final: StreamEvent | None = None
        live = Live(_MarkdownTail(""), console=self.out, refresh_per_second=10, transient=True) \
            if self.out.is_terminal else None
        try:
            with live if live is not None else contextlib.nullcontext():
                for event in events:
                    parts.append(event.text)
                    if live is not None:
                        live.update(_MarkdownTail("".join(parts)))
                    else:
                        self.out.file.write(event.text)
                        self.out.file.flush()
                    if event.finish_reason is not None:
                        final = event
        except KeyboardInterrupt:
            if not stop_on_interrupt:
                raise
        finally:
            _close(events)
            if live is not None and parts:
                self.out.print(Markdown("".join(parts)))
            elif live is None and parts:
                self.out.file.write("\n")
                self.out.file.flush()
        return "".join(parts), final

    def ask(self, question: str) -> None:
        """One exchange of the interactive session; Ctrl-C stops the answer, errors print one line."""
        started = time.perf_counter()
        try:
            answer, final = self.stream(question)
        except ChatError as err:
            self.error(str(err))
            return
        elapsed = time.perf_counter() - started
        if final is None:
            if answer:  # what arrived stays in the conversation, as in other chat clients
                self.session.record(question, answer)
            self.note("[stopped] (Ctrl-C at the prompt or Ctrl-D leaves)")
            return
        self.session.record(question, answer)
        tokens = final.usage.get("completion_tokens")
        self.note(f"{final.model or 'model'}: {tokens if tokens is not None else '?'} tokens in {elapsed:.1f} s, "
                  f"finish {final.finish_reason}")

    def list_models(self) -> None:
        for card in self.client.models():
            marks = [m for m, on in (("default", card.get("default")), ("in use", card["id"] == self.session.model),
                                     ("not ready", not card.get("ready", True))) if on]
            self.out.print(f"  {card['id']} (version {card.get('version', '?')}, context "
                           f"{card.get('context_length', '?')})" + (f"  [{', '.join(marks)}]" if marks else ""),
                           highlight=False, markup=False)

    def command(self, command: Command, argument: str) -> bool:
        """Apply a slash command; False when it asks to leave."""
        s = self.session
        if command is Command.EXIT:
            return False
        if command is Command.HELP:
            self.out.print(HELP, highlight=False, markup=False)
        elif command is Command.RESET:
            s.reset()
            self.note("conversation cleared")
        elif command is Command.SYSTEM:
            self.note(s.set_system(argument))
        elif command is Command.TEMP:
            self.note(s.set_temperature(argument))
        elif command is Command.MAX:
            self.note(s.set_max_tokens(argument))
        elif command is Command.SAVE:
            self.note(f"saved {len(s.history)} messages to {s.save(argument)}")
        elif command is Command.MODEL:
            if not argument:
                self.list_models()
            else:
                names = [card["id"] for card in self.client.models()]
                if argument not in names:
                    raise CommandError(f"no model {argument!r}; the models are: {', '.join(names)}")
                s.model = argument
                self.note(f"answering with {argument}")
        return True

    def run(self, lines: Iterator[str] | None = None) -> None:
        """The prompt loop, until /exit, Ctrl-D or Ctrl-C at the prompt."""
        read = (lambda: next(lines)) if lines is not None else (lambda: input(PROMPT))
        while True:
            try:
                line = read()
            except (EOFError, KeyboardInterrupt, StopIteration):
                self.err.print()
                return
            if not line.strip():
                continue
            try:
                parsed = parse_command(line)
                if parsed is None:
                    self.ask(line.strip())
                elif not self.command(*parsed):
                    return
            except (CommandError, ChatError) as err:
                self.error(str(err))


def _close(events: Iterator[StreamEvent]) -> None:
    close = getattr(events, "close", None)
    if close is not None:
        close()


def one_shot(repl: ChatRepl, question: str, as_json: bool, out: TextIO | None = None) -> None:
    """Answer `question` once: streamed text (Markdown on a terminal), or one JSON object with ``as_json``."""
    if not as_json:
        repl.stream(question, stop_on_interrupt=False)
        return
    parts: list[str] = []
    final = None
    for event in repl.client.stream_chat(repl.session.request(question)):
        parts.append(event.text)
        final = event if event.finish_reason else final
    assert final is not None  # the client raises when the stream ends without a finish
    result: dict[str, Any] = {"model": final.model, "content": "".join(parts),
                              "finish_reason": final.finish_reason, "usage": final.usage}
    (out or sys.stdout).write(json.dumps(result, ensure_ascii=False) + "\n")
