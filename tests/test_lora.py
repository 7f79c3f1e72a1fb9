"""LoRA training with peft: adapter-only optimizer state and checkpoints, diffusers and kohya
files that diffusers loads back to the very model that was trained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import tiny_config
from dreambooth import seeding
from dreambooth.formats.lora_files import DIFFUSERS_LORA_FILE, kohya_lora_file
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
    assert (output / DIFFUSERS_LORA_FILE).exists() and (kohya_lora_file(output)).exists()
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

    # diffusers loads both files; both reproduce the live model's last validation images.
    seeds = seeding.validation_seeds(7, 2)
    live = np.asarray(Image.open(output / "validation" / "step-000004.png"), dtype=np.float32)
    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    base_images = _sample(base, seeds)
    for lora_file in (output, kohya_lora_file(output)):
        pipeline = StableDiffusionPipeline.from_pretrained(tiny_model)
        pipeline.load_lora_weights(lora_file)
        images = _sample(pipeline, seeds)
        grid = np.concatenate(list(images), axis=1) * 255
        assert np.abs(grid - live).max() <= 2, lora_file  # PNG rounding
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
