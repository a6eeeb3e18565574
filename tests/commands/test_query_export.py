"""The --export folder: which folders it refuses, and replacing an earlier export in one rename."""

from __future__ import annotations

from pathlib import Path

import pytest

from nnfiltermatch.commands.query_export import EXPORT_FOLDERS, SELECTION_CSV, check_export_target, install_export
from nnfiltermatch.commands.query_model import QueryError


def test_export_folder_refusals_and_replacement(tmp_path: Path) -> None:
    check_export_target(tmp_path / "new", overwrite=False)  # a new folder, or an empty one, is fine
    (tmp_path / "empty").mkdir()
    check_export_target(tmp_path / "empty", overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(QueryError, match="not a folder"):
        check_export_target(tmp_path / "file", overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(QueryError, match="not empty: give a new folder, or add --overwrite"):
        check_export_target(other, overwrite=False)
    with pytest.raises(QueryError, match="not an earlier query export"):
        check_export_target(other, overwrite=True)
    earlier = tmp_path / "earlier"
    (earlier / EXPORT_FOLDERS["labels"]).mkdir(parents=True)
    (earlier / SELECTION_CSV).write_text("old\n")
    staging = tmp_path / ".earlier.partial-test"
    staging.mkdir()
    (staging / SELECTION_CSV).write_text("new\n")
    assert install_export(staging, earlier, overwrite=True) == earlier
    assert (earlier / SELECTION_CSV).read_text() == "new\n" and not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "empty", "file", "other"]  # nothing left over
    (earlier / EXPORT_FOLDERS["labels"]).mkdir()
    (earlier / EXPORT_FOLDERS["labels"] / "case_001.nii.gz").write_bytes(b"a corrected mask")
    with pytest.raises(QueryError, match="corrected masks that would be lost"):
        check_export_target(earlier, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
