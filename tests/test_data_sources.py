"""latentflow.data.sources: image folders, webdataset shards of images, Hugging Face datasets; safe keys."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from latentflow.data.sources import folder_source, make_key, open_source
from latentflow.errors import LatentflowError


def png(color=(1, 2, 3), size=(4, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root: Path, layout: dict[str, bytes]) -> Path:
    for relative, data in layout.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_keys_are_safe_stable_and_unique():
    texts = ["a/b.jpg", "a__b.jpg", "a/b.png", "../../etc/passwd", "x y.z.jpg", "ünï/cødé.jpg"]
    keys = [make_key(t) for t in texts]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert "/" not in key and "." not in key and ".." not in key and key.isascii()
    assert make_key("a/b.jpg") == make_key("a/b.jpg")


def test_folder_labels_from_first_level_subfolders(tmp_path):
    root = make_folder(tmp_path / "data", {"cats/x.png": png(), "cats/deep/y.jpg": png(), "dogs/z.PNG": png(),
                                           "dogs/notes.txt": b"ignored"})
    source = folder_source(root)
    assert source.labelled and source.label_names == ["cats", "dogs"]
    assert [(r.origin, r.label) for r in source.records] == [("cats/deep/y.jpg", 0), ("cats/x.png", 0),
                                                             ("dogs/z.PNG", 1)]
    unlabelled = folder_source(root, labels=False)
    assert not unlabelled.labelled and all(r.label is None for r in unlabelled.records)
    assert source.read(source.records[1]) == png()


def test_folder_labels_need_subfolders(tmp_path):
    root = make_folder(tmp_path / "flat", {"a.png": png(), "b.png": png()})
    assert not folder_source(root).labelled  # auto: no class subfolders, no labels
    with pytest.raises(LatentflowError, match="not inside a class subfolder"):
        folder_source(root, labels=True)
    with pytest.raises(LatentflowError, match="no image files"):
        folder_source(make_folder(tmp_path / "none", {"x.txt": b""}))


def write_image_shard(path: Path, samples: dict[str, tuple[bytes, int | None]]) -> None:
    with tarfile.open(path, "w") as archive:
        for key, (data, label) in samples.items():
            members = {f"{key}.png": data, **({f"{key}.cls": str(label).encode()} if label is not None else {})}
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))


def test_webdataset_shards_of_images(tmp_path):
    (tmp_path / "wds").mkdir()
    write_image_shard(tmp_path / "wds" / "train-000.tar", {"s0": (png((9, 9, 9)), 2), "dir/s1": (png(), 0)})
    write_image_shard(tmp_path / "wds" / "train-001.tar", {"s2": (png(), 1)})
    for spec in (str(tmp_path / "wds"), str(tmp_path / "wds" / "train-{000..001}.tar"),
                 str(tmp_path / "wds" / "*.tar")):
        source = open_source(spec)
        assert source.kind == "webdataset" and source.labelled
        assert [r.label for r in source.records] == [2, 0, 1]
    assert source.read(source.records[0]) == png((9, 9, 9))
    assert len({r.key for r in source.records}) == 3


def test_huggingface_imagefolder_builder(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    root = make_folder(tmp_path / "imgs", {"train/a/1.png": png((1, 1, 1)), "train/a/2.png": png(),
                                           "train/b/3.png": png((3, 3, 3))})
    source = open_source(f"hf:imagefolder:{root}", split="train")
    assert source.kind == "huggingface" and source.label_names == ["a", "b"]
    assert sorted(r.label for r in source.records) == [0, 0, 1]
    assert all(Image.open(io.BytesIO(source.read(r))).size == (4, 4) for r in source.records)
    unlabelled = open_source(f"hf:imagefolder:{root}", split="train", labels=False)
    assert not unlabelled.labelled and all(r.label is None for r in unlabelled.records)


def test_huggingface_webdataset_builder(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "wds").mkdir()
    write_image_shard(tmp_path / "wds" / "part-000.tar", {f"s{i}": (png((i, i, i)), i % 2) for i in range(3)})
    source = open_source(f"hf:webdataset:{tmp_path}/wds/*.tar")
    assert source.description["image_column"] == "png" and source.description["label_column"] == "cls"
    assert [r.label for r in source.records] == [0, 1, 0]
    assert Image.open(io.BytesIO(source.read(source.records[2]))).getpixel((0, 0)) == (2, 2, 2)


def test_unknown_data_is_a_clear_error(tmp_path):
    with pytest.raises(LatentflowError, match="not a folder"):
        open_source(str(tmp_path / "nothing"))
    with pytest.raises(LatentflowError, match="no .tar shards"):
        open_source(str(tmp_path / "none-*.tar"))


def test_hugging_face_options_for_a_folder_or_shards_are_refused_not_ignored(tmp_path):
    root = make_folder(tmp_path / "imgs", {"train/a/1.png": png(), "val/a/2.png": png()})
    (tmp_path / "wds").mkdir()
    write_image_shard(tmp_path / "wds" / "part-000.tar", {"s0": (png(), 0)})
    for data in (str(root), f"{tmp_path}/wds/*.tar"):
        with pytest.raises(LatentflowError, match=r"^--split val applies to hf: sources.*split's own folder"):
            open_source(data, split="val")
        with pytest.raises(LatentflowError, match=r"^--image-column img applies to hf: sources"):
            open_source(data, image_column="img")
        with pytest.raises(LatentflowError, match=r"^--label-column y applies to hf: sources"):
            open_source(data, label_column="y")
    assert len(open_source(str(root)).records) == 2  # without them the whole folder, both splits
