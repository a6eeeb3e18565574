"""Labelled lists: read strictly (with the reasons named), sampled reproducibly, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_inventory import build, build_error, case_ids

from nnfiltermatch.data.labeled_lists import read_labeled_list, sample_labeled_ids, write_labeled_list
from nnfiltermatch.errors import DataValidationError


def test_empty_labelled_list(raw: Path, tmp_path: Path) -> None:
    p = tmp_path / "labeled.txt"
    p.write_text("# nothing here\n\n   \n")
    with pytest.raises(DataValidationError, match="at least one labelled case is needed") as exc:
        read_labeled_list(p)
    assert str(p) in str(exc.value)
    assert "at least one labelled case" in build_error(raw, labeled_ids=[])


def test_missing_labelled_list_file(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="does not exist") as exc:
        read_labeled_list(tmp_path / "nope.txt")
    assert "nope.txt" in str(exc.value)


def test_duplicate_ids(raw: Path, tmp_path: Path) -> None:
    p = tmp_path / "labeled.txt"
    p.write_text("hippocampus_001\nhippocampus_003\n  hippocampus_001  \n")
    with pytest.raises(DataValidationError, match="duplicate case ID 'hippocampus_001' on lines 1, 3"):
        read_labeled_list(p)
    msg = build_error(raw, labeled_ids=["hippocampus_001", "hippocampus_001"])
    assert "duplicate case IDs ['hippocampus_001']" in msg


def test_ids_with_file_ending_or_channel_suffix(tmp_path: Path) -> None:
    p = tmp_path / "labeled.txt"
    p.write_text("hippocampus_001_0000.nii.gz\nhippocampus_003.nii\n")
    with pytest.raises(DataValidationError) as exc:
        read_labeled_list(p)
    msg = str(exc.value)
    assert "'hippocampus_001_0000.nii.gz'" in msg and "'hippocampus_003.nii'" in msg and "bare case IDs" in msg
    assert "'hippocampus_001'" in msg  # suggestion
    p.write_text("hippocampus_001_0000\n")
    with pytest.raises(DataValidationError, match="channel suffix _0000"):
        read_labeled_list(p, known_ids=["hippocampus_001"])
    # IDs that really end in _NNNN stay valid.
    p.write_text("patient_0001\n")
    assert read_labeled_list(p) == ["patient_0001"]
    assert read_labeled_list(p, known_ids=["patient_0001"]) == ["patient_0001"]


def test_sample_labeled_ids() -> None:
    ids = [f"case_{i:03d}" for i in range(40)]
    a = sample_labeled_ids(ids, 0.2, seed=0)
    assert a == sample_labeled_ids(list(reversed(ids)), 0.2, seed=0)  # order-independent
    assert a == sorted(a) and len(a) == 8 and set(a) <= set(ids)
    assert a != sample_labeled_ids(ids, 0.2, seed=1)
    assert len(sample_labeled_ids(ids, 0.001, seed=0)) == 1
    assert sample_labeled_ids(ids, 1.0, seed=5) == ids
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(DataValidationError, match=r"\(0, 1\]") as exc:
            sample_labeled_ids(ids, bad, seed=0)
        assert repr(bad) in str(exc.value)
    with pytest.raises(DataValidationError, match="no case IDs"):
        sample_labeled_ids([], 0.5, seed=0)


def test_write_labeled_list_is_atomic_and_replaces(tmp_path: Path) -> None:
    p = tmp_path / "labeled.txt"
    write_labeled_list(["a", "b"], p)
    write_labeled_list(["c"], p, header="second")
    assert p.read_text() == "# second\nc\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["labeled.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any list the user writes, not mkstemp's 0600
    with pytest.raises(DataValidationError, match="invalid case IDs"):
        write_labeled_list(["ok", "bad id\n"], p)
    assert p.read_text() == "# second\nc\n"


def test_labelled_list_with_byte_order_mark(raw: Path, tmp_path: Path) -> None:
    """A list saved by a Windows editor began with '\\ufeffhippocampus_001', an unknown case."""
    ids = case_ids(raw)[:3]
    p = tmp_path / "labeled.txt"
    p.write_text("\n".join(ids) + "\n", encoding="utf-8-sig")
    assert p.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_labeled_list(p) == ids
    assert build(raw, labeled_ids=read_labeled_list(p)).labeled_ids == ids
    p.write_text("\n".join(ids) + "\n", encoding="utf-16")  # PowerShell's `>`
    assert read_labeled_list(p) == ids
    p.write_bytes("\ufeff{}\n\ufeff{}\n".format(*ids[:2]).encode())  # two lists joined with cat
    assert read_labeled_list(p) == ids[:2]
