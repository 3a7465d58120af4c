"""Image sources for encoding: a folder, Hugging Face datasets, existing webdataset shards of images.

A source is an indexable list of :class:`Record` (a stable key, an optional label, where it came from) plus
``read(record) -> bytes``. Reading happens in DataLoader workers; decoding errors there become skips.
"""

from __future__ import annotations

import glob
import hashlib
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentflow.errors import LatentflowError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm",
                    ".pbm", ".tga")
_LABEL_EXTENSIONS = ("cls", "class", "label", "cls.txt", "label.txt")


def make_key(text: str) -> str:
    """A stable, file-name-safe sample key for `text` (a relative path or an id).

    The readable part keeps ``[A-Za-z0-9_-]`` (path separators become ``__``, anything else ``_``; no dots, which
    webdataset reads as extension separators); a short hash of the exact text keeps keys unique.

    >>> make_key("daisy/1001.jpg")
    'daisy__1001_jpg-...'  # doctest: +SKIP
    """
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", text.replace("\\", "/").replace("/", "__"))[:96]
    return f"{readable}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


@dataclass(frozen=True)
class Record:
    """One input: `key` (unique, safe), `label` (int or None), `origin` (human-readable), `locator` (to read)."""

    key: str
    label: int | None
    origin: str
    locator: Any


@dataclass
class Source:
    """Records plus how to read them.

    Attributes:
        kind: "folder", "webdataset" or "huggingface".
        description: JSON-able settings stored in the manifest.
        records: the inputs, in a stable order.
        label_names: class names by id, or None when unlabelled (or names unknown).
        labelled: whether records carry labels.
    """

    kind: str
    description: dict[str, Any]
    records: list[Record]
    label_names: list[str] | None
    labelled: bool
    _dataset: Any = field(default=None, repr=False)

    def read(self, record: Record) -> bytes:
        """The encoded image bytes of `record`."""
        if self.kind == "folder":
            return Path(record.locator).read_bytes()
        if self.kind == "webdataset":
            shard, offset, size = record.locator
            with open(shard, "rb") as handle:
                handle.seek(offset)
                return handle.read(size)
        item = self._dataset[record.locator][self.description["image_column"]]
        if isinstance(item, dict) and item.get("bytes"):
            return item["bytes"]
        if isinstance(item, dict) and item.get("path"):
            return Path(item["path"]).read_bytes()
        raise ValueError(f"row {record.locator}: image column holds neither bytes nor a path")


# ---- image folder ------------------------------------------------------------------------------------------

def find_image_files(root: Path) -> list[Path]:
    """Every image file under `root` (recursively, by extension), sorted."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def folder_source(root: str | Path, labels: bool | None = None) -> Source:
    """All images under `root` (recursive, sorted); first-level subfolders are classes when labelled.

    Args:
        root: the folder.
        labels: True: class subfolders -> integer labels (sorted names); False: no labels; None: labels when
            every image sits in a first-level subfolder and there are at least two.
    """
    root = Path(root)
    if not root.is_dir():
        raise LatentflowError(f"--data {root}: not a folder")
    files = find_image_files(root)
    if not files:
        raise LatentflowError(f"--data {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found recursively")
    relative = [p.relative_to(root).as_posix() for p in files]
    classes = sorted({r.split("/")[0] for r in relative if "/" in r})
    nested = all("/" in r for r in relative)
    if labels is None:
        labels = nested and len(classes) >= 2
    if labels and not nested:
        loose = next(r for r in relative if "/" not in r)
        raise LatentflowError(f"--labels: {root}/{loose} is not inside a class subfolder; move it or use --no-labels")
    class_ids = {name: index for index, name in enumerate(classes)}
    records = [Record(make_key(rel), class_ids[rel.split("/")[0]] if labels else None, rel, str(path))
               for rel, path in zip(relative, files)]
    description = {"kind": "folder", "path": str(root.resolve()), "labels": bool(labels)}
    return Source("folder", description, records, classes if labels else None, bool(labels))


# ---- webdataset shards of images ---------------------------------------------------------------------------

def _expand_shards(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    brace = re.fullmatch(r"(.*)\{(\d+)\.\.(\d+)\}(.*)", spec)
    if brace:
        head, start, stop, tail = brace.groups()
        width = len(start)
        return [Path(f"{head}{i:0{width}d}{tail}") for i in range(int(start), int(stop) + 1)]
    return sorted(Path(p) for p in glob.glob(spec))


def _split_member(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def webdataset_source(spec: str, labels: bool | None = None) -> Source:
    """Samples of existing webdataset shards holding images (jpg/png/webp/...; `cls` for labels).

    Args:
        spec: a folder of .tar files, a glob, or a brace pattern ``shards-{000..009}.tar``.
        labels: True: require a cls member per sample; False: ignore labels; None: labels if every sample has one.
    """
    shards = _expand_shards(spec)
    if not shards:
        raise LatentflowError(f"--data {spec}: no .tar shards found")
    records, missing_label = [], 0
    for shard in shards:
        for key, (locator, label) in _scan_image_shard(shard).items():
            missing_label += label is None
            records.append(Record(make_key(f"{shard.name}/{key}"), label, f"{shard}:{key}", locator))
    if not records:
        raise LatentflowError(f"--data {spec}: the shards hold no image members ({', '.join(IMAGE_EXTENSIONS)})")
    if labels and missing_label:
        raise LatentflowError(f"--labels: {missing_label} samples in {spec} have no cls member; use --no-labels")
    use_labels = (missing_label == 0) if labels is None else labels
    if not use_labels:
        records = [Record(r.key, None, r.origin, r.locator) for r in records]
    description = {"kind": "webdataset", "path": spec, "shards": [str(s) for s in shards], "labels": use_labels}
    return Source("webdataset", description, records, None, use_labels)


def _scan_image_shard(shard: Path) -> dict[str, tuple[tuple[str, int, int], int | None]]:
    found: dict[str, list] = {}
    try:
        with tarfile.open(shard, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = _split_member(member.name)
                entry = found.setdefault(key, [None, None])
                if f".{extension}" in IMAGE_EXTENSIONS and entry[0] is None:
                    entry[0] = (str(shard), member.offset_data, member.size)
                elif extension in _LABEL_EXTENSIONS:
                    entry[1] = int(archive.extractfile(member).read().decode().strip())
    except (tarfile.TarError, OSError, ValueError) as error:
        raise LatentflowError(f"--data shard {shard}: unreadable ({error})") from error
    return {key: (entry[0], entry[1]) for key, entry in found.items() if entry[0] is not None}


# ---- Hugging Face datasets ---------------------------------------------------------------------------------

def huggingface_source(spec: str, split: str = "train", labels: bool | None = None, image_column: str | None = None,
                       label_column: str | None = None) -> Source:
    """A Hugging Face dataset: ``NAME`` (hub or local script/folder), ``imagefolder:DIR`` or ``webdataset:GLOB``.

    Images are read undecoded (``Image(decode=False)``) so decoding runs in our workers and bad rows are skips.
    """
    import datasets

    builder, _, argument = spec.partition(":")
    try:
        if builder == "imagefolder" and argument:
            dataset = datasets.load_dataset("imagefolder", data_dir=argument, split=split)
        elif builder == "webdataset" and argument:
            dataset = datasets.load_dataset("webdataset", data_files={split: sorted(glob.glob(argument))}, split=split)
        else:
            dataset = datasets.load_dataset(spec, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise LatentflowError(f"--data hf:{spec} (split {split!r}): {error}") from error
    image_column = image_column or _find_column(dataset, datasets.Image, "image")
    if image_column not in dataset.column_names:
        raise LatentflowError(f"--image-column {image_column!r} not in hf:{spec} columns {dataset.column_names}")
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    label_column = _pick_label_column(dataset, label_column, labels, spec)
    label_names = None
    if label_column and isinstance(dataset.features[label_column], datasets.ClassLabel):
        label_names = list(dataset.features[label_column].names)
    label_values = dataset[label_column] if label_column else [None] * len(dataset)
    records = [Record(make_key(f"{split}/{index:09d}"), None if value is None else int(value),
                      f"hf:{spec}[{split}][{index}]", index) for index, value in enumerate(label_values)]
    description = {"kind": "huggingface", "path": spec, "split": split, "image_column": image_column,
                   "label_column": label_column, "labels": label_column is not None}
    return Source("huggingface", description, records, label_names, label_column is not None, _dataset=dataset)


def _find_column(dataset: Any, feature_type: type, fallback: str) -> str:
    for name, feature in dataset.features.items():
        if isinstance(feature, feature_type):
            return name
    return fallback


def _pick_label_column(dataset: Any, label_column: str | None, labels: bool | None, spec: str) -> str | None:
    import datasets

    if labels is False:
        return None
    if label_column is None:
        label_column = _find_column(dataset, datasets.ClassLabel, "label")
        if label_column not in dataset.column_names:  # webdataset shards name it after the member: cls
            label_column = next((c for c in ("labels", "cls", "class") if c in dataset.column_names), label_column)
        if label_column not in dataset.column_names:
            if labels:
                raise LatentflowError(f"--labels: hf:{spec} has no ClassLabel/'label' column; pass --label-column "
                                      f"(columns: {dataset.column_names})")
            return None
    if label_column not in dataset.column_names:
        raise LatentflowError(f"--label-column {label_column!r} not in hf:{spec} columns {dataset.column_names}")
    return label_column


def open_source(data: str, labels: bool | None = None, split: str | None = None, image_column: str | None = None,
                label_column: str | None = None) -> Source:
    """Open `data`: ``hf:...`` for Hugging Face, shards (.tar, glob, brace, folder of .tar), or an image folder.
    `split` (default train), `image_column` and `label_column` choose within a Hugging Face dataset; given for a
    folder or shards, which are encoded whole, they are refused rather than ignored."""
    if data.startswith("hf:"):
        return huggingface_source(data[3:], split or "train", labels, image_column, label_column)
    fixes = {"--split": "leave it out and pass the split's own folder or shards as --data",
             "--image-column": "leave it out", "--label-column": "leave it out (labels: --labels)"}
    for option, value in (("--split", split), ("--image-column", image_column), ("--label-column", label_column)):
        if value is not None:
            raise LatentflowError(f"{option} {value} applies to hf: sources, and --data {data} is encoded whole; "
                                  f"{fixes[option]}")
    path = Path(data)
    if path.is_dir() and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*")) \
            and any(path.glob("*.tar")):
        return webdataset_source(data, labels)
    if path.is_dir():
        return folder_source(path, labels)
    if data.endswith(".tar") or "{" in data or any(ch in data for ch in "*?["):
        return webdataset_source(data, labels)
    raise LatentflowError(f"--data {data}: not a folder, .tar shards, or hf:NAME")
