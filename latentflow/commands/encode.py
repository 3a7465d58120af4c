"""`latentflow encode`: encode an image dataset into a latent cache (webdataset shards + manifest.json)."""

from __future__ import annotations

import argparse
import sys

from latentflow.commands import HelpFormatter
from latentflow.data.encoder import EncodeConfig, EncodeResult, encode_dataset
from latentflow.vae import DEFAULT_VAE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The encode options (shared with scripts/encode_latents.py)."""
    parser.add_argument("--vae", default=DEFAULT_VAE,
                        help="hub id (org/name[/subfolder]), diffusers folder, or TAESD-family .pth folder/file")
    parser.add_argument("--data", required=True,
                        help="image folder, webdataset shards (.tar / glob / {000..009}), or hf:NAME, "
                             "hf:imagefolder:DIR, hf:webdataset:GLOB")
    parser.add_argument("--out", required=True, help="cache folder")
    parser.add_argument("--resolution", type=int, default=64, help="square side, a multiple of the VAE factor")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="image decoding workers (default: 1 on CPU, min(8, cpus-1) on GPU)")
    parser.add_argument("--flip", action="store_true", help="also encode the horizontally flipped image")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="VAE compute dtype")
    parser.add_argument("--labels", dest="labels", action="store_true", default=None,
                        help="class labels (folder: first-level subfolders; hf: ClassLabel/--label-column)")
    parser.add_argument("--no-labels", dest="labels", action="store_false", help="store no class labels")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache made differently")
    parser.add_argument("--split", default=None,
                        help="Hugging Face dataset split (default train; hf: sources only)")
    parser.add_argument("--image-column", default=None, help="hf: sources only")
    parser.add_argument("--label-column", default=None, help="hf: sources only")
    parser.add_argument("--min-size", type=int, default=1, help="skip inputs whose shorter side is smaller")
    parser.add_argument("--device", default=None, help="default: the accelerate device, else cuda if present, else cpu")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> EncodeConfig:
    return EncodeConfig(vae=args.vae, data=args.data, out=args.out, resolution=args.resolution,
                        batch_size=args.batch_size, num_workers=args.num_workers, flip=args.flip,
                        shard_size=args.shard_size, dtype=args.dtype, labels=args.labels, overwrite=args.overwrite,
                        split=args.split, image_column=args.image_column, label_column=args.label_column,
                        min_size=args.min_size, device=args.device, progress=args.progress,
                        command=getattr(args, "command_line", sys.argv))


def report(result: EncodeResult) -> int:
    """Print a one-line summary; exit code 1 when the cache holds no sample at all."""
    if result.already_complete:
        print(f"{result.out}: complete, nothing to do ({result.num_samples} samples, {result.num_skipped} skipped)")
    else:
        rate = result.encoded / result.seconds if result.seconds else 0.0
        print(f"{result.out}: encoded {result.encoded}, skipped {result.skipped} this run ({rate:.1f} images/s); "
              f"cache has "
              f"{result.num_samples} samples, {result.num_skipped} skipped (see skipped.jsonl)")
    if result.num_samples == 0:
        print(f"latentflow encode: error: nothing could be encoded; reasons in {result.out}/skipped.jsonl",
              file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    return report(encode_dataset(config_from_args(args)))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("encode", help="encode images into a latent cache", description=__doc__,
                                   formatter_class=HelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)
