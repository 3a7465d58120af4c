"""latentflow.io: atomic files and folders, with the umask's permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from latentflow.io import read_json, write_bytes_atomic, write_folder_atomic, write_json_atomic


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_get_the_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        path = write_bytes_atomic(tmp_path / "a" / "b.bin", b"xyz")
        folder = write_folder_atomic(tmp_path / "f", lambda d: (d.mkdir(), (d / "w.safetensors").write_bytes(b"1"),
                                                                os.chmod(d / "w.safetensors", 0o600)))
    finally:
        os.umask(old)
    assert path.read_bytes() == b"xyz" and mode(path) == 0o640
    assert mode(folder / "w.safetensors") == 0o640 and mode(folder) == 0o750


def test_a_folder_is_replaced_whole_and_never_missing(tmp_path: Path) -> None:
    target = tmp_path / "model"
    write_folder_atomic(target, lambda d: (d.mkdir(), (d / "v1.txt").write_text("1")))
    seen = []

    def fill(staging: Path) -> None:
        staging.mkdir()
        (staging / "v2.txt").write_text("2")
        seen.append(sorted(p.name for p in target.iterdir()))  # the old folder is still there while we write

    write_folder_atomic(target, fill)
    assert seen == [["v1.txt"]] and sorted(p.name for p in target.iterdir()) == ["v2.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or old folder left


def test_a_failed_fill_leaves_the_old_folder_and_no_staging(tmp_path: Path) -> None:
    target = tmp_path / "model"
    write_folder_atomic(target, lambda d: (d.mkdir(), (d / "v1.txt").write_text("1")))

    def broken(staging: Path) -> None:
        staging.mkdir()
        (staging / "half.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomic(target, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in target.iterdir()) == ["v1.txt"]


def test_json_round_trip_and_errors_name_the_file(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert read_json(tmp_path / "x.json", "x") == {"a": 1}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json", "x")
    with pytest.raises(FileNotFoundError, match="x not found"):
        read_json(tmp_path / "missing.json", "x")
