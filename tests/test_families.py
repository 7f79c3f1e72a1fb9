"""Every model family (SD 1.x, SD 2.x, SDXL) trains in full and with LoRA, and its output
loads back through diffusers' own loaders to the model that was trained."""

from __future__ import annotations

import json

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from conftest import tiny_config
from dreambooth import seeding
from dreambooth.families import detect_family
from dreambooth.formats.lora_files import kohya_lora_file
from dreambooth.train.run import train


def _validation_images(pipeline, seeds):
    images = [pipeline("a photo of sks dog", num_inference_steps=2, guidance_scale=7.5,
                       generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
              for seed in seeds]
    return np.concatenate(images, axis=1) * 255  # side by side, as the validation grid


def _common(tmp_path):
    return dict(with_prior_preservation=True, class_prompt="a photo of dog",
                class_data_dir=str(tmp_path / "class"), num_class_images=2, max_train_steps=3,
                train_text_encoder=True, validation_prompt="a photo of sks dog",
                validation_steps=100, num_validation_images=2, random_flip=True)


def test_full_fine_tune_of_each_family(tmp_path, family_model, instance_dir):
    family, model = family_model
    assert detect_family(model) == family
    output = train(tiny_config(model, instance_dir, tmp_path / "out", **_common(tmp_path)))
    assert detect_family(output) == family
    index = json.loads((output / "model_index.json").read_text())
    assert ("text_encoder_2" in index) == (family == "sdxl")
    pipeline = DiffusionPipeline.from_pretrained(output)
    seeds = seeding.validation_seeds(7, 2)
    live = np.asarray(Image.open(output / "validation" / "step-000003.png"), dtype=np.float32)
    assert np.abs(_validation_images(pipeline, seeds) - live).max() <= 2


def test_lora_of_each_family_loads_in_diffusers_from_both_files(tmp_path, family_model,
                                                                 instance_dir):
    family, model = family_model
    output = train(tiny_config(model, instance_dir, tmp_path / "lora", use_lora=True,
                               learning_rate=1e-2, **_common(tmp_path)))
    seeds = seeding.validation_seeds(7, 2)
    live = np.asarray(Image.open(output / "validation" / "step-000003.png"), dtype=np.float32)
    with open(kohya_lora_file(output), "rb") as handle:
        header = handle.read(200_000).decode("latin-1")
    if family == "sdxl":
        assert "lora_te1_text_model" in header and "lora_te2_text_model" in header
    else:
        assert "lora_te_text_model" in header
    for lora in (output, kohya_lora_file(output)):
        pipeline = DiffusionPipeline.from_pretrained(model)
        pipeline.load_lora_weights(lora)
        assert np.abs(_validation_images(pipeline, seeds) - live).max() <= 2, lora
