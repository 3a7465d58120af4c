"""The model card of a pipeline folder: `README.md` in the Hugging Face Hub's format (a YAML header, then how the
model was trained, how to load it by both routes, its sample grid and its evaluation beside the floors)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from latentflow.eval.sweep import EVALUATION_FILE
from latentflow.io import write_text_atomic
from latentflow.train.checkpoint import CACHE_MANIFEST_FILE

CARD_NAME = "README.md"
GRID_NAME = "samples.png"
TRAINING_CONFIG_NAME = "training_config.yaml"
"""PIPE/training_config.yaml: the run's config, copied by export; the card quotes it."""


def card_metadata(scheduler_config: dict[str, Any], manifest: dict[str, Any] | None,
                  license_name: str = "other") -> dict[str, Any]:
    """The card's YAML header (Hub model-card fields)."""
    conditional = int(scheduler_config.get("num_classes") or 0) > 0
    tags = ["latentflow", "flow-matching", "latent-flow-matching", "image-generation",
            "class-conditional" if conditional else "unconditional-image-generation"]
    objective = scheduler_config.get("objective")
    if objective:
        tags.append(objective)
    metadata: dict[str, Any] = {"library_name": "diffusers", "license": license_name, "tags": tags,
                                "pipeline_tag": "unconditional-image-generation"}
    source = (manifest or {}).get("source", {})
    if source.get("kind") == "huggingface" and source.get("name"):
        metadata["datasets"] = [source["name"]]
    return metadata


def pairing_text(objective: dict[str, Any]) -> str:
    """How training paired noise with latents, from the run's `objective` config section."""
    from latentflow.flow.objectives import pairs_by_ot

    per_class = " within each class" if objective.get("class_aware") else ""
    if objective.get("coupling") == "stored":
        return "the stored (noise, endpoint) pairs of a couplings cache (`latentflow reflow`)"
    if objective.get("ot_scope") == "dataset":
        return (f"every noise draw with its optimal latent of the whole cache{per_class} (dataset OT through the "
                f"semidiscrete potential `{objective.get('ot_potential')}` of `latentflow ot-fit`)")
    if pairs_by_ot(objective.get("name"), objective.get("flow_map_pairing", "independent")):
        where = "the global batch across processes" if objective.get("ot_scope") == "global" else "each batch"
        return f"minibatch OT: one OT plan for {where}{per_class}"
    return "independent draws"


def _training_lines(scheduler_config: dict[str, Any], manifest: dict[str, Any] | None,
                    training: dict[str, Any] | None) -> list[str]:
    steps = scheduler_config.get("num_inference_steps")
    lines = [f"- objective: `{scheduler_config.get('objective')}` ({scheduler_config.get('prediction_type')} "
             f"prediction); default sampler `{scheduler_config.get('solver')}`, {steps} step{'' if steps == 1 else 's'}"
             + ("" if scheduler_config.get("time_shift", 1.0) == 1 else
                f", shifted towards the noise by {scheduler_config['time_shift']:g} (`time_shift`)")
             + ("" if scheduler_config.get("guidance_scale", 1.0) == 1 else
                f", guidance {scheduler_config['guidance_scale']:g} (`guidance_scale`)")]
    if manifest:
        vae = manifest.get("vae", {})
        lines.append(f"- latents: {manifest.get('num_samples')} images encoded at {manifest.get('resolution')} px "
                     f"into {tuple(manifest.get('latent_shape', ()))} latents by the frozen VAE "
                     f"`{vae.get('source')}` ({vae.get('class')}; base VAE, shipped in `vae/`)")
        source = manifest.get("source", {})
        lines.append(f"- data: {source.get('kind')} `{source.get('path') or source.get('name')}`"
                     + (f", classes {manifest.get('label_names')}" if manifest.get("num_classes") else ""))
    if training:
        model, optim, train = training.get("model", {}), training.get("optim", {}), training.get("train", {})
        lines.append(f"- model: {model.get('name')} {model.get('settings') or ''}; {train.get('max_steps')} steps "
                     f"at batch {training.get('data', {}).get('batch_size')}, AdamW lr {optim.get('lr')}, "
                     f"EMA {train.get('ema_decay')} (the EMA weights are in `transformer/`)")
        lines.append(f"- pairs of noise and latents: {pairing_text(training.get('objective', {}))}")
        if train.get("guide_step"):
            lines.append(f"- guide: the EMA weights at step {train['guide_step']} (`guide/`); with guidance its "
                         f"null-class prediction is the unconditional branch (`use_guide=False`: the model's own)")
    return lines


EVALUATION_SIZE = " generated images per setting against "
"""The words after the sample count in the card's evaluation section (how `card_evaluation_size` finds it)."""


def card_evaluation_size(pipe_dir: str | Path) -> int | None:
    """How many generated images per setting the evaluation in `PIPE_DIR/README.md` used (None: no card, or no
    evaluation in it)."""
    card = Path(pipe_dir) / CARD_NAME
    if not card.is_file():
        return None
    match = re.search(rf"^(\d+){EVALUATION_SIZE}", card.read_text(errors="replace"), re.MULTILINE)
    return int(match.group(1)) if match else None


def _evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    reference = evaluation.get("reference")
    source = f" (statistics of {evaluation['reference_source']})" if evaluation.get("reference_source") else ""
    lines = [f"{evaluation.get('n')}{EVALUATION_SIZE}`{reference}`{source} "
             f"(seed {evaluation.get('seed')}, guidance {evaluation.get('guidance_scale')}"
             + (f" at times {evaluation['guidance_interval']}" if evaluation.get("guidance_interval") else "")
             + (", unconditional branch from `guide/`" if evaluation.get("guide") else "")
             + ").", "",
             "| setting | NFE | FID | KID |", "|---|---|---|---|"]
    for row in [*evaluation.get("results", []), *evaluation.get("floors", [])]:
        kid = "" if row.get("kid") is None else f"{row['kid']:.4f} +- {row.get('kid_std') or 0:.4f}"
        nfe = "" if row.get("nfe") is None else f"{row['nfe']:g}"
        lines.append(f"| {row['setting']} | {nfe} | {row['fid']:.1f} | {kid} |")
    if evaluation.get("floors"):
        lines += ["", "The floor rows use as many training images as there are samples: real photos against the "
                  "reference, and the same photos after a round trip through this pipeline's VAE (what a perfect "
                  "model of the latent cache would score)."]
    return lines


def model_card(pipe_dir: Path, license_name: str = "other", evaluation_file: Path | None = None,
               name: str | None = None) -> str:
    """The card text for the pipeline folder as it is now (its evaluation from `evaluation_file`, by default
    `PIPE_DIR/evaluation/evaluation.json`, when it exists)."""
    scheduler = json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text())
    manifest_file, training_file = pipe_dir / CACHE_MANIFEST_FILE, pipe_dir / TRAINING_CONFIG_NAME
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else None
    training = yaml.safe_load(training_file.read_text()) if training_file.is_file() else None
    name = name or pipe_dir.resolve().name
    parts = ["---", yaml.safe_dump(card_metadata(scheduler, manifest, license_name), sort_keys=False).strip(), "---",
             "", f"# {name}", "", "A latent flow-matching model trained with "
             "latentflow: a velocity field on the latents of a frozen VAE, "
             "sampled by integrating its ODE from noise (t=0) to data (t=1), then decoded by the VAE.", "",
             "## Training", "", *_training_lines(scheduler, manifest, training), "", "## Use", "", "```python",
             "import torch", "from latentflow.pipelines import LatentFlowPipeline",
             f'pipe = LatentFlowPipeline.from_pretrained("{name}")',
             'out = pipe(batch_size=4, num_inference_steps=8, solver="euler", '
             "generator=torch.Generator().manual_seed(0))",
             "# or, without importing latentflow (it must be installed):",
             "from diffusers import DiffusionPipeline",
             f'pipe = DiffusionPipeline.from_pretrained("{name}", custom_pipeline="{name}", trust_remote_code=True)',
             "```", "", f"or `latentflow sample {name} --n 64 --steps 8 --grid grid.png`."]
    if (pipe_dir / GRID_NAME).is_file():
        parts += ["", "## Samples", "", f"![samples]({GRID_NAME})"]
    evaluation_file = Path(evaluation_file or pipe_dir / "evaluation" / EVALUATION_FILE)
    if evaluation_file.is_file():
        parts += ["", "## Evaluation", "", *_evaluation_lines(json.loads(evaluation_file.read_text()))]
    return "\n".join(parts) + "\n"


def write_model_card(pipe_dir: str | Path, license_name: str | None = None, evaluation_file: Path | None = None,
                     name: str | None = None) -> Path:
    """(Re)write `PIPE_DIR/README.md` from what the folder holds (keeping the licence of an existing card unless
    one is given)."""
    pipe_dir = Path(pipe_dir)
    license_name = license_name or _existing_license(pipe_dir) or "other"
    return write_text_atomic(pipe_dir / CARD_NAME, model_card(pipe_dir, license_name, evaluation_file, name))


def _existing_license(pipe_dir: Path) -> str | None:
    card = pipe_dir / CARD_NAME
    if not card.is_file():
        return None
    header = card.read_text().split("---")
    return (yaml.safe_load(header[1]) or {}).get("license") if len(header) > 2 else None
