"""Atomic writes: a crash in the middle of a write leaves the old content whole and no temporary leftovers.

The crash is simulated two ways: an exception raised inside the write block (the in-process failure path),
and a child process SIGKILLed in the middle of writing (no cleanup code runs at all: the only protection is
that the final path is touched by a rename, never by the write itself).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from embedlab.atomic import atomic_dir, atomic_file, atomic_write_text


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_text_creates_and_replaces(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    atomic_write_text(target, "first")
    assert target.read_text() == "first"
    atomic_write_text(target, "second, longer")
    assert target.read_text() == "second, longer"
    assert _entries(target.parent) == ["metrics.json"]


def test_written_file_gets_ordinary_permissions(tmp_path):
    """The temporary file is private (0600); the published one has the mode a plain open() would give it."""
    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == reference.stat().st_mode


def test_exception_while_writing_file_keeps_old_content(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old complete checkpoint")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half of a new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old complete checkpoint"
    assert _entries(tmp_path) == ["last.ckpt"]


def test_sigkill_while_writing_file_keeps_old_content(tmp_path):
    """A process killed mid-write (no finally blocks run) leaves the old file untouched at the final path."""
    target = tmp_path / "results.txt"
    target.write_text("old")
    child = textwrap.dedent(
        f"""
        import os, signal
        from embedlab.atomic import atomic_file
        with atomic_file({str(target)!r}) as tmp:
            with open(tmp, "w") as f:
                f.write("new but incomplete")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert target.read_text() == "old"
    # the only trace is the hidden temporary sibling, named after its target
    leftovers = [name for name in _entries(tmp_path) if name != "results.txt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".results.txt.") and leftovers[0].endswith(".tmp")


def test_dir_replaces_existing_folder(tmp_path):
    target = tmp_path / "final_model"
    target.mkdir()
    (target / "old_only.bin").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and not any(tmp.iterdir())
        (tmp / "config.json").write_text("{}")
        # the old folder is still in place while the new one is being written
        assert (target / "old_only.bin").read_text() == "old"
    assert _entries(target) == ["config.json"]
    assert _entries(tmp_path) == ["final_model"]


def test_dir_creates_missing_folder(tmp_path):
    target = tmp_path / "a" / "b"
    with atomic_dir(target) as tmp:
        (tmp / "x.txt").write_text("x")
    assert (target / "x.txt").read_text() == "x"
    assert _entries(tmp_path / "a") == ["b"]


def test_exception_in_dir_block_keeps_old_folder(tmp_path):
    target = tmp_path / "final_model"
    target.mkdir()
    (target / "weights.bin").write_text("old")
    with pytest.raises(ValueError, match="save failed"):
        with atomic_dir(target) as tmp:
            (tmp / "weights.bin").write_text("partial")
            raise ValueError("save failed")
    assert _entries(target) == ["weights.bin"]
    assert (target / "weights.bin").read_text() == "old"
    assert _entries(tmp_path) == ["final_model"]


def test_failed_swap_puts_old_folder_back(tmp_path, monkeypatch):
    """If renaming the new folder in fails after the old one was moved aside, the old one returns to ``path``."""
    target = tmp_path / "final_model"
    target.mkdir()
    (target / "weights.bin").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if Path(dst) == target and Path(src).name.endswith(".tmp"):
            raise OSError("rename refused")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename refused"):
        with atomic_dir(target) as tmp:
            (tmp / "weights.bin").write_text("new")
    assert (target / "weights.bin").read_text() == "old"
    assert _entries(tmp_path) == ["final_model"]
