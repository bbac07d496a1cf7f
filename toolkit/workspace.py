"""Files on disk: content hashes, atomic directories, and the one helper that runs external tools."""

from __future__ import annotations

import contextlib
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


def manifest_digest(files: dict[str, dict[str, Any]]) -> str:
    return sha256_json({name: meta["sha256"] for name, meta in files.items()})


def manifest_unchanged(root: Path, files: dict[str, dict[str, Any]]) -> bool:
    """Cheap check (size and mtime) that the files recorded in `files` are still as written.

    A file of the recorded size whose mtime differs is hashed instead: a workspace restored from a
    CI cache keeps its contents but not its mtimes to the nanosecond (zip and tar archives store
    seconds), and must still count as unchanged.
    """
    for name, meta in files.items():
        path = root / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        if stat.st_size != meta["size"]:
            return False
        if stat.st_mtime_ns != meta["mtime_ns"] and sha256_file(path) != meta["sha256"]:
            return False
    return True


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside `final`; on success it replaces `final` in one rename.

    A crash or kill leaves only a `.tmp-*` sibling, never a half-written `final`.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


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
