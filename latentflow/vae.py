"""Frozen VAEs: load, encode images to model-space latents, decode them back.

Two kinds of weights load here:

* any diffusers autoencoder (``AutoencoderKL``, ``AutoencoderTiny``, ...) by hub id or local folder, through
  ``from_pretrained`` (a hub id may name a subfolder: ``org/name/vae``; a local pipeline folder with a ``vae/``
  subfolder is used as such);
* the tiny-autoencoder family in its original release format (TAESD, TAESDXL, TAESD3, TAEF1, TAEF2): a folder
  (or either file) holding ``<name>_encoder.pth`` and ``<name>_decoder.pth``, state dicts of plain
  ``nn.Sequential`` stacks. They load into diffusers' ``AutoencoderTiny``; TAEF2's extra "pool" branch is
  carried by :class:`PooledAutoencoderTiny`, a registered subclass, so ``save_pretrained`` / ``from_pretrained``
  round-trip it and a pipeline can hold it.

Model space. ``FrozenVAE.encode`` returns the posterior in the space a generative model trains in:
``(z - shift_factor) * scaling_factor`` with both factors read from the VAE config (missing means 1 and 0).
``decode`` inverts that. For the tiny autoencoders diffusers' ``AutoencoderTiny`` config gives
``scaling_factor=1.0, shift_factor=0.0``: TAESD-family encoders are distilled to output latents already in
their big VAE's *scaled* space, so nothing more is applied. ``latent_magnitude`` / ``latent_shift`` in that
config are not a model-space scaling: diffusers only uses them to squeeze latents into [0, 1] for 8-bit
storage (``scale_latents``), and ``AutoencoderTiny.encode/decode`` never apply them, so neither do we.
TAEF2 keeps the same 1.0 / 0.0: FLUX.2 normalises its latents with a per-channel BatchNorm after a 2x2
patchify, which no scalar pair can express, and TAEF2's raw 32-channel latents are already near unit scale
(on tf_flowers: mean ~0.03, std ~0.86). Per-channel statistics live in each cache manifest for optional
normalisation at training time.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderTiny, ModelMixin  # noqa: F401  (diffusers finds a component's loader via ModelMixin here)
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from torch import nn

from latentflow.errors import LatentflowError, first_line

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
_TAE_FAMILIES = ("taesd", "taesdxl", "taesd3", "taef1", "taef2")


@dataclass
class EncodedLatents:
    """A posterior in model space.

    Attributes:
        mean: (B, C, h, w) posterior mean, ``(z - shift_factor) * scaling_factor``.
        std: (B, C, h, w) posterior standard deviation in the same space, or None for a deterministic
            autoencoder (std 0).
    """

    mean: torch.Tensor
    std: torch.Tensor | None


class PooledTinyBlock(AutoencoderTinyBlock):
    """An ``AutoencoderTinyBlock`` with TAEF2's pool branch: the block sees ``x + pool(x)``.

    ``pool`` is a per-position bottleneck (1x1 conv C->4C no bias, GroupNorm(groups, 4C), ReLU, 1x1 conv 4C->C
    no bias), matching the ``N.pool.{0,1,3}`` keys of the TAEF2 release. (Checked against the published
    round-trip PSNR: this per-position reading gives 25.15 dB on the first 160 tf_flowers val images at 128 px,
    the published 25.1; a global-average-pooled reading gives 23.9.)
    """

    def __init__(self, channels: int, act_fn: str, hidden_channels: int, groups: int):
        super().__init__(channels, channels, act_fn)
        self.pool = nn.Sequential(
            nn.Conv2d(channels, hidden_channels, kernel_size=1, bias=False),
            nn.GroupNorm(groups, hidden_channels),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, channels, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pool(x)  # (B, C, H, W)
        return super().forward(x)


class PooledAutoencoderTiny(AutoencoderTiny):
    """``AutoencoderTiny`` whose listed encoder/decoder layers are :class:`PooledTinyBlock` (TAEF2).

    The extra config fields make the layout part of ``config.json``, so ``from_pretrained`` rebuilds it and
    loads the pool weights strictly. A pipeline names it as ``["latentflow.vae", "PooledAutoencoderTiny"]``.

    Args:
        pool_encoder_layers: indices into ``encoder.layers`` that carry a pool branch.
        pool_decoder_layers: indices into ``decoder.layers`` that carry a pool branch.
        pool_hidden_channels: width of the pool bottleneck.
        pool_groups: GroupNorm groups in the pool bottleneck.
        block_out_channels: ignored; ``AutoencoderTiny`` records it (as the decoder's channels) in every saved
            config, so it is accepted here for those configs to load without a warning.
        Other arguments: as ``AutoencoderTiny``.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
        decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
        act_fn: str = "relu",
        upsample_fn: str = "nearest",
        latent_channels: int = 4,
        upsampling_scaling_factor: int = 2,
        num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3),
        num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1),
        latent_magnitude: int = 3,
        latent_shift: float = 0.5,
        force_upcast: bool = False,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        pool_encoder_layers: tuple[int, ...] = (),
        pool_decoder_layers: tuple[int, ...] = (),
        pool_hidden_channels: int = 256,
        pool_groups: int = 4,
        block_out_channels: tuple[int, ...] | None = None,
    ):
        super().__init__(in_channels=in_channels, out_channels=out_channels,
                         encoder_block_out_channels=encoder_block_out_channels,
                         decoder_block_out_channels=decoder_block_out_channels, act_fn=act_fn,
                         upsample_fn=upsample_fn, latent_channels=latent_channels,
                         upsampling_scaling_factor=upsampling_scaling_factor, num_encoder_blocks=num_encoder_blocks,
                         num_decoder_blocks=num_decoder_blocks, latent_magnitude=latent_magnitude,
                         latent_shift=latent_shift, force_upcast=force_upcast, scaling_factor=scaling_factor,
                         shift_factor=shift_factor)
        for stack, indices in ((self.encoder.layers, pool_encoder_layers), (self.decoder.layers, pool_decoder_layers)):
            for index in indices:
                block = stack[index]
                if not isinstance(block, AutoencoderTinyBlock):
                    raise LatentflowError(f"PooledAutoencoderTiny: layer {index} is {type(block).__name__}, "
                                          "not an AutoencoderTinyBlock; pool layers must index blocks")
                channels = block.conv[0].in_channels
                stack[index] = PooledTinyBlock(channels, act_fn, pool_hidden_channels, pool_groups)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---- identity: "is this the same VAE" -----------------------------------------------------------------------

IDENTITY_FACTORS = ("class", "latent_channels", "scaling_factor", "shift_factor")
"""What decides how latents decode besides the weights: the class and the model-space factors."""


def weights_sha256(module: nn.Module) -> str:
    """sha256 of a model's parameter names, shapes and float32 values (in name order): survives a save/load
    round trip and a change of file format, not a change of weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def vae_fingerprint(module: nn.Module) -> dict[str, Any]:
    """A JSON-able identity of a diffusers VAE module (what a pipeline's scheduler config stores). The weights
    hash is left out while the module is not float32: it is defined on float32 weights."""
    config = getattr(module, "config", {})
    fingerprint = {"class": type(module).__name__, "latent_channels": config.get("latent_channels"),
                   "scaling_factor": config.get("scaling_factor"), "shift_factor": config.get("shift_factor")}
    if all(tensor.dtype == torch.float32 for tensor in module.state_dict().values()):
        fingerprint["weights_sha256"] = weights_sha256(module)
    return fingerprint


def _comparable_identity(identity: dict[str, Any]) -> dict[str, Any]:
    identity = dict(identity)
    if "class_name" in identity:  # pipeline folders of 0.1.0 stored the class under this key
        identity["class"] = identity.pop("class_name")
    for key in ("scaling_factor", "shift_factor"):  # a config's None means the diffusers defaults
        if identity.get(key) is None:
            identity[key] = 1.0 if key == "scaling_factor" else 0.0
        identity[key] = float(identity[key])
    return identity


def identity_differences(expected: dict[str, Any], actual: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The one rule for "is this the same VAE": the class and factors must agree, and so must the weights: by
    their hash where both identities have one, else by the weight files' hashes, else by the source named.

    Returns:
        {key: (expected value, actual value)} for every key that differs; empty when it is the same VAE.
    """
    expected, actual = _comparable_identity(expected), _comparable_identity(actual)
    keys = list(IDENTITY_FACTORS)
    if expected.get("weights_sha256") and actual.get("weights_sha256"):
        keys.append("weights_sha256")
    elif expected.get("files") and actual.get("files"):
        keys.append("files")
    elif expected.get("source") or actual.get("source"):
        keys.append("source")
    return {key: (expected.get(key), actual.get(key)) for key in keys if expected.get(key) != actual.get(key)}


def check_same_vae(expected: dict[str, Any], actual: dict[str, Any], where: str) -> None:
    """Raise LatentflowError naming every difference when `actual` is not the VAE `expected` describes."""
    differing = identity_differences(expected, actual)
    if differing:
        details = "; ".join(f"{key}: expected {want!r}, got {have!r}" for key, (want, have) in differing.items())
        raise LatentflowError(f"{where}: the VAE is not the one the latents were encoded with (not the one the "
                              f"cache was encoded with: {details}); use the VAE named in the latent cache's manifest")


def check_vae_fingerprint(expected: dict[str, Any] | None, vae: nn.Module, where: str) -> None:
    """`check_same_vae` for a VAE module against a stored fingerprint (skipped when None)."""
    if expected:
        check_same_vae(expected, vae_fingerprint(vae), where)


def denormalize_latents(latents: torch.Tensor, channel_mean: torch.Tensor, channel_std: torch.Tensor) -> torch.Tensor:
    """Undo a per-channel normalisation: (B, C, h, w) * std + mean, with (C,) (or broadcastable) statistics."""
    view = (1, -1, 1, 1)
    return latents * channel_std.to(latents).reshape(view) + channel_mean.to(latents).reshape(view)


def decode_latents(vae: nn.Module, latents: torch.Tensor, channel_mean: torch.Tensor | None = None,
                   channel_std: torch.Tensor | None = None) -> torch.Tensor:
    """The one way latents become images: undo a model's per-channel normalisation (when given), undo the VAE's
    scale and shift (read from its config), decode.

    Args:
        vae: a diffusers autoencoder module.
        latents: (B, C, h, w) model-space latents (normalised when `channel_mean`/`channel_std` are given).
        channel_mean, channel_std: (C,) per-channel statistics the model's latents were normalised with.

    Returns:
        (B, 3, H, W) float32 images in [-1, 1].
    """
    if channel_mean is not None:
        latents = denormalize_latents(latents, channel_mean, channel_std)
    config = vae.config
    scaling = config.get("scaling_factor") if config.get("scaling_factor") is not None else 1.0
    shift = config.get("shift_factor") or 0.0
    parameter = next(vae.parameters())
    raw = latents.to(parameter.device, torch.float32) / scaling + shift
    decoded = vae.decode(raw.to(parameter.dtype))
    images = decoded.sample if hasattr(decoded, "sample") else decoded
    return images.float().clamp(-1, 1)


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LatentflowError(f"unknown dtype {dtype!r}; valid: {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


class FrozenVAE:
    """A frozen diffusers autoencoder with model-space encode/decode.

    Attributes:
        module: the underlying diffusers model (eval mode, no gradients); pass it to pipelines.
        latent_channels: C of the latents.
        downsampling_factor: spatial factor f (latents are H/f x W/f).
        scaling_factor, shift_factor: from the VAE config.
        stochastic: whether encode returns a std (Gaussian posterior).
        identity: a JSON-able dict naming the weights (source, class, sha256 of weight files, factors).
    """

    def __init__(self, module: nn.Module, identity: dict[str, Any], device: torch.device, dtype: torch.dtype):
        identity = {**identity, "weights_sha256": weights_sha256(module)}  # on the float32 weights, before a cast
        module = module.to(device=device)
        if dtype != torch.float32:
            # diffusers' ModelMixin.to warns of float32-kept modules on every cast, also when a model keeps none
            # (TAESD-family, AutoencoderKL); nn.Module.to casts alike without it, and models that keep some go
            # through diffusers
            cast = module.to if getattr(module, "_keep_in_fp32_modules", None) else partial(nn.Module.to, module)
            module = cast(dtype=dtype)
        self.module = module.eval().requires_grad_(False)
        if dtype == torch.float16 and module.config.get("force_upcast"):
            warnings.warn(f"{type(module).__name__} config sets force_upcast: it is known to overflow in float16 "
                          "(NaN latents); prefer --dtype fp32 or bf16", stacklevel=2)
        self.device, self.dtype = device, dtype
        config = module.config
        self.scaling_factor = float(config.get("scaling_factor") if config.get("scaling_factor") is not None else 1.0)
        self.shift_factor = float(config.get("shift_factor") if config.get("shift_factor") is not None else 0.0)
        self.latent_channels = int(config["latent_channels"])
        self.downsampling_factor = _downsampling_factor(module)
        self.stochastic = _is_stochastic(module)
        self.identity = {**identity, "class": type(module).__name__, "scaling_factor": self.scaling_factor,
                         "shift_factor": self.shift_factor, "latent_channels": self.latent_channels,
                         "downsampling_factor": self.downsampling_factor, "stochastic": self.stochastic}

    def encode(self, images: torch.Tensor) -> EncodedLatents:
        """Encode images to the model-space posterior.

        Args:
            images: (B, 3, H, W) in [-1, 1]; H and W multiples of ``downsampling_factor``.

        Returns:
            EncodedLatents with mean (B, C, H/f, W/f) float32 and std of the same shape (None if deterministic).
        """
        with torch.inference_mode():
            output = self.module.encode(images.to(self.device, self.dtype))
            if hasattr(output, "latent_dist"):
                mean, std = output.latent_dist.mean, output.latent_dist.std  # (B, C, h, w) each
            else:
                mean, std = output.latents, None  # (B, C, h, w)
            mean = (mean.float() - self.shift_factor) * self.scaling_factor
            std = std.float() * self.scaling_factor if std is not None and self.stochastic else None
        return EncodedLatents(mean=mean.clone(), std=None if std is None else std.clone())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode model-space latents.

        Args:
            latents: (B, C, h, w) model-space latents.

        Returns:
            (B, 3, h*f, w*f) float32 images clamped to [-1, 1].
        """
        with torch.inference_mode():
            images = decode_latents(self.module, latents)  # (B, 3, H, W)
        return images.clone()

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the underlying diffusers model (``config.json`` + safetensors)."""
        self.module.save_pretrained(str(directory), safe_serialization=True)

    def __repr__(self) -> str:
        return (f"FrozenVAE({self.identity['class']}, source={self.identity.get('source')!r}, "
                f"C={self.latent_channels}, f={self.downsampling_factor}, scaling={self.scaling_factor}, "
                f"shift={self.shift_factor})")


def _probe_encode(module: nn.Module) -> Any:
    parameter = next(module.parameters())
    probe = torch.zeros(1, int(module.config.get("in_channels", 3)), 64, 64, dtype=parameter.dtype,
                        device=parameter.device)
    with torch.inference_mode():
        return module.encode(probe)


def _is_stochastic(module: nn.Module) -> bool:
    if isinstance(module, AutoencoderTiny):
        return False
    if type(module).__name__.startswith("AutoencoderKL"):
        return True
    return hasattr(_probe_encode(module), "latent_dist")


def _downsampling_factor(module: nn.Module) -> int:
    config = module.config
    if "encoder_block_out_channels" in config:  # AutoencoderTiny: one stride-2 conv per stage after the first
        return 2 ** (len(config["encoder_block_out_channels"]) - 1)
    if "block_out_channels" in config and "down_block_types" in config:  # AutoencoderKL family
        return 2 ** (len(config["block_out_channels"]) - 1)
    output = _probe_encode(module)
    latents = output.latent_dist.mean if hasattr(output, "latent_dist") else output.latents
    return 64 // latents.shape[-1]


def vae_source(identity: dict[str, Any]) -> str:
    """The load_vae argument recorded in a cache's VAE identity."""
    for key in ("source", "path", "name_or_path", "repo_id", "name"):
        if identity.get(key):
            return str(identity[key])
    raise LatentflowError(
        f"the cache manifest's VAE identity {identity} names no VAE to load; pass the VAE's folder or hub id "
        f"(sample.vae when training)"
    )


def load_vae(source: str | Path = DEFAULT_VAE, dtype: str | torch.dtype | None = "fp32",
             device: str | torch.device = "cpu") -> FrozenVAE:
    """Load a frozen VAE.

    Args:
        source: a hub id (``org/name`` or ``org/name/subfolder``), a local diffusers folder (model or pipeline),
            or a folder / ``.pth`` file of a tiny-autoencoder release (``taef2_encoder.pth`` + ``taef2_decoder.pth``).
        dtype: compute dtype: fp32, fp16 or bf16 (or a torch.dtype).
        device: where the VAE runs.

    Returns:
        A FrozenVAE in eval mode with gradients off.
    """
    torch_dtype, device = _resolve_dtype(dtype), torch.device(device)
    path = Path(source)
    if path.exists():
        tae_files = _find_tae_files(path)
        if tae_files is not None:
            module, identity = _load_tae_release(*tae_files)
        else:
            module, identity = _load_diffusers_folder(path)
    elif _looks_like_hub_id(str(source)):
        module, identity = _load_diffusers_hub(str(source))
    else:
        raise LatentflowError(f"VAE {str(source)!r}: no such file or folder, and not a hub id (org/name[/subfolder])")
    return FrozenVAE(module, identity, device, torch_dtype)


# ---- diffusers folders and hub ids -------------------------------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def _diffusers_class(name: str) -> type:
    if name == PooledAutoencoderTiny.__name__:
        return PooledAutoencoderTiny
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise LatentflowError(f"config _class_name {name!r} is not a diffusers model class")
    return cls


def _load_diffusers_folder(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").exists() and (folder / "vae" / "config.json").exists():
        folder = folder / "vae"
    config_path = folder / "config.json"
    if not config_path.exists():
        raise LatentflowError(f"VAE folder {folder}: no config.json (nor vae/config.json), and no "
                              "<name>_encoder.pth/<name>_decoder.pth pair; expected a diffusers model folder "
                              "or a tiny-autoencoder release folder")
    class_name = json.loads(config_path.read_text()).get("_class_name")
    if not class_name:
        raise LatentflowError(f"{config_path}: missing _class_name")
    module = _diffusers_class(class_name).from_pretrained(str(folder))
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.suffix in _WEIGHT_SUFFIXES}
    return module, {"source": str(path.resolve()), "format": "diffusers", "files": files}


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w.-]+)*", text)) and not text.startswith(("/", "."))


def _load_diffusers_hub(source: str) -> tuple[nn.Module, dict[str, Any]]:
    from huggingface_hub import hf_hub_download

    parts = source.split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        config_file = hf_hub_download(repo_id, "config.json", subfolder=subfolder)
    except Exception as error:  # offline, missing repo, missing subfolder: say which and why
        where = f"repo {repo_id}" + (f", subfolder {subfolder}" if subfolder else "")
        reason = first_line(error).split(". ")[0]  # huggingface_hub writes a paragraph
        raise LatentflowError(f"VAE {source!r}: could not fetch config.json from the Hub ({where}): "
                              f"{type(error).__name__}: {reason}; without a network give a local VAE folder "
                              f"(e.g. one saved by `hf download {repo_id} --local-dir DIR`)") from error
    class_name = json.loads(Path(config_file).read_text()).get("_class_name", "AutoencoderKL")
    module = _diffusers_class(class_name).from_pretrained(repo_id, subfolder=subfolder)
    folder = Path(config_file).parent
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.suffix in _WEIGHT_SUFFIXES}
    return module, {"source": source, "format": "diffusers", "files": files}


# ---- tiny-autoencoder release files ------------------------------------------------------------------------

def _find_tae_files(path: Path) -> tuple[Path, Path] | None:
    """The (encoder, decoder) .pth pair named by `path` (a folder, or either file), or None if not a TAE release."""
    if path.is_file():
        match = re.fullmatch(r"(.+)_(encoder|decoder)\.pth", path.name)
        if not match:
            return None
        folder, stem = path.parent, match.group(1)
    else:
        encoders = sorted(path.glob("*_encoder.pth"))
        if not encoders:
            return None
        if len(encoders) > 1:
            raise LatentflowError(f"{path}: several *_encoder.pth files ({', '.join(p.name for p in encoders)}); "
                                  "name the one to use")
        folder, stem = path, encoders[0].name[: -len("_encoder.pth")]
    encoder, decoder = folder / f"{stem}_encoder.pth", folder / f"{stem}_decoder.pth"
    for needed in (encoder, decoder):
        if not needed.exists():
            raise LatentflowError(f"tiny autoencoder {stem}: missing {needed}")
    return encoder, decoder


def _pool_layers(state_dict: dict[str, torch.Tensor], offset: int) -> tuple[int, ...]:
    indices = {int(key.split(".")[0]) - offset for key in state_dict if ".pool." in key}
    return tuple(sorted(indices))


def tae_state_dict(encoder_sd: dict[str, torch.Tensor], decoder_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map release keys to diffusers ``AutoencoderTiny`` keys.

    Encoder ``N.rest`` -> ``encoder.layers.N.rest``; decoder ``N.rest`` -> ``decoder.layers.{N-1}.rest`` (the
    release decoder starts with a parameter-free Clamp, which diffusers applies inside ``DecoderTiny.forward``).
    """
    mapped = {f"encoder.layers.{key}": value for key, value in encoder_sd.items()}
    for key, value in decoder_sd.items():
        index, rest = key.split(".", 1)
        mapped[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    return mapped


def _load_tae_release(encoder_path: Path, decoder_path: Path) -> tuple[nn.Module, dict[str, Any]]:
    encoder_sd = torch.load(encoder_path, map_location="cpu", weights_only=True)
    decoder_sd = torch.load(decoder_path, map_location="cpu", weights_only=True)
    last = max((key for key in encoder_sd if key.endswith(".weight")), key=lambda k: int(k.split(".")[0]))
    latent_channels = int(encoder_sd[last].shape[0])
    pool_encoder, pool_decoder = _pool_layers(encoder_sd, 0), _pool_layers(decoder_sd, 1)
    kwargs: dict[str, Any] = {"latent_channels": latent_channels}
    if pool_encoder or pool_decoder:
        hidden = next(v.shape[0] for k, v in encoder_sd.items() if k.endswith(".pool.0.weight"))
        module = PooledAutoencoderTiny(pool_encoder_layers=pool_encoder, pool_decoder_layers=pool_decoder,
                                       pool_hidden_channels=int(hidden), pool_groups=4, **kwargs)
    else:
        module = AutoencoderTiny(**kwargs)
    state = {key: value.float() for key, value in tae_state_dict(encoder_sd, decoder_sd).items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise LatentflowError(f"{encoder_path.parent}: {encoder_path.name}/{decoder_path.name} do not match the "
                              f"TAESD layout (families: {', '.join(_TAE_FAMILIES)}; the f32 TAESANA layout is not "
                              f"supported): {first_line(error)}") from error
    family = encoder_path.name[: -len("_encoder.pth")]
    files = {p.name: sha256_file(p) for p in (encoder_path, decoder_path)}
    return module, {"source": str(encoder_path.parent.resolve()), "format": "taesd-pth", "family": family,
                    "files": files}
