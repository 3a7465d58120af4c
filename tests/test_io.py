"""latentflow.io: atomic files and folders, with the umask's permissions; writes that fill a real (tmpfs) disk;
the folder lock against real holder processes, killed ones among them."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from small_disk import fill_leaving, free_bytes, mounted_tmpfs, tree_files

from latentflow.errors import DiskFullError, LatentflowError
from latentflow.io import (
    LOCK_NAME,
    acquire_lock,
    append_text,
    folder_lock,
    lock_record,
    process_start,
    read_json,
    read_lock,
    write_bytes_atomic,
    write_folder_atomic,
    write_json_atomic,
)

REPO = Path(__file__).parents[1]


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


# ---- a full disk, for real: a small tmpfs --------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    with mounted_tmpfs(tmp_path / "disk", "2m") as disk:
        yield disk


def test_a_file_too_big_for_the_disk_is_named_and_leaves_nothing(small_disk: Path) -> None:
    with pytest.raises(DiskFullError) as raised:
        write_bytes_atomic(small_disk / "out" / "big.bin", bytes(3 << 20))
    message = str(raised.value)
    assert message.startswith(f"disk full: writing big.bin (3.0 MiB) into {small_disk / 'out'} failed and was removed")
    assert "free some space there and run the same command again" in message and "\n" not in message
    assert tree_files(small_disk) == ["out"]  # no temporary left
    assert write_bytes_atomic(small_disk / "out" / "small.bin", b"x").read_bytes() == b"x"


@pytest.mark.parametrize("library", ["torch.save", "safetensors"])
def test_a_folder_the_disk_cannot_hold_keeps_the_old_one(small_disk: Path, library: str) -> None:
    """torch.save says only 'unexpected pos', safetensors 'os error 28': both become the one disk-full error."""
    target = small_disk / "model"
    write_folder_atomic(target, lambda d: (d.mkdir(), (d / "v1.txt").write_text("1")))
    tensors = {"weight": torch.zeros(1 << 20)}  # 4 MiB
    save = {"torch.save": lambda d: torch.save(tensors, d / "w.pt"),
            "safetensors": lambda d: save_file(tensors, d / "w.safetensors")}[library]
    with pytest.raises(DiskFullError, match=rf"disk full: writing model \(.* written so far\) into {small_disk}"):
        write_folder_atomic(target, lambda d: (d.mkdir(), save(d)))
    assert tree_files(small_disk) == ["model", "model/v1.txt"]  # the old folder, no staging or old copy
    assert free_bytes(small_disk) > 1 << 20


def test_an_append_that_does_not_fit_is_cut_back(small_disk: Path) -> None:
    log = small_disk / "log.csv"
    append_text(log, "step,loss\r\n")
    fill_leaving(small_disk, 0)
    with pytest.raises(DiskFullError, match="disk full: writing log.csv"):
        append_text(log, "1," + "9" * 10_000 + "\r\n")
    assert log.read_bytes() == b"step,loss\r\n"


def test_other_write_errors_stay_what_they_were(tmp_path: Path) -> None:
    def broken(staging: Path) -> None:
        staging.mkdir()
        raise RuntimeError("a bug, not a full disk")

    with pytest.raises(RuntimeError, match="a bug"):
        write_folder_atomic(tmp_path / "model", broken)
    assert not list(tmp_path.iterdir())


# ---- one writer per folder: real holder processes ---------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from latentflow.io import acquire_lock
acquire_lock(Path(sys.argv[1]), "latentflow encode")
print("held", flush=True)
time.sleep(600)
"""


def start_holder(folder: Path) -> subprocess.Popen:
    """A real process that takes the lock of `folder` and keeps it (until killed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                               env=env)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_is_refused_naming_the_holder_then_takes_over_once_it_is_killed(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    holder = start_holder(folder)
    try:
        with pytest.raises(LatentflowError) as raised:
            acquire_lock(folder, "latentflow encode", "another --out")
        message = str(raised.value)
        assert message.startswith(f"{folder} is being written by latentflow encode (pid {holder.pid} on host "
                                  f"{socket.gethostname()}, since {time.strftime('%Y-%m-%d')}")
        assert message.endswith("wait for it to end or stop it, or write to another --out") and "\n" not in message
        assert holder.poll() is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = acquire_lock(folder, "latentflow encode")  # the killed holder's lock stays behind, and is taken over
    assert lock.replaced["pid"] == holder.pid and read_lock(folder / LOCK_NAME)["pid"] == os.getpid()
    lock.release()
    assert not (folder / LOCK_NAME).exists()


def test_the_lock_of_a_killed_but_unreaped_holder_is_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = start_holder(folder)
    holder.send_signal(signal.SIGKILL)
    while process_start(holder.pid) != "zombie":  # dead, not yet waited for: its pid still answers kill(pid, 0)
        time.sleep(0.01)
    try:
        with folder_lock(folder, "latentflow train", "another output_dir") as lock:
            assert lock.replaced["pid"] == holder.pid
    finally:
        holder.wait()
    assert not (folder / LOCK_NAME).exists()


RACER = """
import sys, time
from pathlib import Path
from latentflow.errors import LatentflowError
from latentflow.io import acquire_lock
go, stop = Path(sys.argv[2]), Path(sys.argv[3])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
try:
    acquire_lock(Path(sys.argv[1]), "racer")
    print("got", flush=True)
    while not stop.exists():  # hold the lock until every racer has tried
        time.sleep(0.01)
except LatentflowError:
    print("refused", flush=True)
"""


def test_of_racers_for_a_stale_lock_exactly_one_wins(tmp_path: Path) -> None:
    """Three real processes start at once on the lock of a dead process: one takes it over, two are refused."""
    folder, go, stop = tmp_path / "cache", tmp_path / "go", tmp_path / "stop"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {**lock_record("latentflow encode"), "pid": int(dead.stdout)}
    (folder / LOCK_NAME).write_text(json.dumps(record))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(folder), str(go), str(stop)],
                               stdout=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    try:
        assert [racer.stdout.readline().strip() for racer in racers] == ["ready"] * 3
        go.touch()
        outcomes = sorted(racer.stdout.readline().strip() for racer in racers)
    finally:
        stop.touch()
        for racer in racers:
            racer.wait(timeout=60)
    assert outcomes == ["got", "refused", "refused"]


def test_locks_of_other_hosts_unreadable_locks_and_reused_pids(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    path = folder / LOCK_NAME
    path.write_text(json.dumps({**lock_record("latentflow train"), "host": "elsewhere"}))
    with pytest.raises(LatentflowError, match=f"on host elsewhere.*if it no longer runs delete {path}; or write to"):
        acquire_lock(folder, "latentflow train")  # its pid cannot be checked from here
    path.write_text("")
    with pytest.raises(LatentflowError, match=f"locked by {path}, which cannot be read: if no latentflow"):
        acquire_lock(folder, "latentflow train")
    path.write_text(json.dumps({**lock_record("latentflow train"), "process_start": "1"}))
    lock = acquire_lock(folder, "latentflow train")  # our own pid, but started at another time: a reused pid
    assert lock.replaced["process_start"] == "1"
    lock.release()


def test_a_lock_leaves_no_trace_where_nothing_was_written(tmp_path: Path) -> None:
    with folder_lock(tmp_path / "a" / "b", "latentflow encode", "another --out"):
        assert (tmp_path / "a" / "b" / LOCK_NAME).is_file()
    assert not (tmp_path / "a").exists()
    with folder_lock(tmp_path / "c", "latentflow encode", "another --out"):
        (tmp_path / "c" / "shard.tar").write_bytes(b"1")
    assert tree_files(tmp_path / "c") == ["shard.tar"]


def test_a_folder_write_replaces_only_an_earlier_folder_of_its_kind(tmp_path: Path) -> None:
    """`write_folder_atomic(..., holds=MARKER)` replaces a missing, empty or earlier folder, never anything else."""
    from latentflow.io import write_folder_atomic

    def fill(folder: Path) -> None:
        folder.mkdir()
        (folder / "index.json").write_text("new")

    assert write_folder_atomic(tmp_path / "new", fill, "index.json", "pipeline folder") == tmp_path / "new"
    (tmp_path / "new" / "extra").write_text("old")
    write_folder_atomic(tmp_path / "new", fill, "index.json", "pipeline folder")  # an earlier one: replaced
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["index.json"]
    (tmp_path / "empty").mkdir()
    write_folder_atomic(tmp_path / "empty", fill, "index.json", "pipeline folder")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.csv").write_text("mine")
    with pytest.raises(LatentflowError, match=r"run is not a pipeline folder \(no index.json\) and writing one "
                                              r"would replace it with all it holds"):
        write_folder_atomic(tmp_path / "run", fill, "index.json", "pipeline folder")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(LatentflowError, match=r"file is a file, not a pipeline folder; give a new folder"):
        write_folder_atomic(tmp_path / "file", fill, "index.json", "pipeline folder")
    assert (tmp_path / "run" / "log.csv").read_text() == (tmp_path / "file").read_text() == "mine"
    assert not list(tmp_path.glob(".*"))  # no staging folder left
