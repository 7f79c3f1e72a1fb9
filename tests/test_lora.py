"""LoRA training with peft: adapter-only optimizer state and checkpoints, diffusers and kohya
files that diffusers loads back to the very model that was trained."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save

from conftest import tiny_config
from dreambooth import seeding
from dreambooth.config import ConfigError
from dreambooth.formats.export import export_model
from dreambooth.formats.lora_files import DIFFUSERS_LORA_FILE, kohya_lora_file, lora_file
from dreambooth.train.run import train
from test_resume import InterruptAt

LORA = dict(use_lora=True, rank=4, lora_alpha=8, learning_rate=1e-2, train_text_encoder=True)


def _sample(pipeline, seeds, steps=2):
    images = []
    for seed in seeds:
        images.append(pipeline("a photo of sks dog", num_inference_steps=steps, guidance_scale=7.5,
                               generator=torch.Generator().manual_seed(seed),
                               output_type="np").images[0])
    return np.stack(images)


def test_lora_run_writes_files_that_reproduce_the_trained_model(tmp_path, tiny_model, instance_dir):
    output = train(tiny_config(tiny_model, instance_dir, tmp_path / "lora", max_train_steps=4,
                               checkpointing_steps=2, validation_prompt="a photo of sks dog",
                               validation_steps=100, num_validation_images=2, **LORA))
    # The kohya file is named after the output_dir (kohya's --output_name default).
    assert kohya_lora_file(output) == output / "lora.safetensors"
    assert (output / DIFFUSERS_LORA_FILE).exists()
    assert not (output / "unet").exists()  # adapters only, no full copy of the model

    # Checkpoints hold only the adapters, and so does the optimizer.
    checkpoint = torch.load(output / "checkpoints" / "checkpoint-4.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all("lora_" in key for key in checkpoint["state_dict"])
    optimizer_params = sum(len(group["params"])
                           for group in checkpoint["optimizer_states"][0]["param_groups"])
    assert optimizer_params == len(checkpoint["state_dict"])

    # kohya layout and metadata.
    with safe_open(kohya_lora_file(output), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
        alpha = handle.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert all(k.rsplit(".", 2)[0].count(".") == 0 for k in keys)  # dots only before the suffix
    assert alpha.item() == 8.0
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8.0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.trigger_phrase"] == "a photo of sks dog"
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert metadata["modelspec.resolution"] == "32x32" and metadata["training_steps"] == "4"
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    # Metadata as kohya's trainer writes it.
    assert metadata["ss_output_name"] == "lora"
    assert metadata["ss_sd_model_name"] == tiny_model.name  # no local directory layout
    assert metadata["ss_learning_rate"] == metadata["ss_text_encoder_lr"] == "0.01"
    assert metadata["ss_num_train_images"] == "4"
    assert json.loads(metadata["ss_tag_frequency"]) == {"instance": {"a photo of sks dog": 4}}
    data = (output / "lora.safetensors").read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_size:]).hexdigest()
    ss_only = save(load_file(output / "lora.safetensors"),
                   {k: v for k, v in metadata.items() if k.startswith("ss_")})
    legacy = hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["sshs_legacy_hash"] == legacy

    # The diffusers file keeps the `text_model.` level diffusers 0.3x and ComfyUI look for.
    with safe_open(output / DIFFUSERS_LORA_FILE, "pt") as handle:
        text_keys = [k for k in handle.keys() if k.startswith("text_encoder.")]
    assert text_keys and all(k.startswith("text_encoder.text_model.encoder.layers.")
                             for k in text_keys)

    # diffusers loads both files; both reproduce the live model's last validation images.
    seeds = seeding.validation_seeds(7, 2)
    live = np.asarray(Image.open(output / "validation" / "step-000004.png"), dtype=np.float32)
    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    base_images = _sample(base, seeds)
    for weights in (output, kohya_lora_file(output)):
        pipeline = StableDiffusionPipeline.from_pretrained(tiny_model)
        pipeline.load_lora_weights(weights)
        images = _sample(pipeline, seeds)
        grid = np.concatenate(list(images), axis=1) * 255
        assert np.abs(grid - live).max() <= 2, weights  # PNG rounding
        assert np.abs(images - base_images).max() > 0.01


def test_lora_resume_matches_uninterrupted(tmp_path, tiny_model, instance_dir):
    common = dict(max_train_steps=4, checkpointing_steps=2, **LORA)
    reference = train(tiny_config(tiny_model, instance_dir, tmp_path / "ref", **common))
    with pytest.raises(SystemExit):
        train(tiny_config(tiny_model, instance_dir, tmp_path / "cut", **common),
              callbacks=[InterruptAt(2)])
    resumed = train(tiny_config(tiny_model, instance_dir, tmp_path / "cut",
                                resume_from_checkpoint="latest", **common))
    a, b = load_file(reference / DIFFUSERS_LORA_FILE), load_file(resumed / DIFFUSERS_LORA_FILE)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_rank_larger_than_a_layer_is_refused(tmp_path, tiny_model, instance_dir):
    with pytest.raises(ValueError, match=r"rank=64 is larger than layer 'unet\..*' allows"):
        train(tiny_config(tiny_model, instance_dir, tmp_path / "out", use_lora=True, rank=64))


def test_unknown_target_modules_are_refused(tmp_path, tiny_model, instance_dir):
    with pytest.raises(ValueError, match="no Linear layer of the unet matches"):
        train(tiny_config(tiny_model, instance_dir, tmp_path / "out", use_lora=True,
                          lora_unet_target_modules="attention_typo"))


def test_dora_and_a_separate_vae_train(tmp_path, tiny_model, instance_dir):
    from dreambooth.tiny import save_tiny_pipeline

    other = save_tiny_pipeline(tmp_path / "other", seed=5)  # its VAE differs from the base's
    output = train(tiny_config(tiny_model, instance_dir, tmp_path / "dora", max_train_steps=2,
                               use_lora=True, use_dora=True,
                               pretrained_vae_model_name_or_path=str(other)))
    with safe_open(output / DIFFUSERS_LORA_FILE, "pt") as handle:
        keys = list(handle.keys())
    assert any("lora_magnitude_vector" in key for key in keys)
    from dreambooth.models import load_components

    swapped = load_components(tiny_model, vae_name_or_path=str(other)).vae.state_dict()
    wanted = load_file(other / "vae" / "diffusion_pytorch_model.safetensors")
    base = load_file(tiny_model / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(swapped[k], wanted[k]) for k in wanted)
    assert any(not torch.equal(base[k], wanted[k]) for k in wanted)


def test_output_name_names_the_kohya_file_and_is_found_after_a_rename(tmp_path, tiny_model,
                                                                      instance_dir):
    output = train(tiny_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=1,
                               use_lora=True, output_name="sks_dog_v1"))
    assert sorted(p.name for p in output.glob("*.safetensors")) == [
        DIFFUSERS_LORA_FILE, "sks_dog_v1.safetensors"]
    with safe_open(output / "sks_dog_v1.safetensors", "pt") as handle:
        assert handle.metadata()["ss_output_name"] == "sks_dog_v1"
    assert lora_file(output, kohya=True) == (output / "sks_dog_v1.safetensors").resolve()
    # A renamed folder (its yaml still says sks_dog_v1; the default name would now differ).
    moved = output.rename(tmp_path / "moved")
    (moved / "training_config.yaml").unlink()
    assert kohya_lora_file(moved) == moved / "sks_dog_v1.safetensors"
    exported = export_model(moved, "lora-kohya", tmp_path / "out.safetensors")
    assert load_file(exported).keys() == load_file(moved / "sks_dog_v1.safetensors").keys()


@pytest.mark.parametrize("name", ["a/b", "..", " ", "x:y"])
def test_output_name_that_is_not_a_file_name_is_refused(tmp_path, tiny_model, instance_dir,
                                                        name):
    with pytest.raises(ConfigError, match="output_name=.*must be a plain file name"):
        tiny_config(tiny_model, instance_dir, tmp_path / "out", use_lora=True, output_name=name)


def test_dora_kohya_file_holds_dora_scale_that_reproduces_the_trained_model(
        tmp_path, tiny_model, instance_dir):
    output = train(tiny_config(tiny_model, instance_dir, tmp_path / "dora", max_train_steps=3,
                               use_dora=True, validation_prompt="a photo of sks dog",
                               validation_steps=100, num_validation_images=2, **LORA))
    kohya = load_file(kohya_lora_file(output))
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert downs and any(k.startswith("lora_te_text_model_") for k in downs)
    for key in downs:
        name = key.removesuffix(".lora_down.weight")
        # LyCORIS' output-axis layout: (out, 1), beside a (out, r) lora_up.
        assert kohya[f"{name}.lora_up.weight"].shape == (kohya[f"{name}.dora_scale"].shape[0], 4)
        assert kohya[f"{name}.dora_scale"].shape[1] == 1

    # diffusers' kohya converter maps dora_scale onto peft's magnitude (it keeps the LyCORIS
    # shape, which peft stores flat); loaded so, the file gives the live model's images.
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    state, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    state = {k: v.flatten() if "lora_magnitude_vector" in k else v for k, v in state.items()}
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipeline.load_lora_into_unet({k: v for k, v in state.items() if k.startswith("unet.")},
                                 alphas, pipeline.unet)
    pipeline.load_lora_into_text_encoder(
        {k: v for k, v in state.items() if k.startswith("text_encoder.")}, alphas,
        pipeline.text_encoder)
    live = np.asarray(Image.open(output / "validation" / "step-000003.png"), dtype=np.float32)
    grid = np.concatenate(list(_sample(pipeline, seeding.validation_seeds(7, 2))), axis=1) * 255
    assert np.abs(grid - live).max() <= 2

    # ComfyUI's weight decomposition (output axis, as the (out, 1) shape tells it) gives the
    # weight peft's own DoRA merge gives: m * (W + s B A) / ||W + s B A||_row.
    fused = StableDiffusionPipeline.from_pretrained(tiny_model)
    fused.load_lora_weights(output)
    fused.fuse_lora()
    fused.unload_lora_weights()
    base = StableDiffusionPipeline.from_pretrained(tiny_model).unet.state_dict()
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    name = "lora_unet_" + module.replace(".", "_")
    weight = base[f"{module}.weight"]  # (out, in)
    scale = kohya[f"{name}.alpha"] / kohya[f"{name}.lora_down.weight"].shape[0]
    updated = weight + scale * kohya[f"{name}.lora_up.weight"] @ kohya[f"{name}.lora_down.weight"]
    dora_scale = kohya[f"{name}.dora_scale"]
    assert dora_scale.shape[0] == updated.shape[0]  # ComfyUI's test for the output axis
    comfy = updated * (dora_scale / updated.norm(dim=1, keepdim=True))
    torch.testing.assert_close(fused.unet.state_dict()[f"{module}.weight"], comfy,
                               rtol=1e-5, atol=1e-6)


def test_lora_with_text_encoder_trains_from_an_fp16_folder(tmp_path, instance_dir):
    from dreambooth.tiny import build_tiny_pipeline

    # The same weights stored as fp16 and as fp32: training runs (on the CPU too) and gives
    # the same adapters, because every model is trained and run in fp32.
    pipeline = build_tiny_pipeline().to(torch.float16)
    pipeline.save_pretrained(tmp_path / "fp16")
    pipeline.to(torch.float32).save_pretrained(tmp_path / "fp32")
    runs = [train(tiny_config(tmp_path / kind, instance_dir, tmp_path / f"out-{kind}",
                              max_train_steps=2, **LORA)) for kind in ("fp16", "fp32")]
    half, full = (load_file(run / DIFFUSERS_LORA_FILE) for run in runs)
    assert half.keys() == full.keys() and any(k.startswith("text_encoder.") for k in half)
    assert all(half[k].dtype == torch.float32 and torch.equal(half[k], full[k]) for k in half)
