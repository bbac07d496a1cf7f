"""Who holds a TCP port: free-port checks, ``auto`` ports, and the process behind a listening socket.

Linux only, from ``/proc``: ``/proc/net/tcp{,6}`` maps a listening port to socket inodes, and
``/proc/<pid>/fd`` maps an inode to the process holding it. ``toolkit serve`` uses this twice:
before it starts, to name whatever already holds one of its ports; and while it waits for
readiness, to accept an answer on a port only when the process it started is the one listening
there (a health probe that reaches some other server proves nothing).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

AUTO = "auto"
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def parse_port(text: str | int, option: str) -> int | None:
    """A port option's value: a number 1-65535, or ``auto`` (None: pick a free one at start)."""
    if isinstance(text, int):
        value = text
    elif text.strip().lower() == AUTO:
        return None
    elif text.strip().isdigit():
        value = int(text.strip())
    else:
        raise ValueError(f"{option} must be a port number or 'auto', not {text!r}")
    if not 1 <= value <= 65535:
        raise ValueError(f"{option} must be between 1 and 65535, not {value}")
    return value


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind `host:port` now (SO_REUSEADDR, as Triton and uvicorn bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports the kernel reports free on `host` (all held open until all are picked).

    The ports are free now; another program could take one before the server binds it, which
    the server's start-up then reports as "address already in use".
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> Iterator[str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:  # gone, or another user's process
        return
    for fd in entries:
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                yield target[len("socket:["):-1]


def listening_pids(port: int) -> list[int]:
    """The processes holding a listening socket on `port` (those this user may inspect)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and any(inode in inodes for inode in _socket_inodes(int(entry.name))):
            pids.append(int(entry.name))
    return sorted(pids)


def owns_port(pid: int, port: int) -> bool:
    """Whether process `pid` itself holds the listening socket on `port`."""
    inodes = _listening_inodes(port)
    return bool(inodes) and any(inode in inodes for inode in _socket_inodes(pid))


def command_line(pid: int, max_chars: int = 120) -> str:
    """The process's command line, shortened, or "" when it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    text = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def parent_pid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def describe_holder(port: int) -> str:
    """"pid 123 (cmdline)" for the process listening on `port`, with its `toolkit serve` parent if any."""
    pids = listening_pids(port)
    if not pids:
        return "another process (not visible to this user)"
    pid = pids[0]
    text = f"pid {pid} ({command_line(pid) or 'unknown command'})"
    parent = parent_pid(pid)
    parent_command = command_line(parent) if parent else ""
    if parent and " serve" in parent_command and "toolkit" in parent_command:
        text += f", started by toolkit serve pid {parent} ({parent_command})"
    return text


def busy_ports(host: str, ports: Sequence[tuple[str, int]]) -> list[str]:
    """One line per (role, port) that is taken: the port, its role and the process holding it."""
    return [f"port {port} ({role}) on {host} is in use by {describe_holder(port)}"
            for role, port in ports if not port_free(host, port)]
