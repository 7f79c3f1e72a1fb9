"""End-to-end training on a tiny model: prior preservation, class images, export, tracking."""

from __future__ import annotations

import json

import numpy as np
import torch
import yaml
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_config
from dreambooth.config import parse_train_config
from dreambooth.generate import generate
from dreambooth.images import read_png_text
from dreambooth.models import load_pipeline
from dreambooth.train.class_images import generate_class_images, missing_class_images
from dreambooth.train.run import train


def test_train_with_prior_preservation_end_to_end(tmp_path, tiny_model, instance_dir):
    class_dir = tmp_path / "class"
    config = tiny_config(
        tiny_model, instance_dir, tmp_path / "out", with_prior_preservation=True,
        class_prompt="a photo of dog", class_data_dir=str(class_dir), num_class_images=5,
        train_text_encoder=True, max_train_steps=4, checkpointing_steps=2,
        validation_prompt="a photo of sks dog", validation_steps=2, num_validation_images=2,
        report_to="tensorboard,csv")
    output_dir = train(config)

    # Class images were generated with their prompt and seed in the PNG metadata.
    class_images = sorted(class_dir.glob("class-*.png"))
    assert len(class_images) == 5
    text = read_png_text(class_images[0])
    assert text["prompt"] == "a photo of dog" and int(text["seed"]) >= 0
    assert "Steps: 2" in text["parameters"]

    # diffusers' own loader reads the result; trained parts changed, the VAE did not.
    pipeline = StableDiffusionPipeline.from_pretrained(output_dir)
    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    def changed(a, b):
        return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                         b.state_dict().values()))
    assert changed(pipeline.unet, base.unet)
    assert changed(pipeline.text_encoder, base.text_encoder)
    assert not changed(pipeline.vae, base.vae)
    assert not list(output_dir.rglob("*optimizer*"))
    weights = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(value.dtype == torch.float32 for value in weights.values())

    # The run describes itself.
    saved = yaml.safe_load((output_dir / "training_config.yaml").read_text())
    assert saved["seed"] == 7 and saved["with_prior_preservation"] is True
    assert parse_train_config(saved).to_flat_dict() == config.to_flat_dict()
    versions = json.loads((output_dir / "versions.json").read_text())
    assert {"torch", "diffusers", "transformers", "lightning"} <= versions.keys()

    # Tracking: TensorBoard events and both loss terms in the CSV log; validation grids.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "logs"), size_guidance={"images": 0})
    events.Reload()
    assert {"loss", "instance_loss", "prior_loss", "lr"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Images("validation")] == [2, 4]
    metrics = (output_dir / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert {"loss", "instance_loss", "prior_loss", "lr"} <= set(metrics.split(","))
    grids = sorted((output_dir / "validation").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000002.png", "step-000004.png"]
    assert Image.open(grids[0]).size == (64, 32)  # 2 images of 32 px side by side

    # The trained folder generates through the generation API.
    result = generate(output_dir, "a photo of sks dog", num_images=2, num_inference_steps=2,
                      output_dir=tmp_path / "samples")
    assert len(result.paths) == 2 and result.grid_path.exists()


def test_prior_loss_weight_scales_the_class_term(tmp_path, tiny_model, instance_dir):
    """With prior_loss_weight 0 the class images cannot influence the weights."""
    common = dict(with_prior_preservation=True, class_prompt="a photo of dog",
                  class_data_dir=str(tmp_path / "class"), num_class_images=2, max_train_steps=2,
                  report_to="none")
    runs = []
    for name, weight in (("zero", 0.0), ("one", 1.0)):
        runs.append(train(tiny_config(tiny_model, instance_dir, tmp_path / name,
                                      prior_loss_weight=weight, **common)))
    without_prior = train(tiny_config(tiny_model, instance_dir, tmp_path / "none",
                                      max_train_steps=2))
    def load(d):
        return load_file(d / "unet" / "diffusion_pytorch_model.safetensors")
    zero, one, none = load(runs[0]), load(runs[1]), load(without_prior)
    base = load(tiny_model)
    def distance(a, b):  # L2 distance over all UNet weights
        return sum(((a[k] - b[k]).double() ** 2).sum() for k in a).sqrt().item()
    moved = distance(zero, base)
    # Same instance batches and noise: only float rounding (a bigger batch in the UNet, which
    # Adam magnifies for near-zero gradients) separates weight 0 from no prior at all.
    assert distance(zero, none) < 0.02 * moved
    assert distance(zero, one) > 0.1 * moved


def test_v_prediction_model_trains_on_the_velocity(tmp_path, tiny_model, tiny_v_model,
                                                   instance_dir):
    """A v-prediction model regresses v = alpha_t * eps - sigma_t * z_0, not eps: from the same
    weights, batches and noise it ends with other weights than the same model labelled
    epsilon (the target is the only difference between the two runs)."""
    def load(folder):
        return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")

    base = load(tiny_model)
    assert all(torch.equal(base[key], value) for key, value in load(tiny_v_model).items())
    trained = {}
    for name, model in (("v", tiny_v_model), ("epsilon", tiny_model)):
        output_dir = train(tiny_config(model, instance_dir, tmp_path / name, max_train_steps=2,
                                       mixed_precision="bf16"))
        scheduler = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["prediction_type"] == {"v": "v_prediction", "epsilon": "epsilon"}[name]
        trained[name] = load(output_dir)
    assert any(not torch.equal(trained["epsilon"][key], value) for key, value in base.items())
    assert any(not torch.equal(trained["v"][key], value)
               for key, value in trained["epsilon"].items()), (
        "the v-prediction run ended with the epsilon run's weights: it regressed eps, not v")


def test_class_image_generation_resumes_without_redoing(tmp_path, tiny_model):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (32, 32), "white").save(class_dir / "my-own.jpg")
    pipeline = load_pipeline(tiny_model, device="cpu")
    # An earlier, interrupted generation wrote images 0 and 1 of the 5 needed.
    first = generate_class_images(pipeline, class_dir, [0, 1], class_prompt="a photo of dog",
                                  seed=3, num_inference_steps=2, show_progress=False)
    before = {p: p.read_bytes() for p in first}
    missing = missing_class_images(class_dir, 5)
    assert missing == [2, 3]  # 5 wanted - 3 present, lowest free indices
    generate_class_images(pipeline, class_dir, missing, class_prompt="a photo of dog", seed=3,
                          num_inference_steps=2, batch_size=1, show_progress=False)
    assert missing_class_images(class_dir, 5) == []
    assert all(p.read_bytes() == data for p, data in before.items())
    # Seeded per index: regenerating image 2 in another batch gives the same pixels.
    again = generate_class_images(pipeline, tmp_path / "again", [2], class_prompt="a photo of dog",
                                  seed=3, num_inference_steps=2, show_progress=False)
    assert np.array_equal(np.asarray(Image.open(again[0])),
                          np.asarray(Image.open(class_dir / "class-00002.png")))


def test_epochs_define_steps_when_max_train_steps_is_unset(tmp_path, tiny_model, instance_dir):
    output_dir = train(tiny_config(tiny_model, instance_dir, tmp_path / "out",
                                   max_train_steps=None, num_train_epochs=2, train_batch_size=2))
    saved = yaml.safe_load((output_dir / "training_config.yaml").read_text())
    assert saved["max_train_steps"] == 4  # 4 photos / batch 2 = 2 steps per epoch
