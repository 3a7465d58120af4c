"""Every write the project makes to disk, atomically: a temporary name in the same folder, flushed, then renamed.

A reader sees either the old file (or folder) or the whole new one, never a half-written one. New files get the
usual permissions (0o666 less the umask), not mkstemp's owner-only 0o600. The latent cache's shard writer is the
one other place that renames (it streams shards too large to buffer; see `latentflow.data.writer`).

A write that fails removes what it left (`writing`), and a full disk becomes one `DiskFullError` naming the folder
and the size, whatever library hit it (OSError ENOSPC/EDQUOT, safetensors' and torch's own errors).

One writer per folder: `folder_lock` holds `FOLDER/.latentflow.lock` (created with O_CREAT | O_EXCL) while a
command writes there; a second writer is refused with the holder's pid, host and start, and the lock of a process
that no longer runs on this host is taken over.

Also here: reading a JSON object with errors that name the file, and the one image grid / image saver.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from latentflow.errors import DiskFullError, LatentflowError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give `path` the permissions a plain `open`/`mkdir` would (0o666 / 0o777 less the umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; creates the parent folder. Returns the path.

    Raises:
        DiskFullError: the disk filled up (the temporary file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with writing(path.parent, path.name, lambda: len(data), lambda: Path(temporary).unlink(missing_ok=True)):
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        apply_umask(temporary)
        os.replace(temporary, path)
    return path


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` to `path` whole or not at all: a failed append (a full disk) cuts the file back."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    with writing(path.parent, path.name, lambda: len(text.encode()), lambda: os.truncate(path, size)):
        with open(path, "a", newline="") as stream:
            stream.write(text)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write `payload` as JSON (with a final newline) to `path` atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a numpy array as .npy atomically (no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return write_bytes_atomic(path, buffer.getvalue())


def json_sha256(value: Any) -> str:
    """Hex sha256 of a JSON-able value (keys sorted): the key of a cache entry from what it depends on."""
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read a JSON object, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise LatentflowError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise LatentflowError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_folder_atomic(target: str | os.PathLike, fill: Callable[[Path], Any], holds: str | None = None,
                        what: str = "folder") -> Path:
    """Write a whole folder: `fill(staging)` writes into a fresh staging folder beside `target`, which then
    replaces `target`. At every moment `target` is either the old folder or the new one: the old one is renamed
    aside (`.NAME.old`) only after the new one is complete, and the new one is renamed in right after.

    `holds`: the file every such folder has (e.g. a pipeline's model_index.json); an existing `target` with
    files but without it is something else (a training run, a cache, a parent folder) and is refused before
    `fill` runs, naming it as the `what` to write.

    Raises:
        LatentflowError: `target` is a file, or a folder with files but without `holds`.
        DiskFullError: the disk filled up (the staging folder is removed, `target` is untouched).
    """
    target = Path(target)
    check_folder_target(target, holds, what)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    with writing(target.parent, target.name, lambda: tree_size(staging), lambda: shutil.rmtree(staging, True),
                 partial=True):
        fill(staging)
        for folder, _, files in os.walk(staging):  # what we write gets the umask's permissions
            apply_umask(folder, directory=True)
            for name in files:
                apply_umask(os.path.join(folder, name))
        replace_folder(staging, target)
    return target


PIPELINE_MARKER = "model_index.json"
"""What every pipeline folder holds (diffusers' index of its components): how a folder is known as one."""


def check_folder_target(target: str | os.PathLike, holds: str | None = None, what: str = "folder") -> None:
    """Refuse a `target` that `write_folder_atomic(target, fill, holds, what)` must not replace: a file, or (with
    `holds`) a folder with files but without `holds`; callers check before slow work."""
    target = Path(target)
    if target.is_file():
        raise LatentflowError(f"{target} is a file, not a {what}; give a new folder")
    if holds is not None and target.is_dir() and any(target.iterdir()) and not (target / holds).is_file():
        raise LatentflowError(f"{target} is not a {what} (no {holds}) and writing one would replace it with all "
                              f"it holds; give a new or empty folder, or an earlier {what} to overwrite")


def replace_folder(staging: Path, target: Path) -> None:
    """Rename a fully written `staging` folder to `target`, replacing an old one (set aside first, then removed)."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


# ---- failed writes and full disks ------------------------------------------------------------------------------

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
LOW_SPACE = 1 << 20  # bytes free below which a failed write is put down to the full disk (torch says only
# "unexpected pos" or "file write failed")


@contextmanager
def writing(folder: Path, what: str, size: Callable[[], int], cleanup: Callable[[], Any],
            partial: bool = False) -> Iterator[None]:
    """Run a write of `what` into `folder`: if it fails, `cleanup()` removes what it left and the error is raised
    again, as a `DiskFullError` naming `folder` and `size()` bytes (measured before the cleanup; `partial`: the
    bytes written so far, not the whole) when the disk was full."""
    try:
        yield
    except BaseException as error:
        full = _is_disk_full(error, Path(folder))  # judged before the cleanup frees the space
        written = size() if full else 0
        cleanup()
        if full:
            raise disk_full_error(Path(folder), what, written, partial) from error
        raise


def disk_full_error(folder: Path, what: str, size: int, partial: bool = False) -> DiskFullError:
    """The one-line error for a write of `what` (`size` bytes; `partial`: written so far) that filled the disk."""
    amount = f"{human_bytes(size)} written so far" if partial else human_bytes(size)
    return DiskFullError(f"disk full: writing {what} ({amount}) into {folder} failed and was removed, "
                         f"{human_bytes(free_bytes(folder))} free now: free some space there and run the same "
                         "command again")


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    if isinstance(error, DiskFullError) or (isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS):
        return True
    if not isinstance(error, (OSError, RuntimeError)) and type(error).__name__ != "SafetensorError":
        return False
    return any(text in str(error) for text in DISK_FULL_TEXTS) or free_bytes(folder) < LOW_SPACE


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged process may still write on the disk of `folder` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def tree_size(path: Path) -> int:
    """Bytes in the files under `path` (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.is_dir() else 0


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    if count < 1024:
        return f"{count} B"
    exponent = min((count.bit_length() - 1) // 10, 4)  # 1024 ** exponent <= count
    return f"{count / 1024 ** exponent:.1f} {('KiB', 'MiB', 'GiB', 'TiB')[exponent - 1]}"


# ---- one writer per folder ------------------------------------------------------------------------------------

LOCK_NAME = ".latentflow.lock"


@dataclass
class FolderLock:
    """A held `FOLDER/.latentflow.lock`; `replaced` is the record of a dead holder whose lock was taken over."""

    path: Path
    token: str
    created: list[Path] = field(default_factory=list)  # folders the lock made, deepest first
    replaced: dict[str, Any] | None = None

    def release(self) -> None:
        """Remove the lock file if it is still ours, and the folders the lock made if they stayed empty."""
        if (read_lock(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the command wrote there


@contextmanager
def folder_lock(folder: str | os.PathLike, owner: str, fix: str, main: bool = True,
                share: Callable[[str | None], str | None] = lambda refusal: refusal) -> Iterator[FolderLock | None]:
    """Hold the lock of `folder` while the block runs (released on normal exit and on errors).

    Args:
        folder: the folder one command writes (created if missing; removed again if the command left it empty).
        owner: who holds it, e.g. "latentflow encode" (recorded, and named to a refused second writer).
        fix: the other folder a refused writer could choose, e.g. "another --out".
        main: whether this process takes the lock (under several processes: the main one only).
        share: the main process's refusal (None when it got the lock) as every process sees it: a broadcast
            under several processes, so that all of them stop together.

    Raises:
        LatentflowError: another live process holds the lock (naming its pid, host and start).
    """
    lock, refusal = None, None
    if main:
        try:
            lock = acquire_lock(Path(folder), owner, fix)
        except (LatentflowError, OSError) as error:
            refusal = str(error)
    refusal = share(refusal)
    if refusal is not None:
        raise LatentflowError(refusal)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def acquire_lock(folder: Path, owner: str, fix: str = "another folder") -> FolderLock:
    """Create `folder/.latentflow.lock` atomically, taking over the lock of a holder that no longer runs here.

    Raises:
        LatentflowError: a live process (or one on another host, or an unreadable lock) holds it.
    """
    blocking = next((parent for parent in (folder, *folder.parents) if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise LatentflowError(f"{owner} writes a folder at {folder}, and {blocking} is a file; choose {fix}")
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path, record = folder / LOCK_NAME, lock_record(owner)
    replaced = None
    for _ in range(5):  # a stale lock is removed, then the creation is tried again
        if _create_lock(path, record):
            return FolderLock(path, record["token"], created, replaced)
        holder = read_lock(path)
        if holder is None:
            continue  # released in between
        if not holder_is_gone(holder):
            raise LatentflowError(lock_refusal(folder, path, holder, fix))
        replaced = holder
        _remove_stale_lock(folder, path, holder)
    raise LatentflowError(f"could not take the lock {path}: other processes keep taking it; write to {fix}")


def lock_record(owner: str) -> dict[str, Any]:
    """What a lock file records: the holder's pid, host, process start, wall-clock start, command and a token."""
    return {"owner": owner, "pid": os.getpid(), "host": socket.gethostname(), "process_start": process_start(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:500],
            "token": uuid.uuid4().hex}


def _create_lock(path: Path, record: dict[str, Any]) -> bool:
    """Create the lock file with O_CREAT | O_EXCL (atomic: one creator wins); False when it exists."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    data = json.dumps(record).encode()
    with writing(path.parent, path.name, lambda: len(data), lambda: path.unlink(missing_ok=True)):
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return True


def read_lock(path: Path) -> dict[str, Any] | None:
    """The record of a lock file; None when there is none; `{}` when it stays unreadable (its writer died between
    creating and filling it, or something else wrote it)."""
    for _ in range(20):  # a creator fills the file right after creating it
        try:
            record = json.loads(path.read_text())
            if isinstance(record, dict):
                return record
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        time.sleep(0.025)
    return {}


def holder_is_gone(holder: dict[str, Any]) -> bool:
    """Whether the process that wrote a lock record surely no longer runs: it ran on this host and its pid is
    free, a zombie, or now another process (started at another time)."""
    if not holder or holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = process_start(pid)
    return start == "zombie" or (start is not None and holder.get("process_start") not in (None, start))


def process_start(pid: int | None = None) -> str | None:
    """A running process's start time in clock ticks since boot (from /proc), 'zombie' for one that ended but
    was not reaped, None where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid or os.getpid()}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return "zombie" if fields[0] in ("Z", "X") else fields[19]


def _remove_stale_lock(folder: Path, path: Path, holder: dict[str, Any]) -> None:
    """Delete a dead holder's lock, if it is still that one; takers of a stale lock take turns (flock of the
    folder), so that none deletes the lock another one has just created."""
    import fcntl

    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        if read_lock(path) == holder:
            path.unlink(missing_ok=True)
    finally:
        os.close(descriptor)


def lock_refusal(folder: Path, path: Path, holder: dict[str, Any], fix: str) -> str:
    """The one-line refusal naming the holder and what to do."""
    if not holder:
        return (f"{folder} is locked by {path}, which cannot be read: if no latentflow command writes there, "
                f"delete {path}; or write to {fix}")
    who = (f"{holder.get('owner', 'another process')} (pid {holder.get('pid')} on host {holder.get('host')}, "
           f"since {holder.get('since')})")
    if holder.get("host") != socket.gethostname():
        return (f"{folder} is being written by {who}: wait for it to end, or if it no longer runs delete {path}; "
                f"or write to {fix}")
    return f"{folder} is being written by {who}: wait for it to end or stop it, or write to {fix}"


# ---- images -----------------------------------------------------------------------------------------------------


def to_uint8_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Quantise images to 8 bits as saving them to PNG would.

    Args:
        images: (B, 3, H, W) uint8, or float in [0, 1]; numpy (B, H, W, 3) is accepted too.

    Returns:
        (B, 3, H, W) uint8 tensor.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
        if images.ndim == 4 and images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] != 3:
        raise LatentflowError(f"expected RGB images of shape (B, 3, H, W); got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2):
    """(B, 3, H, W) float images in [0, 1] (or uint8) -> one PIL image with the images on a grid (row-major)."""
    from PIL import Image

    count, _, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    canvas = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), np.uint8)
    pixels = to_uint8_images(images).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    for index, image in enumerate(pixels):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        canvas[top : top + height, left : left + width] = image
    return Image.fromarray(canvas)


def check_png_target(path: str | os.PathLike, option: str = "--out") -> None:
    """Refuse a plot's target that is a folder or names another format (plots are written as PNG), before any
    work, naming the option and the fix."""
    path = Path(path)
    if path.is_dir():
        raise LatentflowError(f"{option} {path} is a folder; give the .png file to write")
    if path.suffix.lower() != ".png":
        raise LatentflowError(f"{option} {path}: plots are written as PNG; end the name in .png")


def image_format(path: str | os.PathLike) -> str:
    """The PIL format an image written to `path` takes from its suffix (png when it has none); a suffix PIL
    cannot write is refused naming the file, so callers can check before any work."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    if not suffix:
        return "PNG"
    formats = Image.registered_extensions()
    if suffix not in formats or formats[suffix] not in Image.SAVE:
        raise LatentflowError(f"{path}: cannot write a {suffix} image; end the name in .png or .jpg")
    return formats[suffix]


def save_image(image, path: str | os.PathLike) -> Path:
    """Save a PIL image atomically (format from the suffix: png, jpg, ...)."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format(path))
    return write_bytes_atomic(Path(path), buffer.getvalue())
