"""Atomic directories and the external-tool helper."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from toolkit.errors import StageError
from toolkit.workspace import atomic_dir, clean_stale_temps, file_manifest, manifest_unchanged, run_tool


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
