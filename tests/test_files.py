"""Atomic writes: the old file or the new one, never half of it; no temporary file left; ordinary permissions."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from nnfiltermatch import files
from nnfiltermatch.files import atomic_write_bytes, atomic_write_text


def test_writes_replaces_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "plans.json"
    assert atomic_write_text(target, "first") == target
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["plans.json"]


def test_permissions_follow_the_umask_like_open(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o640


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_text(target, "old")
    real_fdopen = os.fdopen

    class FullDisk:
        """The file object of a disk that fills up after 3 bytes."""

        def __init__(self, fd: int, mode: str) -> None:
            self.handle = real_fdopen(fd, mode)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def write(self, payload: bytes) -> None:
            self.handle.write(payload[:3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fdopen", FullDisk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "new and longer")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
