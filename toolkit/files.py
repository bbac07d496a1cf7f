"""Files on disk: content hashes, atomic directories, and the one helper that runs external tools."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from toolkit.errors import StageError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(data: Any) -> str:
    return sha256_text(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str))


def file_manifest(root: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> {sha256, size, mtime_ns} for every file under root (hidden files excluded)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        stat = path.stat()
        out[rel.as_posix()] = {"sha256": sha256_file(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return out


def external_manifest(paths: list[str]) -> dict[str, dict[str, Any]]:
    """Absolute path -> {sha256, size, mtime_ns} for every file at or under `paths` (files or folders)."""
    out: dict[str, dict[str, Any]] = {}
    for entry in map(Path, paths):
        if entry.is_dir():
            out.update({str(entry / rel): meta for rel, meta in file_manifest(entry).items()})
        elif entry.is_file():
            stat = entry.stat()
            out[str(entry)] = {"sha256": sha256_file(entry), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return out


def manifest_digest(files: dict[str, dict[str, Any]]) -> str:
    return sha256_json({name: meta["sha256"] for name, meta in files.items()})


def manifest_unchanged(root: Path, files: dict[str, dict[str, Any]]) -> bool:
    """Cheap check (size and mtime) that the files recorded in `files` are still as written.

    A file of the recorded size whose mtime differs is hashed instead: a workspace restored from a
    CI cache keeps its contents but not its mtimes to the nanosecond (zip and tar archives store
    seconds), and must still count as unchanged.
    """
    for name, meta in files.items():
        path = root / name  # an absolute `name` (an external file) stays itself
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        if stat.st_size != meta["size"]:
            return False
        if stat.st_mtime_ns != meta["mtime_ns"] and sha256_file(path) != meta["sha256"]:
            return False
    return True


FILE_MODE = 0o644
EXEC_MODE = 0o755
DIR_MODE = 0o755
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def publish_modes(root: Path) -> None:
    """Files 0644 (0755 if executable), folders 0755, under and including `root`; symlinks untouched.

    ``mkstemp``/``mkdtemp`` create 0600/0700: a repository written by one user must be readable by
    the gateway and Triton running as another (the gateway image runs as uid 10001).
    """
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(DIR_MODE)
        else:
            path.chmod(EXEC_MODE if path.stat().st_mode & 0o100 else FILE_MODE)


def fsync_tree(root: Path) -> None:
    """fsync every regular file and folder under `root`, folders last (their entries then point at data on disk)."""
    paths = [root, *root.rglob("*")]
    for path in paths:
        if path.is_file() and not path.is_symlink():
            fsync_path(path)
    for path in reversed(paths):
        if path.is_dir() and not path.is_symlink():
            fsync_path(path)


def fsync_path(path: Path) -> None:
    """fsync one file or folder (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a filesystem or kernel without it
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def recover_dir(final: Path) -> None:
    """Undo what an interrupted :func:`atomic_dir` left: restore a swapped-out `final`, drop leftovers.

    The fallback swap renames `final` aside (``.NAME.old-PID``) before moving the new one in; a crash
    between the two renames leaves no `final`, and the old one is put back here.
    """
    parent = final.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{glob.escape(final.name)}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        olds.pop().rename(final)
    for path in [*olds, *parent.glob(f".{glob.escape(final.name)}.tmp-*")]:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside `final`; on success it replaces `final` in one step.

    The contents get modes 0644/0755 and are fsynced before the swap. With an existing `final`, the
    two are exchanged atomically (``renameat2``), so `final` is never missing; where the filesystem
    cannot, `final` is renamed aside first and :func:`recover_dir` (run at the next start) puts it
    back if a crash came between. A crash or kill leaves at most `.tmp-*`/`.old-*` siblings, which
    the next call removes; never a half-written `final`.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        publish_modes(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not final.exists():
        tmp.rename(final)
    elif rename_exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old contents
    else:
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(final.parent)


def atomic_write_text(path: Path, text: str, mode: int = FILE_MODE) -> None:
    """Write `text` to a temp file beside `path`, fsync it, give it `mode`, and rename it over `path`.

    A failure (a full disk) leaves `path` as it was and no temp file behind.
    """
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_bytes(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """:func:`atomic_write_text` for bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def clean_stale_temps(root: Path) -> None:
    """Remove `.tmp-*` leftovers of an interrupted earlier run."""
    if not root.exists():
        return
    for path in root.glob(".*.tmp-*"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def run_tool(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path,
    log_name: str,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run an external tool, logging the exact command and writing `reproduce.sh` beside its output.

    The script can be rerun by hand when a CI step fails. Output goes to `<log_name>.log` in `cwd`.
    """
    argv = [os.fspath(c) for c in cmd]
    line = shlex.join(argv)
    cwd.mkdir(parents=True, exist_ok=True)
    script = cwd / "reproduce.sh"
    script.write_text(f"#!/usr/bin/env bash\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n{line}\n")
    script.chmod(0o755)
    log.info("running: %s", line)
    log_path = cwd / f"{log_name}.log"
    try:
        proc = subprocess.run(
            argv, cwd=cwd, env=env, timeout=timeout_s, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as err:
        raise StageError(f"{argv[0]}: not found on PATH (command written to {script})") from err
    except subprocess.TimeoutExpired as err:
        raise StageError(f"{argv[0]} ran past {timeout_s} s; rerun with {script}") from err
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise StageError(f"{argv[0]} exited {proc.returncode}; log {log_path}; rerun {script}\n{tail}")
    return proc
