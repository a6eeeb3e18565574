"""Atomic writes: the old file or the new one, never half of it; no temporary file left; ordinary permissions."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest

from nnfiltermatch import files
from nnfiltermatch.files import atomic_write_bytes, atomic_write_text, disk_full_reason, format_size


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


def test_disk_full_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC anywhere in the chain is a full disk; other errors only when they say nothing and no space is left."""
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "x.pkl")
    assert "No space left on device" in (disk_full_reason(enospc, tmp_path) or "")
    in_worker = RuntimeError("worker failed")
    in_worker.__cause__ = enospc  # how an error raised in a worker process comes back
    assert disk_full_reason(in_worker, tmp_path) is not None
    blosc2_words = RuntimeError("Error while creating the NDArray")
    assert shutil.disk_usage(tmp_path).free > 2**30, "this test needs a disk with room"
    assert disk_full_reason(blosc2_words, tmp_path) is None

    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=3 * 2**20))
    assert (
        disk_full_reason(blosc2_words, tmp_path) == "RuntimeError: Error while creating the NDArray; only 3.0 MiB free"
    )
    assert disk_full_reason(OSError("write failed"), tmp_path) is not None
    assert disk_full_reason(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert disk_full_reason(ValueError("bad value"), tmp_path) is None

    class OwnError(RuntimeError):
        """An error of ours that names its own cause (e.g. PreparationError)."""

    assert disk_full_reason(OwnError("-c 3d_lowres: not in the plans"), tmp_path) is None
    assert [format_size(n) for n in (512, 3 * 2**20, 1.25 * 2**30, 5 * 2**40)] == [
        "512 bytes",
        "3.0 MiB",
        "1.2 GiB",
        "5120.0 GiB",
    ]


# ----- outputs that cannot be written are refused before any work ---------------------------------------------------


def test_unwritable_output_is_refused_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """/sys refuses writes even to root, as a read-only mount does; the error names the option and the folder."""
    from nnfiltermatch.cli import main
    from nnfiltermatch.files import NotWritableError, require_writable

    require_writable(tmp_path / "new" / "deeper", "-o")  # creatable: fine, and nothing is left behind
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NotWritableError, match="-o /sys/nnfm/out: cannot write in /sys"):
        require_writable("/sys/nnfm/out", "-o")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotWritableError, match="is a file, not a folder"):
        require_writable(tmp_path / "file" / "sub", "--export")
    pred = tmp_path / "pred"
    pred.mkdir()
    code = main(["evaluate", "--pred", str(pred), "-r", str(pred), "-o", "/sys/nnfm/summary.json"])
    assert code == 2
    assert "nnfiltermatch evaluate: error: -o /sys/nnfm/summary.json: cannot write in /sys" in capsys.readouterr().err
