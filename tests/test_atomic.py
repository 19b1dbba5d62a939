"""Atomic writes: complete files only, permissions as a plain open() would give, nothing left on failure."""

import os
import stat

import pytest

from aslbatch.atomic import atomic_open, stale_temporaries


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_file_has_the_permissions_of_a_plain_open(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_open(tmp_path / "a.txt") as fh:
            fh.write("x")
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~umask


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "b.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as fh:
            fh.write("new, half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert stale_temporaries(tmp_path) == []
