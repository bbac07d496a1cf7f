"""A quiet build: the terminal gets the build's own lines, ``<workspace>/build.log`` gets everything.

The terminal (or CI log) shows one line per stage start and end, the gates, warnings and the
summary. Everything else, in full, goes to ``build.log``: every logger at INFO and above
(onnxruntime's quantizer, transformers, torch.onnx, the toolkit's own detail), Python warnings, and
whatever a library prints or writes to file descriptors 1 and 2 itself (torch.onnx's progress
prints, onnxruntime's C++ warnings, third-party progress bars), which are redirected into the log for
the duration of the build. The toolkit's own progress (:func:`progress`) is a bar on a terminal and a
line every ~10 % anywhere else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

LOG_FILE = "build.log"
CONSOLE_LOGGERS = ("toolkit.stages.pipeline", "toolkit.progress")  # the only INFO lines the terminal shows
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that log every request or node at INFO (onnxruntime's quantizers: one line per skipped node,
# over 2000 in a default build's log); their warnings still come through.
NOISY_LOGGERS = ("httpx", "urllib3", "filelock", "matplotlib", "PIL", "onnxruntime.quantization")

T = TypeVar("T")
_terminal: IO[str] | None = None  # the real terminal (or CI log) while a quiet build runs
progress_log = logging.getLogger("toolkit.progress")


class _ConsoleFilter(logging.Filter):
    """The build's own lines: stage progress at INFO, anything of the toolkit's at WARNING and above."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(CONSOLE_LOGGERS):
            return True
        return record.name.startswith("toolkit") and record.levelno >= logging.WARNING


def _console_handler(stream: IO[str]) -> logging.Handler:
    if stream.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        return RichHandler(console=Console(file=stream), show_path=False, show_time=True)
    handler = logging.StreamHandler(stream)  # CI logs: one plain line per record, never wrapped
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    return handler


def _real_fd(stream: Any) -> int | None:
    try:
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError):  # a test runner's in-memory stream
        return None


@contextlib.contextmanager
def build_logging(workspace: Path, *, verbose: bool = False) -> Iterator[Path]:
    """Route the build's output for the duration of the block; yield the log file's path.

    `verbose` keeps everything on the terminal too (and logs at DEBUG), as a build did before.
    """
    global _terminal
    workspace.mkdir(parents=True, exist_ok=True)
    log_path = workspace / LOG_FILE
    log_path.write_text("", encoding="utf-8")
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    file_handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    stderr_fd, stdout_fd = _real_fd(sys.stderr), _real_fd(sys.stdout)
    saved_fds: list[tuple[int, int]] = []
    terminal = sys.stderr
    if stderr_fd is not None:
        terminal = os.fdopen(os.dup(stderr_fd), "w", buffering=1, encoding="utf-8", errors="replace")
    console = _console_handler(terminal)
    if not verbose:
        console.addFilter(_ConsoleFilter())
    root.handlers = [file_handler, console]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    bars = _hf_progress_bars(enabled=verbose)
    try:
        if not verbose:
            sys.stdout.flush()
            sys.stderr.flush()
            log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
            for fd in (stdout_fd, stderr_fd):
                if fd is not None:
                    saved_fds.append((fd, os.dup(fd)))
                    os.dup2(log_fd, fd)
            os.close(log_fd)
        _terminal = terminal
        yield log_path
    finally:
        _terminal = None
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved_fds:
            os.dup2(copy, fd)
            os.close(copy)
        _hf_progress_bars(enabled=bars)
        logging.captureWarnings(False)
        root.setLevel(saved[0])
        root.handlers = saved[1]
        file_handler.close()
        if terminal is not sys.stderr:
            terminal.close()


def _hf_progress_bars(*, enabled: bool) -> bool:
    """Switch transformers' progress bars (weights loading and saving); return whether they were on."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return enabled
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar() if enabled else hf_logging.disable_progress_bar()
    return bool(was)


class _LineProgress:
    """tqdm's interface for a log: one line at every further ~10 % of `total`, with the last postfix."""

    def __init__(self, iterable: Iterable[T], total: int, desc: str, unit: str) -> None:
        self._iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self._postfix = ""
        self._started = time.perf_counter()

    def __iter__(self) -> Iterator[Any]:
        next_share = 0.1
        for done, item in enumerate(self._iterable, start=1):
            yield item
            if self.total and (done / self.total >= next_share - 1e-9 or done == self.total):
                next_share = (int(done * 10 / self.total) + 1) / 10
                elapsed = time.perf_counter() - self._started
                progress_log.info("%s: %d/%d %s (%d %%) in %.0f s%s", self.desc, done, self.total, self.unit,
                                  100 * done // self.total, elapsed, f", {self._postfix}" if self._postfix else "")

    def set_postfix(self, **values: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        return None


def progress(iterable: Iterable[T], *, total: int, desc: str, unit: str = "it", enabled: bool = True) -> Any:
    """A progress bar on a terminal, a log line every ~10 % elsewhere (CI), nothing when not `enabled`.

    Returns an iterable with tqdm's ``set_postfix`` and ``close``.
    """
    terminal = _terminal or sys.stderr
    if enabled and terminal.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=terminal)
    if not enabled:
        return _LineProgress(iterable, 0, desc, unit)  # total 0: iterates without a line
    return _LineProgress(iterable, total, desc, unit)
