"""2D lab, few-step generation in one run: one-step meanflow and one-step 2-rectified flow against rectified flow.

For each source (8gaussians, gaussian) -> moons and each seed, the lab trains (same MLP width, batch, Adam 1e-3
with cosine decay to zero):
  rf        rectified flow, `--steps` steps; W2 at NFE 1 and at NFE 100 (its many-step quality)
  meanflow  a flow map from scratch (MeanFlow, the data velocity), `--meanflow-steps` steps, with the paper's
            (t, r) sampler, share of r != t and adaptive weight unless --meanflow-time, --meanflow-share,
            --meanflow-weight-power say otherwise; W2 at NFE 1
  reflow    rf, then rf again from it on 20,000 of its own dopri5 (noise, endpoint) pairs; W2 at NFE 1
  mf-reflow the same rf, then a flow map fine-tuned from it on those pairs (`meanflow-reflow`, the lab's form of
            configs/flowers64_meanflow_reflow.yaml), `--mf-reflow-steps` steps, the meanflow recipe; W2 at NFE 1
W2 is measured against 2,000 held-out moons (`--eval-samples`), beside its floor: as many fresh moons against them.
Goals (issue 13): meanflow NFE-1 W2 <= 1.15x rf's NFE-100 W2 (both flow maps are reported); reflow NFE-1 W2 <= 0.5x
rf's NFE-1 W2.

    .venv/bin/python benchmarks/toy_few_step.py [--seeds 0,1,2] [--steps 5000] [--meanflow-steps 10000]
        [--meanflow-time uniform --meanflow-share 0.75 --meanflow-weight-power 0]   (the lab's best recipe)
        [--mf-reflow-steps 10000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from latentflow.toy.lab import LabSettings, run_lab

SOURCES = ("8gaussians", "gaussian")


def w2(settings: LabSettings, out: Path) -> dict[str, float]:
    result, _, _ = run_lab(settings, out)
    return ({key: round(value, 4) for key, value in result.w2.items()}
            | {"seconds": round(result.training_seconds, 1), "floor": result.w2_floor})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--meanflow-steps", type=int, default=10000)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--meanflow-time", default=None, help="uniform or logit_normal (default: the paper's)")
    parser.add_argument("--meanflow-share", type=float, default=0.25, help="share of (t, r) pairs with r != t")
    parser.add_argument("--meanflow-weight-power", type=float, default=1.0, help="adaptive weight power (0: MSE)")
    parser.add_argument("--mf-reflow-steps", type=int, default=10000, help="meanflow-reflow's fine-tune steps")
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--sources", default=",".join(SOURCES))
    args = parser.parse_args()
    sources = args.sources.split(",")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    ratios: dict[str, list[float]] = {f"{source} {goal}": [] for source in sources
                                      for goal in ("mf", "reflow", "mf-reflow")}
    with tempfile.TemporaryDirectory() as scratch:
        for source in sources:
            for seed in seeds:
                base = LabSettings(source=source, target="moons", steps=args.steps, seed=seed, nfe=(1, 100),
                                   width=args.width, lr_schedule="cosine", workers=0,
                                   eval_samples=args.eval_samples)
                rf = w2(LabSettings(**{**base.__dict__, "objective": "rf"}), Path(scratch) / "rf")
                recipe = {"time_sampler": args.meanflow_time, "flow_map_share": args.meanflow_share,
                          "flow_map_weight_power": args.meanflow_weight_power}
                meanflow = w2(LabSettings(**{**base.__dict__, "objective": "meanflow",
                                             "steps": args.meanflow_steps, **recipe}), Path(scratch) / "mf")
                reflow = w2(LabSettings(**{**base.__dict__, "objective": "reflow"}), Path(scratch) / "reflow")
                mf_reflow = w2(LabSettings(**{**base.__dict__, "objective": "meanflow-reflow",
                                              "finetune_steps": args.mf_reflow_steps, **recipe}),
                               Path(scratch) / "mf_reflow")
                ratios[f"{source} mf"].append(meanflow["1"] / rf["100"])
                ratios[f"{source} reflow"].append(reflow["1"] / rf["1"])
                ratios[f"{source} mf-reflow"].append(mf_reflow["1"] / rf["100"])
                print(f"{source} -> moons, seed {seed}: rf W2 {rf['1']:.3f} @1, {rf['100']:.3f} @100 ({rf['seconds']} "
                      f"s) | meanflow W2 {meanflow['1']:.3f} @1, {meanflow['100']:.3f} @100 ({meanflow['seconds']} s) "
                      f"| reflow W2 {reflow['1']:.3f} @1 ({reflow['seconds']} s) | meanflow-reflow W2 "
                      f"{mf_reflow['1']:.3f} @1, {mf_reflow['100']:.3f} @100 ({mf_reflow['seconds']} s) "
                      f"| floor {rf['floor']:.3f}", flush=True)
    print(f"\nwidth {args.width}, rf and reflow {args.steps} steps (reflow: twice), meanflow {args.meanflow_steps} "
          f"(times {args.meanflow_time or 'the paper'}, share {args.meanflow_share}, weight power "
          f"{args.meanflow_weight_power}), meanflow-reflow {args.steps} + {args.mf_reflow_steps} on the reflow pairs "
          f"(same recipe), seeds {seeds}, W2 on {args.eval_samples} held-out points")
    for source in sources:
        mf, re, mfre = ratios[f"{source} mf"], ratios[f"{source} reflow"], ratios[f"{source} mf-reflow"]
        print(f"{source} -> moons: meanflow W2@1 / rf W2@100 = {statistics.mean(mf):.2f} (goal <= 1.15: "
              f"{'met' if statistics.mean(mf) <= 1.15 else 'not met'}); reflow W2@1 / rf W2@1 = "
              f"{statistics.mean(re):.2f} (goal <= 0.5: {'met' if statistics.mean(re) <= 0.5 else 'not met'}); "
              f"meanflow-reflow W2@1 / rf W2@100 = {statistics.mean(mfre):.2f} (goal <= 1.15: "
              f"{'met' if statistics.mean(mfre) <= 1.15 else 'not met'})")


if __name__ == "__main__":
    main()
