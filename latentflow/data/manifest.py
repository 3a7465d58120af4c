"""The cache manifest (``OUT/manifest.json``): building it from shard indexes, validating it on read.

The manifest exists only once a cache is complete. ``index/settings.json`` (written when a run starts) records
what a cache is made of, so a resumed run can refuse a different VAE, resolution or source.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from latentflow.data.writer import INDEX_DIR, ShardIndex
from latentflow.errors import LatentflowError
from latentflow.io import write_json_atomic, write_text_atomic
from latentflow.vae import identity_differences

FORMAT = "latentflow-latent-cache"
MANIFEST_FILE = "manifest.json"
"""OUT/manifest.json: present only once a cache (encoded latents or stored couplings) is complete."""
FORMAT_VERSION = 1
SETTINGS_FILE = "settings.json"
# settings that must match to resume or extend a cache (anything else, e.g. batch size, may change)
COMPATIBILITY_FIELDS = ("vae", "resolution", "flip", "preprocessing", "storage_dtype", "compute_dtype", "source")


def _differences(existing: dict[str, Any], settings: dict[str, Any], field: str) -> tuple[Any, Any] | None:
    """(what the cache has, what this run has) when `field` differs, else None."""
    if field == "vae":
        differing = identity_differences(existing["vae"], settings["vae"])
        if not differing:
            return None
        return ({key: want for key, (want, _) in differing.items()}, {key: have for key, (_,
                                                                                          have) in differing.items()})
    return None if existing.get(field) == settings.get(field) else (existing.get(field), settings.get(field))


SKIPPED_FILE = "skipped.jsonl"
"""OUT/skipped.jsonl: one JSON line per input left out (unreadable, too small), with the reason."""
CACHE_ENTRIES = (MANIFEST_FILE, SKIPPED_FILE, INDEX_DIR, "ot")
"""What a cache folder holds besides its `shard-*.tar` files and hidden temporaries and lock (`ot/`: potentials)."""


def check_cache_folder(out: Path) -> None:
    """Refuse an `out` that holds files no cache writer puts there (a pipeline, a training run, someone's notes):
    writing a cache into it would mix the two.

    Raises:
        LatentflowError: naming the folder and a few of the files.
    """
    if not out.is_dir():
        return
    foreign = sorted(path.name for path in out.iterdir() if path.name not in CACHE_ENTRIES
                     and not path.name.startswith((".", "shard-")))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise LatentflowError(f"--out {out} holds files that are not a latent cache ({shown}); use a new or empty "
                              "folder")


def check_compatible(out: Path, settings: dict[str, Any]) -> bool:
    """Whether `out` already holds a cache; raise if it was made with other settings.

    Returns:
        True when `out` has a cache with the same settings, False when it has none.
    """
    path = out / INDEX_DIR / SETTINGS_FILE
    if not path.exists():
        if (out / MANIFEST_FILE).exists() or any(out.glob("shard-*.tar")):
            raise LatentflowError(f"{out} holds shards or a manifest but no {INDEX_DIR}/{SETTINGS_FILE}; "
                                  "use another --out or --overwrite")
        return False
    existing = json.loads(path.read_text())
    for field in COMPATIBILITY_FIELDS:
        differing = _differences(existing, settings, field)
        if differing:
            raise LatentflowError(
                f"{out} was encoded with {field}={json.dumps(differing[0])}, this run has "
                f"{field}={json.dumps(differing[1])}; use another --out, or --overwrite to replace it")
    return True


def write_settings(out: Path, settings: dict[str, Any]) -> None:
    write_json_atomic(out / INDEX_DIR / SETTINGS_FILE, settings)


def _channel_statistics(indexes: list[ShardIndex]) -> dict[str, list[float]]:
    positions = sum(index.positions for index in indexes)
    channels = max((len(index.channel_sum) for index in indexes), default=0)
    total = [sum(index.channel_sum[c] for index in indexes if index.channel_sum) for c in range(channels)]
    total_sq = [sum(index.channel_sumsq[c] for index in indexes if index.channel_sumsq) for c in range(channels)]
    total_var = [sum(index.channel_var_sum[c] for index in indexes if index.channel_var_sum) for c in range(channels)]
    if positions == 0:
        return {"channel_mean": [], "channel_std": [], "channel_std_of_mean": []}
    mean = [s / positions for s in total]
    variance_of_mean = [max(q / positions - m * m, 0.0) for q, m in zip(total_sq, mean)]
    return {"channel_mean": mean,
            "channel_std": [math.sqrt(v + s / positions) for v, s in zip(variance_of_mean, total_var)],
            "channel_std_of_mean": [math.sqrt(v) for v in variance_of_mean]}


def build_manifest(settings: dict[str, Any], indexes: list[ShardIndex], label_names: list[str] | None,
                   command: str) -> dict[str, Any]:
    """The manifest of a complete cache made of `indexes` (see docs in the README for each field)."""
    vae = settings["vae"]
    factor, resolution = vae["downsampling_factor"], settings["resolution"]
    num_classes = len(label_names) if label_names else max((index.max_label for index in indexes), default=-1) + 1
    latent_shape = [vae["latent_channels"], resolution // factor, resolution // factor]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vae": vae,
        "scaling_factor": vae["scaling_factor"],
        "shift_factor": vae["shift_factor"],
        "latent_channels": vae["latent_channels"],
        "latent_shape": latent_shape,
        "resolution": resolution,
        "dtype": settings["storage_dtype"],
        "compute_dtype": settings["compute_dtype"],
        "stochastic": bool(vae["stochastic"]),
        "flip": settings["flip"],
        "preprocessing": settings["preprocessing"],
        "source": settings["source"],
        "num_samples": sum(index.count for index in indexes),
        "num_skipped": sum(len(index.skipped) for index in indexes),
        "shards": [{"name": index.name, "count": index.count, "bytes": index.bytes} for index in indexes],
        "labelled": bool(settings["source"].get("labels")),
        "num_classes": num_classes if settings["source"].get("labels") else 0,
        "label_names": label_names if settings["source"].get("labels") else None,
        **_channel_statistics(indexes),
        "members": _members(settings, vae),
        "command": command,
    }


def _members(settings: dict[str, Any], vae: dict[str, Any]) -> list[str]:
    members = ["mean.npy"] + (["std.npy"] if vae["stochastic"] else [])
    if settings["flip"]:
        members += ["flip.mean.npy"] + (["flip.std.npy"] if vae["stochastic"] else [])
    return members + (["cls"] if settings["source"].get("labels") else []) + ["json"]


_REQUIRED = {"format": str, "format_version": int, "vae": dict, "scaling_factor": (int, float),
             "shift_factor": (int, float), "latent_shape": list, "resolution": int, "dtype": str, "stochastic": bool,
             "flip": bool, "num_samples": int, "shards": list, "num_classes": int, "channel_mean": list,
             "channel_std": list}


def validate_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """Check a manifest read from `path`; raise LatentflowError naming the field at fault."""
    if not isinstance(manifest, dict):
        raise LatentflowError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise LatentflowError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r} "
                              "(is this a latentflow latent cache?)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LatentflowError(f"{path}: format_version {manifest.get('format_version')!r} is not supported "
                              f"(this latentflow reads version {FORMAT_VERSION}); re-encode the cache")
    for field, kind in _REQUIRED.items():
        if field not in manifest:
            raise LatentflowError(f"{path}: missing field {field!r}")
        if not isinstance(manifest[field], kind) or (kind is int and isinstance(manifest[field], bool)):
            raise LatentflowError(f"{path}: field {field!r} is {manifest[field]!r}, expected {kind}")
    shape = manifest["latent_shape"]
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise LatentflowError(f"{path}: latent_shape {shape!r} must be three positive ints [C, h, w]")
    for field in ("channel_mean", "channel_std"):
        if manifest["num_samples"] and len(manifest[field]) != shape[0]:
            raise LatentflowError(f"{path}: {field} has {len(manifest[field])} values for {shape[0]} channels")
    for shard in manifest["shards"]:
        if not isinstance(shard, dict) or not {"name", "count"} <= shard.keys() or "/" in str(shard["name"]):
            raise LatentflowError(f"{path}: bad shard entry {shard!r} (need name without '/' and count)")
    if sum(shard["count"] for shard in manifest["shards"]) != manifest["num_samples"]:
        raise LatentflowError(f"{path}: shard counts sum to {sum(s['count'] for s in manifest['shards'])}, "
                              f"num_samples is {manifest['num_samples']}")
    return manifest


def write_skipped(out: Path, indexes: list[ShardIndex]) -> int:
    """Write ``skipped.jsonl`` (sorted by key) from the indexes; returns the count."""
    entries = sorted((entry for index in indexes for entry in index.skipped), key=lambda entry: entry["key"])
    write_text_atomic(out / SKIPPED_FILE, "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries))
    return len(entries)
