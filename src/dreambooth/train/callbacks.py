"""Side jobs of a training run as Lightning callbacks: class images before, samples during."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from dreambooth import seeding
from dreambooth.images import make_grid, save_png
from dreambooth.models import DiffusionComponents, assemble_pipeline
from dreambooth.train.class_images import missing_class_images
from dreambooth.train.ema import ema_weights

log = logging.getLogger(__name__)


@contextlib.contextmanager
def sampling_context(trainer, pl_module, *, move_encoders: bool = True):
    """Eval mode, no grad, the run's autocast, and (with `move_encoders`) the text encoders on
    the device; afterwards every submodule's own mode and the encoders' devices come back.

    Modes are restored module by module, not with `.train(flag)`: the UNet is loaded in eval
    mode while peft's LoRA dropout layers are created in train mode, and one flag for the whole
    tree would switch that dropout off for the rest of the run.
    """
    encoders = pl_module.text_encoders
    encoder_devices = [encoder.device for encoder in encoders]
    modes = [(module, module.training)
             for root in (pl_module.denoiser, *encoders) for module in root.modules()]
    pl_module.denoiser.eval()
    for encoder in encoders:
        (encoder.to(pl_module.device) if move_encoders else encoder).eval()
    try:
        with torch.no_grad(), trainer.strategy.precision_plugin.forward_context():
            yield
    finally:
        for module, training in modes:
            module.training = training
        for encoder, device in zip(encoders, encoder_devices):
            encoder.to(device)


class ClassImageGeneration(Callback):
    """Before training, the frozen base model fills `class_data_dir` up to `num_class_images`.

    Every rank computes the same list of missing images, then generates its share
    (indices[rank::world_size]) on its own device; a barrier waits for all of them. With
    `precision` (prior_generation_precision) the base model is loaded apart in that precision
    for it, else the live (not yet trained) modules generate. `max_sequence_length`: T5 tokens
    of SD 3.x and FLUX.1 prompts (None for the UNet families).
    """

    def __init__(self, components: DiffusionComponents, *, class_data_dir: str | Path,
                 class_prompt: str, num_class_images: int, seed: int, sample_batch_size: int,
                 num_inference_steps: int, guidance_scale: float, resolution: int,
                 precision: str | None = None, max_sequence_length: int | None = None):
        self.components = components
        self.class_data_dir = Path(class_data_dir)
        self.class_prompt, self.num_class_images = class_prompt, num_class_images
        self.seed, self.sample_batch_size = seed, sample_batch_size
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.resolution = resolution
        self.precision, self.max_sequence_length = precision, max_sequence_length

    def setup(self, trainer, pl_module, stage: str) -> None:
        missing = missing_class_images(self.class_data_dir, self.num_class_images)
        trainer.strategy.barrier("class-images-listed")  # nobody writes before all have listed
        share = missing[trainer.global_rank::trainer.world_size]
        if missing and trainer.is_global_zero:
            log.info("generating %d class image(s) for %r into %s on %d process(es)",
                     len(missing), self.class_prompt, self.class_data_dir, trainer.world_size)
        if share:
            from dreambooth.train.class_images import generate_class_images

            device = trainer.strategy.root_device
            arguments = dict(
                class_prompt=self.class_prompt, seed=self.seed, batch_size=self.sample_batch_size,
                num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                resolution=self.resolution, show_progress=trainer.is_global_zero,
                max_sequence_length=self.max_sequence_length)
            if self.precision is not None:
                from dreambooth.models import load_pipeline

                dtype = "fp32" if self.precision == "no" else self.precision
                pipeline = load_pipeline(self.components.path, device=str(device), dtype=dtype)
                generate_class_images(pipeline, self.class_data_dir, share, **arguments)
                del pipeline
            else:
                for module in (pl_module.denoiser, pl_module.vae,
                               *self.components.text_encoders):
                    module.to(device)
                pipeline = assemble_pipeline(self.components)
                with sampling_context(trainer, pl_module):
                    generate_class_images(pipeline, self.class_data_dir, share, **arguments)
        trainer.strategy.barrier("class-images-written")


class ValidationSamples(Callback):
    """Every `every_n_steps` optimizer steps (and at the end), sample each of `prompts` with the
    same fixed seeds and classifier-free guidance; save a grid (one row per prompt when there
    are several) and log the images to the trackers. With use_ema the samples come from the EMA
    weights (train/ema.py)."""

    def __init__(self, components: DiffusionComponents, *, prompts: list[str], every_n_steps: int,
                 num_images: int, num_inference_steps: int, guidance_scale: float, seed: int,
                 resolution: int, output_dir: str | Path, max_sequence_length: int | None = None):
        if not prompts:
            raise ValueError("ValidationSamples needs at least one prompt")
        self.components = components
        self.prompts, self.every_n_steps, self.num_images = list(prompts), every_n_steps, num_images
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.seeds = seeding.validation_seeds(seed, num_images)
        self.resolution = resolution
        self.output_dir = Path(output_dir)
        self.max_sequence_length = max_sequence_length  # SD 3.x / FLUX.1: sampled with T5
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._last_step and step % self.every_n_steps == 0 and step > 0:
            self._last_step = step
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.sample(trainer, pl_module)

    def sample(self, trainer, pl_module) -> list:
        """The images of every prompt, prompt by prompt (each with the same seeds)."""
        if not trainer.is_global_zero:
            return []
        from dreambooth.generate import sample_images  # (diffusers' pipelines: only when used)

        pipeline = assemble_pipeline(self.components)
        rows = []
        with ema_weights(trainer), sampling_context(trainer, pl_module):  # EMA's, if kept
            # One batch per prompt (all its seeds): a prompt's images are the same bits
            # whatever other prompts are validated beside it.
            for prompt in self.prompts:
                if self.max_sequence_length is not None:
                    from dreambooth.flow import sampling

                    # The module's text tables: T5 may be released by now.
                    rows.append(sampling.sample_images(
                        pipeline, prompt, seeds=self.seeds,
                        num_inference_steps=self.num_inference_steps,
                        guidance_scale=self.guidance_scale, height=self.resolution,
                        width=self.resolution, max_sequence_length=self.max_sequence_length,
                        conditioning=pl_module.text_conditioning))
                    continue
                rows.append(sample_images(pipeline, prompt, seeds=self.seeds,
                                          num_inference_steps=self.num_inference_steps,
                                          guidance_scale=self.guidance_scale,
                                          height=self.resolution, width=self.resolution))
        images = [image for row in rows for image in row]
        step = trainer.global_step
        grid_path = self.output_dir / f"step-{step:06d}.png"
        # One prompt keeps the square-ish grid it always had; several get one row each.
        grid = make_grid(images, columns=self.num_images if len(rows) > 1 else None)
        save_png(grid, grid_path, text={"prompt": "\n".join(self.prompts),
                                        "seeds": ",".join(map(str, self.seeds)),
                                        "step": str(step)})
        self._log_to_trackers(trainer, rows, grid, step)
        log.info("validation samples for %d prompt(s) at step %d: %s", len(rows), step, grid_path)
        return images

    def _tags(self) -> list[str]:
        """Tracker keys: 'validation' for one prompt, 'validation/00' ... for several."""
        if len(self.prompts) == 1:
            return ["validation"]
        return [f"validation/{index:02d}" for index in range(len(self.prompts))]

    def _log_to_trackers(self, trainer, rows: list[list], grid, step: int) -> None:
        from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                if len(rows) > 1:  # which prompt each tag shows
                    logger.experiment.add_text("validation_prompts", "\n\n".join(
                        f"{tag}: {prompt}" for tag, prompt in zip(self._tags(), self.prompts)),
                        step)
                for tag, images in zip(self._tags(), rows):
                    arrays = np.stack([np.asarray(image) for image in images])  # (N, H, W, 3)
                    logger.experiment.add_images(tag, arrays, step, dataformats="NHWC")
            elif isinstance(logger, WandbLogger):
                for tag, prompt, images in zip(self._tags(), self.prompts, rows):
                    logger.log_image(key=tag, images=list(images), step=step,
                                     caption=[prompt] * len(images))
            elif isinstance(logger, MLFlowLogger):
                logger.experiment.log_image(logger.run_id, grid,
                                            f"validation/step-{step:06d}.png")
