"""latentflow.vae: TAESD-family .pth loading (real TAEF2), diffusers folders, model-space scaling round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from latentflow.errors import LatentflowError
from latentflow.vae import PooledAutoencoderTiny, PooledTinyBlock, load_vae, tae_state_dict

SHARED = Path(__file__).parents[1].parent / "shared"
TAEF2 = SHARED / "weights" / "taef2"
needs_taef2 = pytest.mark.skipif(not (TAEF2 / "taef2_encoder.pth").exists(), reason=f"{TAEF2} not present")
TAEF2_SHA256 = {"taef2_encoder.pth": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
                "taef2_decoder.pth": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5"}


def tiny_kl(folder: Path, scaling_factor: float = 0.7, shift_factor: float = 0.3) -> Path:
    """A tiny random AutoencoderKL (f=4, 4 channels) saved as a diffusers folder, with non-trivial factors."""
    torch.manual_seed(0)
    model = AutoencoderKL(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                          up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
                          layers_per_block=1, scaling_factor=scaling_factor, shift_factor=shift_factor)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def taef2():
    if not (TAEF2 / "taef2_encoder.pth").exists():
        pytest.skip(f"{TAEF2} not present")
    return load_vae(TAEF2)


@needs_taef2
def test_taef2_loads_strictly_with_pool_branch_and_is_frozen(taef2):
    module = taef2.module
    assert isinstance(module, PooledAutoencoderTiny)
    assert (taef2.latent_channels, taef2.downsampling_factor) == (32, 8)
    assert [i for i, layer in enumerate(module.encoder.layers) if isinstance(layer, PooledTinyBlock)] == [11, 12, 13]
    assert [i for i, layer in enumerate(module.decoder.layers) if isinstance(layer, PooledTinyBlock)] == [2, 3, 4]
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert (taef2.scaling_factor, taef2.shift_factor) == (1.0, 0.0)  # AutoencoderTiny's config defaults
    assert taef2.identity["files"] == TAEF2_SHA256 and taef2.identity["class"] == "PooledAutoencoderTiny"
    # every released tensor landed in the model, unchanged
    encoder_sd = torch.load(TAEF2 / "taef2_encoder.pth", weights_only=True)
    decoder_sd = torch.load(TAEF2 / "taef2_decoder.pth", weights_only=True)
    state = module.state_dict()
    for key, value in tae_state_dict(encoder_sd, decoder_sd).items():
        assert torch.equal(state[key], value.float()), key
    assert len(state) == len(encoder_sd) + len(decoder_sd)


@needs_taef2
def test_taef2_encode_is_raw_encoder_output_and_decode_inverts_in_range(taef2):
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    encoded = taef2.encode(images)
    assert encoded.std is None and encoded.mean.shape == (2, 32, 4, 6)
    with torch.no_grad():
        raw = taef2.module.encoder(images)
    torch.testing.assert_close(encoded.mean, raw)
    decoded = taef2.decode(encoded.mean)
    assert decoded.shape == images.shape and decoded.min() >= -1 and decoded.max() <= 1
    assert not encoded.mean.is_inference()  # safe to use outside inference mode


@needs_taef2
def test_taef2_save_pretrained_round_trip_keeps_pool_branch(taef2, tmp_path):
    taef2.save_pretrained(tmp_path / "taef2")
    config = json.loads((tmp_path / "taef2" / "config.json").read_text())
    assert config["_class_name"] == "PooledAutoencoderTiny" and config["pool_encoder_layers"] == [11, 12, 13]
    reloaded = load_vae(tmp_path / "taef2")
    direct = PooledAutoencoderTiny.from_pretrained(tmp_path / "taef2")  # what a pipeline does
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(reloaded.encode(images).mean, taef2.encode(images).mean)
    with torch.no_grad():
        torch.testing.assert_close(direct.encoder(images), taef2.encode(images).mean)
    assert reloaded.identity["format"] == "diffusers"
    assert "diffusion_pytorch_model.safetensors" in reloaded.identity["files"]


def _release_files(model: AutoencoderTiny, folder: Path, family: str) -> None:
    """Write `model` in the original release layout (plain Sequential keys; decoder shifted by the Clamp)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    encoder = {k[len("encoder.layers."):]: v for k, v in state.items() if k.startswith("encoder.layers.")}
    decoder = {}
    for key, value in state.items():
        if key.startswith("decoder.layers."):
            index, rest = key[len("decoder.layers."):].split(".", 1)
            decoder[f"{int(index) + 1}.{rest}"] = value
    torch.save(encoder, folder / f"{family}_encoder.pth")
    torch.save(decoder, folder / f"{family}_decoder.pth")


@pytest.mark.parametrize("family,channels", [("taesd", 4), ("taesd3", 16)])
def test_plain_tae_release_files_load_into_autoencoder_tiny(tmp_path, family, channels):
    torch.manual_seed(1)
    reference = AutoencoderTiny(latent_channels=channels).eval()
    _release_files(reference, tmp_path / family, family)
    vae = load_vae(tmp_path / family / f"{family}_decoder.pth")  # either file names the pair
    assert type(vae.module) is AutoencoderTiny and vae.latent_channels == channels
    assert vae.identity["family"] == family
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(images).mean, reference.encoder(images))


def test_autoencoder_kl_scaling_and_shift_applied_and_inverted(tmp_path):
    vae = load_vae(tiny_kl(tmp_path / "kl"))
    assert (vae.scaling_factor, vae.shift_factor, vae.downsampling_factor, vae.stochastic) == (0.7, 0.3, 4, True)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    encoded = vae.encode(images)
    with torch.no_grad():
        posterior = vae.module.encode(images).latent_dist
    torch.testing.assert_close(encoded.mean, (posterior.mean - 0.3) * 0.7)
    torch.testing.assert_close(encoded.std, posterior.std * 0.7)
    assert (encoded.std > 0).all()
    with torch.no_grad():
        expected = vae.module.decode(encoded.mean / 0.7 + 0.3).sample.clamp(-1, 1)
    torch.testing.assert_close(vae.decode(encoded.mean), expected)


def test_dtype_option_and_bad_inputs(tmp_path):
    vae = load_vae(tiny_kl(tmp_path / "kl"), dtype="bf16")
    assert next(vae.module.parameters()).dtype == torch.bfloat16
    assert vae.encode(torch.zeros(1, 3, 8, 8)).mean.dtype == torch.float32
    with pytest.raises(LatentflowError, match="dtype"):
        load_vae(tmp_path / "kl", dtype="fp8")
    with pytest.raises(LatentflowError, match="no such file"):
        load_vae(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentflowError, match="config.json"):
        load_vae(tmp_path / "empty")
    (tmp_path / "half").mkdir()
    torch.save({}, tmp_path / "half" / "taesd_encoder.pth")
    with pytest.raises(LatentflowError, match="taesd_decoder.pth"):
        load_vae(tmp_path / "half")


def test_a_hub_vae_that_cannot_be_fetched_is_one_line_with_the_offline_fix(monkeypatch) -> None:
    """The real hub download, offline (huggingface_hub's own switch, so no retries): the error names the repo, the
    reason in one sentence and what to do without a network (it was huggingface_hub's whole paragraph)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LatentflowError) as raised:
        load_vae("latentflow-tests/no-such-vae")
    message = str(raised.value)
    assert message.startswith("VAE 'latentflow-tests/no-such-vae': could not fetch config.json from the Hub (repo "
                              "latentflow-tests/no-such-vae): ")
    assert message.endswith("; without a network give a local VAE folder (e.g. one saved by `hf download "
                            "latentflow-tests/no-such-vae --local-dir DIR`)")
    assert "\n" not in message and "Please check" not in message  # the reason's first sentence only


def test_one_identity_rule_for_manifests_exports_and_pipelines() -> None:
    from latentflow.vae import identity_differences

    base = {"class": "AutoencoderTiny", "latent_channels": 32, "scaling_factor": 1.0, "shift_factor": 0.0}
    hashed = {**base, "weights_sha256": "a" * 64, "files": {"x.pth": "1" * 64}, "source": "/here"}
    # the weights hash decides when both sides have one: other files or sources with the same weights are the same VAE
    assert identity_differences(hashed, {**hashed, "files": {"y.safetensors": "2" * 64}, "source": "/there"}) == {}
    assert set(identity_differences(hashed, {**hashed, "weights_sha256": "b" * 64})) == {"weights_sha256"}
    # else the weight files, else the source
    assert set(identity_differences({**base, "files": {"x": "1"}}, {**base, "files": {"x": "2"}})) == {"files"}
    assert set(identity_differences({**base, "source": "a"}, {**base, "source": "b"})) == {"source"}
    # pipeline folders of 0.1.0 stored the class as class_name; None factors are the diffusers defaults
    legacy = {"class_name": "AutoencoderTiny", "latent_channels": 32, "scaling_factor": None, "shift_factor": None}
    assert identity_differences(legacy, base) == {}
    assert set(identity_differences(base, {**base, "scaling_factor": 0.5, "class": "AutoencoderKL"})) == {
        "scaling_factor", "class"}


@needs_taef2
def test_a_cast_taef2_loads_without_diffusers_float32_warning(caplog):
    """diffusers' ModelMixin.to warned of modules to keep in float32 on every cast, also of a model that keeps
    none ("...should be kept in float32: []"), under every `encode --dtype bf16` and fp16."""
    vae = load_vae(TAEF2, dtype="bf16")
    assert next(vae.module.parameters()).dtype == torch.bfloat16
    assert not [record for record in caplog.records if "kept in float32" in record.getMessage()]
