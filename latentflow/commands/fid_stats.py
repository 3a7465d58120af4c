"""`latentflow fid-stats`: reference feature statistics of an image folder, for FID/KID (and FD-DINOv2)."""

from __future__ import annotations

import argparse
from pathlib import Path

from latentflow.commands import HelpFormatter


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fid-stats", help="Inception (and DINOv2) feature statistics of an image folder -> .npz",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("images_dir", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="output .npz")
    parser.add_argument("--resolution", type=int, default=None,
                        help="resize + centre-crop to this square size first, as `latentflow encode` does "
                             "(use the generated images' size, e.g. 64)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per feature batch")
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--dinov2", type=Path, default=None, help="local transformers Dinov2Model folder (FD-DINOv2)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from latentflow.errors import LatentflowError
    from latentflow.eval.features import make_extractors
    from latentflow.eval.references import write_folder_statistics
    from latentflow.processes import local_device

    if Path(args.out).is_dir():  # found after every feature was computed
        raise LatentflowError(f"--out {args.out} is a folder; give the statistics file to write, e.g. ref.npz")
    extractors = make_extractors(local_device(args.device), args.dinov2)
    stats = write_folder_statistics(args.images_dir, args.out, extractors, args.batch_size,
                                    lambda it: tqdm(it, desc="features"), args.resolution)
    counts = ", ".join(f"{name}: {stat.num_images} images, {stat.mu.shape[0]}-d" for name, stat in stats.items())
    print(f"wrote {args.out} ({counts})")
    return 0
