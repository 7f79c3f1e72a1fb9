"""Shared fixtures: a tiny Stable Diffusion pipeline built in-process and a few subject photos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from dreambooth.config import parse_train_config
from dreambooth.tiny import save_tiny_pipeline

# Sampling picks torch's thread count from the machine's load before every batch
# (dreambooth.cpu), and another count sums in another order: tests that compare images bit for
# bit would depend on what else runs. A thread count the user chose switches that off; the tests
# of the choice itself (test_cpu.py) unset it.
if not any(os.environ.get(name, "").strip() for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_v_model(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-v",
                              prediction_type="v_prediction")


def write_subject_photos(folder: Path, count: int = 4, size: int = 40) -> Path:
    """`count` photos of one made-up subject: a blue disc with a yellow stripe, moving around."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (size, size), (200, 60 + 30 * index, 50))
        draw = ImageDraw.Draw(image)
        offset = 3 * index
        draw.ellipse([offset, offset, offset + 26, offset + 26], fill=(20, 40, 220))
        draw.rectangle([offset + 4, offset + 11, offset + 22, offset + 15], fill=(250, 220, 0))
        image.save(folder / f"photo-{index}.png")
    return folder


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    return write_subject_photos(tmp_path / "instance")


def tiny_config(model: Path, instance: Path, output_dir: Path, **overrides):
    """A TrainConfig for a few CPU steps on the tiny model; overrides use the flat keys."""
    values = dict(
        pretrained_model_name_or_path=str(model), instance_data_dir=str(instance),
        instance_prompt="a photo of sks dog", resolution=32, train_batch_size=2,
        max_train_steps=4, learning_rate=1e-3, lr_warmup_steps=0, checkpointing_steps=100,
        seed=7, output_dir=str(output_dir), accelerator="cpu", devices="1", report_to="none",
        class_inference_steps=2, sample_batch_size=3, validation_inference_steps=2,
        # Fixed, not measured from the load: runs compared bit for bit compute the same sums.
        num_threads=1,
    )
    values.update(overrides)
    return parse_train_config(values)


@pytest.fixture(scope="session", params=["sd1", "sd2", "sdxl"])
def family_model(request, tmp_path_factory) -> tuple[str, Path]:
    """(family, folder) of a tiny pipeline of each model family."""
    family = request.param
    return family, save_tiny_pipeline(tmp_path_factory.mktemp("models") / f"tiny-{family}",
                                      family=family)
