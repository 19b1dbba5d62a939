"""Shared checks of the fault catalogue (issue 14): every fault test asserts that the raw dataset
is byte-for-byte unchanged and that no stray file (a temporary of an atomic write, a file
outside the output folder) remains."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from aslbatch.atomic import stale_temporaries

__all__ = ["tree_digest", "assert_untouched", "assert_no_stray_files"]


def tree_digest(root: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file below ``root`` (symlinks followed), keyed by relative path; a
    derivatives folder inside it is left out (a run may write there)."""
    root = Path(root)
    digests = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts and rel.parts[0] == "derivatives":
            continue
        if path.is_file():
            digests[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def assert_untouched(root: str | os.PathLike, before: dict[str, str]) -> None:
    """The raw tree below ``root`` has exactly the files and bytes of ``before`` (:func:`tree_digest`)."""
    after = tree_digest(root)
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert (sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys()), changed) == ([], [], []), \
        "the raw dataset was modified: (added, removed, changed)"


def assert_no_stray_files(out: str | os.PathLike) -> None:
    """No temporary of an atomic write remains anywhere below ``out``."""
    stale = stale_temporaries(out) if Path(out).exists() else []  # recursive
    assert stale == [], f"stray temporaries: {stale}"
