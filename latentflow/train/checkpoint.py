"""Training checkpoints: atomic folders with a completeness record, newest-intact lookup.

A checkpoint is the folder `OUT/checkpoints/step-XXXXXXXX/`, holding accelerate's
`save_state` files (model, optimizer, RNG states, grad scaler) plus our own files (EMA
weights as safetensors, the trainer state and the model config as JSON). It is written
under a temporary name and renamed into place only when complete; `checkpoint.json`,
written last, records every file's size, so a truncated or partial checkpoint is caught
before anything is loaded from it.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from latentflow.data.manifest import MANIFEST_FILE
from latentflow.errors import LatentflowError
from latentflow.io import PIPELINE_MARKER, replace_folder, write_text_atomic

RECORD_NAME = "checkpoint.json"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.json"
MODEL_CONFIG_FILE = "model_config.json"
GUIDE_DIR = "guide"
"""RUN/guide: the EMA model at `train.guide_step` (diffusers format), the pipeline's guide after export."""
MODEL_DIR = "model"
"""RUN/model: the finished run's EMA model (diffusers format), what export turns into a pipeline."""
CONFIG_FILE = "config.yaml"
"""RUN/config.yaml: the run's whole config, as resolved when it started."""
CACHE_MANIFEST_FILE = "cache_manifest.json"
"""RUN/cache_manifest.json (and a pipeline's, copied by export): the manifest of the cache the run trains on, written
when it starts."""
_STEP_PATTERN = re.compile(r"^step-(\d+)$")


@dataclass
class CheckpointInfo:
    """A verified checkpoint folder, its optimizer step, and newer ones skipped as broken."""

    path: Path
    step: int
    skipped: tuple[str, ...] = ()


def checkpoint_root(output_dir: str | Path) -> Path:
    """The folder holding a run's checkpoints."""
    return Path(output_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at `step`."""
    return f"step-{step:08d}"


def temporary_dir(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint at `step` is written before it is renamed into place."""
    return checkpoint_root(output_dir) / f".tmp-{checkpoint_name(step)}"


def write_record(folder: Path, step: int) -> None:
    """Write `checkpoint.json` (step and file sizes) into a fully written folder."""
    files = {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != RECORD_NAME
    }
    write_text_atomic(folder / RECORD_NAME, json.dumps({"step": step, "files": files}, indent=1))


def publish(temporary: Path, step: int, keep: int) -> Path:
    """Record, rename the temporary folder into place, and delete all but the newest `keep`."""
    write_record(temporary, step)
    final = temporary.parent / checkpoint_name(step)
    replace_folder(temporary, final)
    for old in sorted(list_checkpoints(temporary.parent), key=lambda p: p.step)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Checkpoint folders under `root` by name (unverified), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_PATTERN.match(p.name)) and p.is_dir()]
    return [CheckpointInfo(path, step) for step, path in sorted(found)]


def verify_checkpoint(path: str | Path) -> CheckpointInfo:
    """Check that a checkpoint folder is complete: record present, every file present at its size.

    Raises:
        LatentflowError: naming the folder and what is missing or truncated.
    """
    path = Path(path)
    record_file = path / RECORD_NAME
    if not path.is_dir():
        raise LatentflowError(f"checkpoint {path} does not exist or is not a folder")
    try:
        record = json.loads(record_file.read_text())
        files, step = dict(record["files"]), int(record["step"])
    except FileNotFoundError:
        raise LatentflowError(
            f"checkpoint {path} is incomplete: {RECORD_NAME} is missing (interrupted save?)") from None
    except (ValueError, KeyError, TypeError) as error:
        raise LatentflowError(f"checkpoint {path} is corrupt: {record_file} unreadable ({error})") from None
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise LatentflowError(f"checkpoint {path} is corrupt: file {name} is missing")
        if file.stat().st_size != size:
            raise LatentflowError(
                f"checkpoint {path} is corrupt: {name} has {file.stat().st_size} bytes, {size} were written"
            )
    return CheckpointInfo(path, step)


def find_checkpoint(output_dir: str | Path, which: str) -> CheckpointInfo:
    """Resolve `--resume`: 'latest' (the newest intact checkpoint of the run) or a folder path.

    Raises:
        LatentflowError: no intact checkpoint, or the named one is incomplete/corrupt.
    """
    if which != "latest":
        return verify_checkpoint(which)
    root = checkpoint_root(output_dir)
    problems = []
    for candidate in reversed(list_checkpoints(root)):
        try:
            info = verify_checkpoint(candidate.path)
            return CheckpointInfo(info.path, info.step, tuple(problems))
        except LatentflowError as error:
            problems.append(str(error))
    detail = ("; skipped: " + "; ".join(problems)) if problems else ""
    raise LatentflowError(f"--resume latest: no intact checkpoint under {root}{detail}")


def check_fresh_output(output_dir: str | Path) -> None:
    """Refuse to start a run at step 0 in `output_dir` where it would overwrite work: a run's checkpoints (resume
    them instead) or finished model, a latent cache or a pipeline folder. Other files (a job's logs, the files of
    a start interrupted before its first checkpoint) are left as they are.

    Raises:
        LatentflowError: naming the folder, what it holds and the fix.
    """
    out = Path(output_dir)
    found = list_checkpoints(checkpoint_root(out))
    if found:
        raise LatentflowError(f"output_dir {out} holds a run's checkpoints (up to {found[-1].path.name}) that a "
                              f"new run would overwrite; add --resume latest to continue it, or choose another "
                              f"output_dir")
    held = held_work(out)
    if held is not None:
        raise LatentflowError(f"output_dir {out} holds {held[1]} ({held[0]}) that a new run would overwrite; choose "
                              f"another output_dir")


def held_work(folder: str | Path) -> tuple[str, str] | None:
    """(the file that shows it, what it is) for the work `folder` holds, a finished run's model, a latent cache or
    a pipeline folder, or None: the one rule for telling a folder of work from a folder to write in."""
    kinds = {f"{MODEL_DIR}/config.json": "a finished run's model", MANIFEST_FILE: "a latent cache",
             PIPELINE_MARKER: "a pipeline folder"}
    for name, what in kinds.items():
        if (Path(folder) / name).is_file():
            return name, what
    return None


def check_holds_no_work(folder: str | Path, what: str) -> None:
    """Refuse to write `what` (e.g. "the evaluation") into a folder of work (`held_work`), where its files would
    mix with the work's and go when the work is written again (an export replaces its pipeline folder)."""
    held = held_work(folder)
    if held is not None:
        raise LatentflowError(f"{folder} holds {held[1]} ({held[0]}); give {what} a folder of its own")


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` looks like a checkpoint folder (it holds EMA weights and the model config)."""
    return (Path(path) / EMA_FILE).is_file() and (Path(path) / MODEL_CONFIG_FILE).is_file()


def load_ema_model(path: str | Path, model_name: str):
    """The EMA model of a checkpoint folder, built as `model_name` (the run's model.name) with the saved settings.

    Raises:
        LatentflowError: a broken checkpoint, or weights that do not fit the settings.
    """
    from safetensors.torch import load_file

    from latentflow.models import make_model

    info = verify_checkpoint(path)
    settings = json.loads((info.path / MODEL_CONFIG_FILE).read_text())
    model = make_model(model_name, **{key: value for key, value in settings.items() if not key.startswith("_")})
    weights = {key[len("model."):]: value for key, value in load_file(info.path / EMA_FILE).items()
               if key.startswith("model.")}
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise LatentflowError(f"{info.path}: EMA weights do not fit model {model_name!r} (missing "
                              f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model.eval()
