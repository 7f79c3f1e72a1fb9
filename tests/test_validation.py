"""Validation during training: prompt files (one grid row per prompt) and the held-out loss,
which must leave training exactly as it is."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_config, write_subject_photos
from dreambooth.prompts import PromptFileError, read_prompt_file
from dreambooth.train.run import train
from dreambooth.train.validation import ValidationLoss, fixed_timesteps


def test_prompt_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\ufeff# recontextualization\n\n  a sks dog on the beach  \n"
                    "   # indented comment\na red sks dog\r\n", encoding="utf-8")
    assert read_prompt_file(path) == ["a sks dog on the beach", "a red sks dog"]


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"), (b"", "holds no prompt"), (b"# only\n\n", "holds no prompt"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "is not a text file"), (b"\xff\xfe\xfa", "is not a text file"),
    (b"a sks dog\n" * 5, "holds 5 prompts, more than 4")])
def test_bad_prompt_files_get_one_line_naming_the_file(tmp_path, content, words):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PromptFileError) as error:
        read_prompt_file(path, flag="--validation_prompts", limit=4)
    message = str(error.value)
    assert words in message and f"--validation_prompts file '{path}'" in message
    assert "\n" not in message
    with pytest.raises(PromptFileError, match="is a folder"):
        read_prompt_file(tmp_path)


def test_fixed_timesteps_spread_over_the_schedule():
    assert fixed_timesteps(1000).tolist() == [125, 375, 625, 875]
    assert fixed_timesteps(1000, 1).tolist() == [500]
    assert fixed_timesteps(10, 5).tolist() == [1, 3, 5, 7, 9]


class _Probe(Callback):
    """At the end of training, scores the held-out set again: the same weights must give the
    same numbers, and scoring must not touch the global RNGs training draws from."""

    def __init__(self):
        self.again, self.logged = None, None

    def on_train_end(self, trainer, pl_module):
        validation = next(c for c in trainer.callbacks if isinstance(c, ValidationLoss))
        rng = torch.get_rng_state()
        modes = [module.training for module in pl_module.modules()]
        self.again = validation.evaluate(trainer, pl_module)
        assert torch.equal(rng, torch.get_rng_state())
        # Every submodule back in its own mode (LoRA dropout trains inside an eval-mode UNet).
        assert modes == [module.training for module in pl_module.modules()]


def _tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def _unet(folder, lora: bool):
    name = ("pytorch_lora_weights.safetensors" if lora
            else "unet/diffusion_pytorch_model.safetensors")
    return load_file(folder / name)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_validation_leaves_training_bit_identical(tmp_path, tiny_model, instance_dir, lora):
    """Runs with and without validation (held-out loss and three prompts) end with the same
    weights, bit for bit; the validation grid has one row per prompt, the first row equal to
    the single-prompt run's grid; val_loss is logged at steps 0, 2 and 4 and reproducible."""
    held_out = write_subject_photos(tmp_path / "held-out", count=3, size=48)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two more\na sks dog on the beach\n\na red sks dog\n")
    common = dict(max_train_steps=4, validation_steps=2, num_validation_images=2,
                  validation_prompt="a photo of sks dog", train_text_encoder=not lora)
    if lora:
        common.update(use_lora=True, rank=4, lora_dropout=0.1)  # eval mode: no dropout in val
    plain = train(tiny_config(tiny_model, instance_dir, tmp_path / "plain", **common))
    probe = _Probe()
    validated = train(tiny_config(
        tiny_model, instance_dir, tmp_path / "validated", validation_data_dir=str(held_out),
        validation_prompts=str(prompts), report_to="tensorboard,csv", **common),
        callbacks=[probe])

    a, b = _unet(plain, lora), _unet(validated, lora)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)

    events = _tensorboard(validated)
    losses = {event.step: event.value for event in events.Scalars("val_loss")}
    assert sorted(losses) == [0, 2, 4] and all(math.isfinite(v) for v in losses.values())
    assert losses[4] < losses[0]  # a learning rate of 1e-3 on similar photos
    assert {f"val_loss_t{t}" for t in (125, 375, 625, 875)} <= set(events.Tags()["scalars"])
    assert probe.again["val_loss"] == pytest.approx(losses[4], rel=1e-6)
    assert [e.step for e in events.Images("validation/02")] == [2, 4]

    single = np.asarray(Image.open(plain / "validation" / "step-000004.png"))
    rows = np.asarray(Image.open(validated / "validation" / "step-000004.png"))
    assert single.shape == (32, 64, 3) and rows.shape == (96, 64, 3)
    assert np.array_equal(rows[:32], single)
    assert not np.array_equal(rows[32:64], single)


def test_validation_loss_for_each_family(tmp_path, family_model, instance_dir):
    """SD 1.x, SD 2.x and SDXL (pooled embeddings, time ids) score the held-out photos."""
    family, model = family_model
    held_out = write_subject_photos(tmp_path / "held-out", count=2, size=40)
    probe = _Probe()
    output = train(tiny_config(model, instance_dir, tmp_path / "out", max_train_steps=1,
                               validation_data_dir=str(held_out), report_to="csv"),
                   callbacks=[probe])
    lines = (output / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    values = {int(row["step"]): float(row["val_loss"]) for row in rows if row["val_loss"]}
    assert sorted(values) == [0, 1], family
    assert all(math.isfinite(v) and v > 0 for v in values.values())
    assert probe.again["val_loss"] == pytest.approx(values[1], rel=1e-6)
