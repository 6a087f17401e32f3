"""Atomic writes: a file or a folder is either the old one or the complete new one, never half of each.

A process killed while writing (SIGKILL, out of memory, a pre-empted job) leaves a truncated file when the
write goes straight to the final path; the next reader (a resume, an evaluation, a results table) then fails
or, worse, reads partial content. The cure is the same for every writer: write a temporary sibling in the
same folder, flush it to disk, then rename it onto the final path. A rename inside one filesystem is atomic
on POSIX: readers see the old entry or the new one. The temporary sibling lives in the SAME folder because a
rename across filesystems (e.g. /tmp -> the run folder) is a copy, which is not atomic.

Three entry points, one mechanism:

- ``atomic_file(path)``: context manager yielding a temporary file path; write it with any library
  (``torch.save``, ``json.dump``...); it replaces ``path`` when the block succeeds.
- ``atomic_write_text(path, text)``: the common case of ``atomic_file`` for text.
- ``atomic_dir(path)``: context manager yielding a temporary sibling folder; it replaces the folder
  ``path`` when the block succeeds. A folder cannot be swapped in one rename when the destination exists,
  so an existing ``path`` is renamed aside first, the new folder renamed in, then the old one deleted:
  at every instant either the old or the new complete folder is reachable (at ``path`` or at the aside name).

On an exception inside the block the temporary file/folder is removed and ``path`` is untouched.
Temporary names start with ``.`` and the final name, so a crash leftover is visible next to its target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "atomic_write_text"]

# mkstemp/mkdtemp create private entries (0600 / 0700); the final file should get the permissions an ordinary
# open() would give it, i.e. 0666 / 0777 minus the process umask. os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entry table, so that a rename inside it survives a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        # some filesystems (FUSE, SMB) refuse fsync on a folder: the rename is still atomic, only its
        # durability across a power loss is not promised there
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is flushed to disk and renamed onto ``path``.

    The caller writes the yielded path completely (and closes it) inside the block. Parent folders are created.

    Example::

        with atomic_file(run_dir / "last.ckpt") as tmp:
            torch.save(checkpoint, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # the data must be on disk BEFORE the rename makes it visible, else a crash can publish an empty file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically: a crash leaves the old content (or no file), never a prefix."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk (the content must land before the rename)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            file = Path(root) / name
            if file.is_file() and not file.is_symlink():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success it becomes ``path`` (replacing an old one).

    Fill the yielded folder inside the block (e.g. ``model.save_pretrained(tmp)``). On success the swap is:
    old ``path`` -> ``.<name>.old-XXXX`` (if it exists), temporary folder -> ``path``, then the old one is
    deleted. If the second rename fails the old folder is put back. On an exception inside the block the
    temporary folder is deleted and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        _fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists() or path.is_symlink():
        # a fresh unique name for the aside copy: mkdtemp reserves it, the rename then replaces that empty folder
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        old.rmdir()
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        _remove(old)
