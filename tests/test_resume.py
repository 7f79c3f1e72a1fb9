"""Exact resume: a run stopped at a checkpoint and resumed ends with the same weights."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from dreambooth.train.checkpointing import AtomicCheckpointIO, check_resume, list_checkpoints
from dreambooth.train.data import steps_for_epochs
from dreambooth.train.run import resolve_config, train


class InterruptAt(L.Callback):
    """Raises KeyboardInterrupt (as Ctrl-C would) after micro-batch `batch_index`."""

    def __init__(self, batch_index: int):
        self.batch_index = batch_index

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_index:
            raise KeyboardInterrupt


def trained_weights(output_dir):
    weights = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    text = load_file(output_dir / "text_encoder" / "model.safetensors")
    return {**{f"unet.{k}": v for k, v in weights.items()},
            **{f"te.{k}": v for k, v in text.items()}}


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst}"


@pytest.fixture
def prior_setup(tmp_path, tiny_model, instance_dir):
    common = dict(with_prior_preservation=True, class_prompt="a photo of dog",
                  class_data_dir=str(tmp_path / "class"), num_class_images=3,
                  train_text_encoder=True, gradient_accumulation_steps=2, max_train_steps=6,
                  checkpointing_steps=2, lr_scheduler="cosine", lr_warmup_steps=2,
                  offset_noise=True, snr_gamma=5.0)
    return tmp_path, tiny_model, instance_dir, common


def test_ctrl_c_mid_accumulation_then_resume_latest_matches_uninterrupted(prior_setup):
    tmp_path, model, instance, common = prior_setup
    reference = train(tiny_config(model, instance, tmp_path / "reference", **common))

    interrupted = tmp_path / "interrupted"
    # Micro-batch 6 is the first half of optimizer step 4: its checkpoint is step 3's state.
    with pytest.raises(SystemExit):
        train(tiny_config(model, instance, interrupted, **common), callbacks=[InterruptAt(6)])
    assert not (interrupted / "model_index.json").exists()  # no export on interrupt
    steps = [step for step, _ in list_checkpoints(interrupted / "checkpoints")]
    assert steps == [2, 3]
    resumed = train(tiny_config(model, instance, interrupted, resume_from_checkpoint="latest",
                                seed=None, **{k: v for k, v in common.items()}))
    assert_same_weights(trained_weights(reference), trained_weights(resumed))
    base = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    moved = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(base[k], moved[k]) for k in base), "training changed nothing"


def test_resume_from_named_periodic_checkpoint(tmp_path, tiny_model, instance_dir):
    common = dict(max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=2)
    reference = train(tiny_config(tiny_model, instance_dir, tmp_path / "run", **common))
    kept = [step for step, _ in list_checkpoints(reference / "checkpoints")]
    assert kept == [4, 6]  # total limit keeps the newest two
    # A second run copies the step-4 checkpoint and resumes from it by name.
    second = tmp_path / "second"
    (second / "checkpoints").mkdir(parents=True)
    shutil.copy(reference / "checkpoints" / "checkpoint-4.ckpt", second / "checkpoints")
    resumed = train(tiny_config(tiny_model, instance_dir, second,
                                resume_from_checkpoint="checkpoint-4", **common))
    assert_same_weights(trained_weights(reference), trained_weights(resumed))


def test_checkpoint_holds_only_trainable_weights_and_run_state(tmp_path, tiny_model, instance_dir):
    run = train(tiny_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=2,
                            checkpointing_steps=2))
    checkpoint = torch.load(run / "checkpoints" / "checkpoint-2.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all(key.startswith("unet.") for key in checkpoint["state_dict"])
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]
    assert {"torch", "numpy", "python"} <= checkpoint["rng_states"].keys()
    assert checkpoint["dreambooth_config"]["seed"] == 7


def test_resume_with_changed_batch_size_is_refused(tmp_path, tiny_model, instance_dir):
    run = train(tiny_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=2,
                            checkpointing_steps=2))
    with pytest.raises(ValueError, match="train_batch_size"):
        train(tiny_config(tiny_model, instance_dir, run, max_train_steps=4, train_batch_size=1,
                          resume_from_checkpoint="latest"))


def test_resume_from_missing_checkpoint_names_it(tmp_path, tiny_model, instance_dir):
    with pytest.raises(FileNotFoundError, match="checkpoint-99"):
        train(tiny_config(tiny_model, instance_dir, tmp_path / "run",
                          resume_from_checkpoint="checkpoint-99"))


def test_atomic_checkpoint_write_keeps_previous_file_on_crash(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint-1.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": torch.tensor(1)}, target)

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": torch.tensor(2)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1.ckpt"]


def test_resolve_config_fills_seed_steps_and_guidance_scales(tmp_path, tiny_model, instance_dir):
    config = tiny_config(tiny_model, instance_dir, tmp_path / "run", seed=None,
                         max_train_steps=None, num_train_epochs=3, train_batch_size=3)
    resolved = resolve_config(config)
    assert isinstance(resolved.optim.seed, int)
    assert resolved.optim.max_train_steps == steps_for_epochs(
        4, num_class_images=100, with_prior=False, num_train_epochs=3,
        train_batch_size=3, gradient_accumulation_steps=1) == 6  # 3 epochs of 2 batches of 4
    assert resolved.prior.class_guidance_scale == 7.5  # SD's, the tiny model records none
    assert resolved.validation.validation_guidance_scale == 7.5
    assert config.optim.seed is None and config.optim.max_train_steps is None  # not mutated
    # Resuming: an unset seed is the checkpoint's; a set one stays (the resume check refuses
    # it when it differs).
    assert resolve_config(config, {"seed": 11}).optim.seed == 11
    assert resolve_config(tiny_config(tiny_model, instance_dir, tmp_path / "run", seed=5),
                          {"seed": 11}).optim.seed == 5


def test_resume_check_lists_every_difference_and_skips_keys_the_checkpoint_lacks():
    with pytest.raises(ValueError) as error:
        check_resume("run/checkpoint-4.ckpt", {"seed": 1, "rank": 4, "resolution": 64},
                     {"seed": 1, "rank": 8, "resolution": 32, "use_lora": True},
                     ("seed", "rank", "resolution", "use_lora"), advice="Start anew.")
    assert str(error.value) == (
        "cannot resume exactly from 'run/checkpoint-4.ckpt': rank: checkpoint has 4, this run "
        "has 8; resolution: checkpoint has 64, this run has 32. Start anew.")
