"""Suite-wide hooks: tests marked ``gpu`` are skipped cleanly where torch sees no CUDA GPU."""

from __future__ import annotations

import signal

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_configure(config: pytest.Config) -> None:
    """Give the commands the tests start a Ctrl-C that works, as a terminal gives a user's.

    Several tests press Ctrl-C (SIGINT) on `toolkit build`, `serve` or `chat`. A shell starts its
    background jobs with SIGINT ignored, children inherit that, and Python then installs no
    KeyboardInterrupt handler: a suite started with `make test &` from a script would see those
    commands ignore the signal. A handler in this process is reset to the default in each child.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for item in gpu_items:
            item.add_marker(skip)
