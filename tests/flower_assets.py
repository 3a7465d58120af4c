"""The real assets tests share: the TAEF2 weights and the tf_flowers photos in ../shared, and small caches of them."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).parents[1]
SHARED = REPO.parent / "shared"
TAEF2 = SHARED / "weights" / "taef2"
FLOWERS = SHARED / "data" / "tf_flowers" / "images_128" / "val"


def link_flower_photos(root: Path, per_class: int) -> Path:
    """`root`/CLASS/ with symlinks to the first `per_class` val photos of each of the 5 classes; returns root."""
    for class_dir in sorted(FLOWERS.iterdir()):
        (root / class_dir.name).mkdir(parents=True, exist_ok=True)
        for photo in sorted(class_dir.glob("*.jpg"))[:per_class]:
            os.symlink(photo, root / class_dir.name / photo.name)
    return root


def encode_flower_cache(photos: Path, out: Path, batch_size: int, shard_size: int) -> Path:
    """Encode a photo folder with the real TAEF2 at 64 px (32 x 8 x 8 latents, labelled by folder) into `out`."""
    from latentflow.data.encoder import EncodeConfig, encode_dataset

    encode_dataset(EncodeConfig(vae=str(TAEF2), data=str(photos), out=out, resolution=64, batch_size=batch_size,
                                shard_size=shard_size, num_workers=0, progress=False, command=["test"]))
    return out
