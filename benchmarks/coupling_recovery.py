"""How much of the dataset-OT coupling trained models have learned, per time t, in one run.

A potential pairs every noise draw x0 with one latent y(x0) of the cache. A model that has learned that pairing
predicts, at t = 0 where it sees only the noise, the velocity y(x0) - x0, so that one Euler step lands on y(x0);
a model that has not can do no better than the mean latent of the class, y_c - x0. For each model and time this
prints, over the same noise draws paired by the potential:

  loss      mean ||v(x_t, t) - (y - x0)||^2 (summed over the latent's dimensions)
  / mean    at t = 0, that loss over the class-mean predictor's (1.0: nothing of the pairing learned)
  rank      where y ranks among its class's latents by distance to the one-step prediction x_t + (1 - t) v
            (0: the paired latent is the nearest; 0.5: no better than a random latent of the class)

Give a model trained on these pairs beside one trained on minibatch pairs (which never saw them): the difference
is what training on the dataset coupling taught. The parameters to memorise (latents x dimensions) against the
model's size are printed too: a model that cannot hold the cache cannot reproduce its pairing at t = 0.

    .venv/bin/python benchmarks/coupling_recovery.py CACHE --potential demo --models RUN_A RUN_B [--labels A B]
"""

from __future__ import annotations

import argparse

import torch

from latentflow.data.cache import LatentCache
from latentflow.data.potential import load_dataset_cells
from latentflow.models import load_model
from latentflow.train.init import model_folder

TIMES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)


def paired_rank(prediction: torch.Tensor, paired: torch.Tensor, candidates: torch.Tensor) -> float:
    """Share of `candidates` (K, D) nearer to `prediction` (D,) than `paired` (D,) is."""
    distances = ((candidates - prediction) ** 2).sum(1)
    return float((distances < ((paired - prediction) ** 2).sum()).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--potential", default="demo", help="the ot-fit potential's --name")
    parser.add_argument("--models", nargs="+", required=True, help="training runs or exported pipelines")
    parser.add_argument("--labels", nargs="+", help="one name per model (default: the folders)")
    parser.add_argument("--draws", type=int, default=640)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    labels = args.labels or args.models
    if len(labels) != len(args.models):
        parser.error("give one --labels entry per --models entry")
    torch.manual_seed(args.seed)
    cache = LatentCache(args.cache)
    cells = load_dataset_cells(cache, args.potential, normalized=True, random_flip=False)
    points = cells.points
    generator = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn(args.draws, *points.shape[1:], generator=generator)
    if cells.group_classes is not None:  # class-aware: classes drawn in turn, noise paired within its class
        classes = torch.tensor(cells.group_classes)[torch.arange(args.draws) % len(cells.group_classes)]
        paired = cells.pair(x0, classes)
    else:  # class-blind: the paired latent's class, as training labels it
        paired = cells.pair(x0, None)
        classes = None if cells.labels is None else cells.labels[paired]
    y = points[paired]
    if classes is None:
        members = [torch.arange(points.shape[0])] * args.draws
        class_mean = points.mean(0).expand_as(y)
    else:
        by_class = {int(c): torch.nonzero(cells.labels == c).flatten() for c in classes.unique()}
        members = [by_class[int(c)] for c in classes]
        class_mean = torch.stack([points[by_class[int(c)]].mean(0) for c in classes])
    mean_loss = float(((class_mean - y) ** 2).flatten(1).sum(1).mean())
    flat = points.flatten(1)
    mean_rank = sum(paired_rank(class_mean[i].flatten(), flat[paired[i]], flat[members[i]])
                    for i in range(args.draws)) / args.draws
    print(f"{cache.path}: {points.shape[0]} latents of {flat.shape[1]} dimensions ({flat.numel() / 1e6:.1f}M "
          f"numbers), potential {args.potential!r} ({'class-aware' if cells.group_classes else 'class-blind'}), "
          f"{args.draws} noise draws; the class-mean predictor at t = 0: loss {mean_loss:.1f}, rank {mean_rank:.3f}")
    for label, path in zip(labels, args.models):
        model = load_model(model_folder(path, "--models")).eval()
        size = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"-- {label} ({path}; {size:.1f}M parameters)")
        for t in TIMES:
            x_t = (1 - t) * x0 + t * y
            with torch.no_grad():
                v = torch.cat([model(x_t[i:i + 128], torch.full((x_t[i:i + 128].shape[0],), t),
                                     None if classes is None else classes[i:i + 128])
                               for i in range(0, args.draws, 128)])
            loss = float(((v - (y - x0)) ** 2).flatten(1).sum(1).mean())
            prediction = (x_t + (1 - t) * v).flatten(1)
            rank = sum(paired_rank(prediction[i], flat[paired[i]], flat[members[i]])
                       for i in range(args.draws)) / args.draws
            ratio = f"{loss / mean_loss:6.3f}" if t == 0 else "     -"
            print(f"  t {t:4.2f}  loss {loss:8.1f}  / mean {ratio}  rank {rank:.3f}")


if __name__ == "__main__":
    main()
