"""Atomic file writes: a reader sees the old file or the complete new one, never half of one.

Write to a temporary name in the destination folder, flush and fsync, then
``os.replace`` onto the final name (atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

#: part of every temporary file name: ``.<final name>.<random>.aslbatch-tmp[<suffix>]``
TEMP_MARK = ".aslbatch-tmp"


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Temporary files left under ``folder`` by writes that were killed before finishing."""
    return [p for p in Path(folder).rglob(f".*{TEMP_MARK}*") if p.is_file()]


def _umask() -> int:
    """The process's umask: from /proc on Linux (no side effect), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)  # briefly restrictive, never briefly permissive
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    ``suffix`` is appended to the temporary name for writers that insist on an
    extension (e.g. ``numpy.savez`` adds ``.npz`` to names without it). On an
    exception the temporary file is removed and ``path`` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TEMP_MARK + suffix, dir=final.parent)
    # mkstemp creates 0600; the final file gets what open() would give it: 0666 minus the umask
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open`` for writing whose result appears at ``path`` only once complete."""
    if not mode.startswith("w"):
        raise ValueError("atomic_open is for writing ('w' or 'wb')")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
