"""Atomic directories and the external-tool helper."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from toolkit import files as workspace
from toolkit.errors import StageError
from toolkit.files import (
    atomic_dir,
    atomic_write_text,
    clean_stale_temps,
    file_manifest,
    manifest_unchanged,
    run_tool,
)


def test_atomic_dir_replaces_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "art"
    with atomic_dir(final) as tmp:
        (tmp / "x").write_text("1")
    assert (final / "x").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "x").write_text("2")
        raise RuntimeError("killed")
    assert (final / "x").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_stale_temps_are_cleaned(tmp_path: Path) -> None:
    (tmp_path / ".art.tmp-abc").mkdir()
    clean_stale_temps(tmp_path)
    assert not list(tmp_path.iterdir())


def test_manifest_detects_changes(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("a")
    files = file_manifest(tmp_path)
    assert manifest_unchanged(tmp_path, files)
    (tmp_path / "f").write_text("bb")
    assert not manifest_unchanged(tmp_path, files)


def test_manifest_survives_a_cache_restore_that_rounds_mtimes(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("abc")
    files = file_manifest(tmp_path)
    os.utime(tmp_path / "f", ns=(0, files["f"]["mtime_ns"] // 10**9 * 10**9 - 10**9))  # seconds, and earlier
    assert manifest_unchanged(tmp_path, files)
    (tmp_path / "f").write_text("abd")  # same size, other bytes
    assert not manifest_unchanged(tmp_path, files)


def test_run_tool_writes_reproduce_script_and_fails_clearly(tmp_path: Path) -> None:
    run_tool([sys.executable, "-c", "print('hi')"], cwd=tmp_path, log_name="ok")
    assert "print" in (tmp_path / "reproduce.sh").read_text()
    assert (tmp_path / "ok.log").read_text().strip() == "hi"
    with pytest.raises(StageError, match="exited 3"):
        run_tool([sys.executable, "-c", "import sys; sys.exit(3)"], cwd=tmp_path, log_name="bad")
    with pytest.raises(StageError, match="not found on PATH"):
        run_tool(["definitely-not-a-tool-xyz"], cwd=tmp_path, log_name="missing")


def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def test_atomic_dir_publishes_readable_modes_despite_mkdtemp(tmp_path: Path) -> None:
    final = tmp_path / "art"
    with atomic_dir(final) as tmp:
        assert tmp.stat().st_mode & 0o777 == 0o700  # what mkdtemp makes
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "data.bin").write_bytes(b"x")
        (tmp / "sub" / "data.bin").chmod(0o600)
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "run.sh").chmod(0o700)
    assert _modes(final) == {".": 0o755, "sub": 0o755, "sub/data.bin": 0o644, "run.sh": 0o755}


def test_atomic_dir_swaps_without_the_final_path_ever_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "art"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("1")
    seen: list[bool] = []
    real = workspace.rename_exchange

    def watching(a: Path, b: Path) -> bool:
        swapped = real(a, b)
        seen.append(final.is_dir())  # right after the swap
        return swapped

    monkeypatch.setattr(workspace, "rename_exchange", watching)
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("2")
    assert seen == [True] and (final / "v").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # the old contents are gone


def test_a_crash_between_the_fallback_renames_is_recovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where renameat2 is unavailable: final is renamed aside, then the process dies before the new one is in."""
    final = tmp_path / "art"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("1")
    monkeypatch.setattr(workspace, "rename_exchange", lambda a, b: False)
    real_rename = Path.rename

    def crash_on_second_rename(self: Path, target: Path) -> Path:
        if self.name.startswith(".art.tmp-"):
            raise KeyboardInterrupt("killed between the renames")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "v").write_text("2")
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not final.exists() and list(tmp_path.glob(".art.old-*"))  # the window the fallback has
    with atomic_dir(final) as tmp:  # the next run restores the old one first, then swaps
        assert (final / "v").read_text() == "1"
        (tmp / "v").write_text("3")
    assert (final / "v").read_text() == "3"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no .old-* or .tmp-* leftovers


def test_atomic_write_text_on_a_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    """A real write failure from the kernel (RLIMIT_FSIZE: EFBIG), in a child process."""
    target = tmp_path / "config.pbtxt"
    target.write_text("old")
    code = textwrap.dedent(f"""
        import errno, resource, signal, sys
        from pathlib import Path
        from toolkit.files import atomic_write_text
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            atomic_write_text(Path({str(target)!r}), "x" * 100_000)
        except OSError as err:
            sys.exit(7 if err.errno == errno.EFBIG else 1)
        sys.exit(0)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert done.returncode == 7
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.pbtxt"]


def test_atomic_write_text_is_0644_or_the_mode_asked(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a", "1")
    atomic_write_text(tmp_path / "b.sh", "2", mode=0o755)
    assert _modes(tmp_path)["a"] == 0o644 and _modes(tmp_path)["b.sh"] == 0o755
