"""A real small disk for tests of a full disk: a tmpfs mounted in the test's folder (root only), and ballast."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

CHUNK = 1 << 16


@contextmanager
def mounted_tmpfs(folder: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of `size` at `folder` for the block (unmounted after); skips the test when it cannot be mounted."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a small tmpfs, and mounting one needs root")
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to mount a small tmpfs")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {folder}: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # still busy: detach it


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def fill_leaving(folder: Path, leave: int) -> Path:
    """Write a ballast file into `folder` until about `leave` bytes stay free (real zeros, not a sparse file)."""
    ballast = folder / "ballast"
    with open(ballast, "wb") as stream:
        while free_bytes(folder) - CHUNK >= leave:
            stream.write(bytes(CHUNK))
            stream.flush()
        remainder = free_bytes(folder) - leave
        if remainder > 0:
            stream.write(bytes(remainder))
    return ballast


def tree_files(folder: Path) -> list[str]:
    """Every file and folder under `folder`, relative, sorted (hidden ones included)."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))
