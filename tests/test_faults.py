"""Issue 15's faults end to end on real parts (TAEF2, flower photos, the CLI): a second writer into a cache or run
folder while the first runs is refused naming it, a SIGKILLed writer's lock is taken over, and a disk that fills up
during encode, checkpointing or export (a real small tmpfs) gives one line, leaves nothing half-written, and the
same command completes exactly once after space is freed."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flower_assets import TAEF2, link_flower_photos
from small_disk import fill_leaving, mounted_tmpfs, tree_files
from test_training import FLOWERS_CONFIG, PER_CLASS, TINY, cache, fresh_accelerator_state  # noqa: F401  (fixtures)

from latentflow import cli
from latentflow.data.cache import LatentCache, decode_raw
from latentflow.data.writer import read_indexes
from latentflow.errors import LatentflowError
from latentflow.io import LOCK_NAME, read_lock, tree_size
from latentflow.reflow import ReflowConfig, make_couplings
from latentflow.train.checkpoint import list_checkpoints, verify_checkpoint
from latentflow.train.logs import CsvLog

REPO = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
HOLDER = """
import sys, time
from pathlib import Path
from latentflow.io import acquire_lock
acquire_lock(Path(sys.argv[1]), sys.argv[2])
print("held", flush=True)
time.sleep(600)
"""


def start_holder(folder: Path, owner: str) -> subprocess.Popen:
    """A real process that takes the lock of `folder` as `owner` and keeps it until killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), owner], stdout=subprocess.PIPE,
                               text=True, env=ENV)
    assert process.stdout.readline().strip() == "held"
    return process


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def refusal(owner: str, pid: int, fix: str) -> str:
    """The start and end of the one-line refusal naming a live holder on this host."""
    return (rf"is being written by {owner} \(pid {pid} on host {socket.gethostname()}, since "
            rf"{time.strftime('%Y-%m-%d')} [^\n]*\): wait for it to end or stop it, or write to {fix}\n")


def encode_args(photos: Path, out: Path, batch_size: int = 20, shard_size: int = 10) -> list[str]:
    return ["encode", "--vae", str(TAEF2), "--data", str(photos), "--out", str(out), "--resolution", "64",
            "--batch-size", str(batch_size), "--shard-size", str(shard_size), "--num-workers", "0", "--no-progress"]


def samples(out: Path) -> dict[str, torch.Tensor]:
    """key -> stored latent mean (C, h, w) of every sample of a cache; asserts each key is stored once."""
    cache_ = LatentCache(out)
    decoded = [decode_raw(raw) for shard in cache_.shards for raw in cache_.read_shard(shard)]
    keys = [sample.key for sample in decoded]
    assert len(keys) == len(set(keys)), "a key is stored twice"
    return {sample.key: sample.mean.float() for sample in decoded}


def train_args(cache_dir: Path, out: Path, *overrides: str) -> list[str]:
    args = ["train", "--config", str(FLOWERS_CONFIG)]
    for override in [*TINY, f"data.cache={cache_dir}", f"output_dir={out}", "train.max_steps=4",
                     "checkpoint.every=2", "checkpoint.keep=1", "optim.warmup_steps=0", "optim.schedule=constant",
                     *overrides]:
        args += ["--set", override]
    return args


def losses(run: Path) -> list[str]:
    return [row["loss"] for row in CsvLog.read(run / "log.csv")]


def leftovers(folder: Path) -> list[str]:
    """Temporaries and staging folders under `folder` (what a failed write must not leave)."""
    return [name for name in tree_files(folder) if ".tmp" in name or name.endswith(".old") or LOCK_NAME in name]


@pytest.fixture(scope="module")
def reference_run(cache: Path, tmp_path_factory) -> Path:  # noqa: F811
    """4 steps of the tiny DiT on the flower cache, checkpoints at 2 and 4, on a disk with room."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(train_args(cache, out)) == 0
    return out


# ---- one writer per folder ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_encode_is_refused_while_the_first_runs_and_takes_over_once_it_is_killed(tmp_path, capsys):
    photos, out = link_flower_photos(tmp_path / "photos", 21), tmp_path / "cache"
    args = encode_args(photos, out, batch_size=2, shard_size=4)
    first = subprocess.Popen([sys.executable, "-m", "latentflow.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 300
    while not list((out / "index").glob("shard-*.json")) and time.monotonic() < deadline:
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    try:
        assert cli.main(args) == 2
        assert first.poll() is None, "the first encode ended before the second one tried: make it longer"
    finally:
        kill(first)
    assert capsys.readouterr().err.count("\n") == 1
    assert read_lock(out / LOCK_NAME)["pid"] == first.pid  # the killed run's lock stays behind
    done = {key for index in read_indexes(out) for key in index.keys}
    assert cli.main(args) == 0  # takes the dead run's lock over and resumes
    assert f"encoded {105 - len(done)}," in capsys.readouterr().out
    assert len(samples(out)) == 105 and not (out / LOCK_NAME).exists()


def test_the_refusal_names_the_running_encode(tmp_path, capsys):
    out = tmp_path / "cache"
    holder = start_holder(out, "latentflow encode")
    try:
        assert cli.main(encode_args(tmp_path / "photos", out)) == 2  # refused before the data or VAE is read
    finally:
        kill(holder)
    err = capsys.readouterr().err
    assert err.startswith(f"latentflow encode: error: {out} ") and err.count("\n") == 1
    assert re.search(refusal("latentflow encode", holder.pid, "another --out"), err)


def test_a_second_trainer_is_refused_before_any_work_and_takes_over_once_it_is_killed(cache, tmp_path,  # noqa: F811
                                                                                      capsys):
    out = tmp_path / "run"
    holder = start_holder(out, "latentflow train")
    try:
        assert cli.main(train_args(cache, out, "train.max_steps=2", "checkpoint.every=0")) == 2
    finally:
        kill(holder)
    err = capsys.readouterr().err
    assert re.search(refusal("latentflow train", holder.pid, "another output_dir"), err) and err.count("\n") == 1
    assert tree_files(out) == [LOCK_NAME]  # nothing written but the other process's lock
    assert cli.main(train_args(cache, out, "train.max_steps=2", "checkpoint.every=0")) == 0
    assert len(losses(out)) == 2 and (out / "model" / "config.json").is_file() and not (out / LOCK_NAME).exists()


def test_reflow_into_a_folder_being_written_is_refused_before_the_teacher_loads(tmp_path):
    out = tmp_path / "couplings"
    holder = start_holder(out, "latentflow reflow")
    try:
        with pytest.raises(LatentflowError, match=f"pid {holder.pid} on host"):
            make_couplings(ReflowConfig(teacher=tmp_path / "no-teacher", n=4, out=out, progress=False))
    finally:
        kill(holder)


# ---- a disk that fills up -----------------------------------------------------------------------------------------


def test_encode_on_a_full_disk_then_the_same_command_stores_every_key_once(cache, tmp_path, capsys):  # noqa: F811
    photos = link_flower_photos(tmp_path / "photos", PER_CLASS)  # the photos of `cache`
    reference = samples(cache)
    with mounted_tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "cache"
        ballast = fill_leaving(disk, tree_size(cache) // 2)
        assert cli.main(encode_args(photos, out)) == 2
        err = capsys.readouterr().err
        assert err.startswith("latentflow encode: error: disk full: writing ") and err.count("\n") == 1
        assert f"into {out} failed and was removed" in err and "run the same command again" in err
        assert not leftovers(out)
        done = {key for index in read_indexes(out) for key in index.keys}
        assert 0 < len(done) < len(reference)
        ballast.unlink()
        assert cli.main(encode_args(photos, out)) == 0
        assert f"encoded {len(reference) - len(done)}," in capsys.readouterr().out
        stored = samples(out)
        assert sorted(stored) == sorted(reference)
        for key, mean in stored.items():
            torch.testing.assert_close(mean, reference[key], atol=2e-3, rtol=2e-3)
        assert json.loads((out / "manifest.json").read_text())["num_samples"] == len(reference)
        assert not leftovers(out)


def test_a_checkpoint_on_a_full_disk_then_resume_gives_the_uninterrupted_losses(cache, reference_run,  # noqa: F811
                                                                                tmp_path, capsys):
    size = tree_size(reference_run / "checkpoints" / "step-00000004")
    with mounted_tmpfs(tmp_path / "disk", "16m") as disk:
        out = disk / "run"
        ballast = fill_leaving(disk, size * 3 // 2 + (64 << 10))  # room for one checkpoint, not for two
        assert cli.main(train_args(cache, out)) == 2
        err = capsys.readouterr().err
        assert err.startswith("latentflow train: error: disk full: writing checkpoint step-00000004 (")
        assert f"written so far) into {out / 'checkpoints'} failed and was removed" in err and err.count("\n") == 1
        assert [c.step for c in list_checkpoints(out / "checkpoints")] == [2]
        verify_checkpoint(out / "checkpoints" / "step-00000002")
        assert not leftovers(out) and not (out / "model").exists()
        ballast.unlink()
        assert cli.main(train_args(cache, out) + ["--resume", "latest"]) == 0
        assert losses(out) == losses(reference_run)
        assert [c.step for c in list_checkpoints(out / "checkpoints")] == [4] and (out / "model").is_dir()
        assert not leftovers(out)


def test_export_on_a_full_disk_then_the_same_command_writes_the_pipeline(reference_run, tmp_path, capsys):
    from latentflow.export import load_pipeline
    from latentflow.models import load_model

    with mounted_tmpfs(tmp_path / "disk", "16m") as disk:
        ballast = fill_leaving(disk, 1 << 20)  # the pipeline (TAEF2 alone is 5 MiB) does not fit
        args = ["export", str(reference_run), "--out", str(disk / "pipe"), "--grid-images", "0"]
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("latentflow export: error: disk full: writing pipe (") and err.count("\n") == 1
        assert f"written so far) into {disk} failed and was removed" in err
        assert tree_files(disk) == ["ballast"]
        ballast.unlink()
        assert cli.main(args) == 0
        pipe = load_pipeline(disk / "pipe", progress=False)
        trained = load_model(reference_run / "model").state_dict()
        assert all(torch.equal(value, trained[name]) for name, value in pipe.transformer.state_dict().items())
        assert not leftovers(disk)
