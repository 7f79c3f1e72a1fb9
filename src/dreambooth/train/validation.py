"""Validation loss on held-out photos: the DreamBooth objective at fixed timesteps and noise.

Every `every_n_steps` optimizer steps (and before the first and after the last), each held-out
image i is scored at K fixed timesteps t_k spread over [0, T) with fixed noise eps_ik:
    val_loss = 1/(N K) sum_i sum_k ||target_ik - eps_hat(z_t_k(x_i, eps_ik), t_k, c_i)||^2
with the model's own target (eps, or v for v-prediction), no loss weighting and no offset noise,
so values are comparable across runs and settings. Images are encoded once (the VAE is frozen;
the posterior mean is used) and the noise comes from `seeding.VALIDATION_LOSS`, so every
evaluation sees the same inputs and only the weights change between two values.

It runs in eval mode without gradients and draws nothing from a global RNG: training is
exactly the same with and without it (tests/test_validation.py compares the weights).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from dreambooth import seeding
from dreambooth.images import load_image_folder
from dreambooth.train.callbacks import sampling_context
from dreambooth.train.captions import concept_captions, is_companion
from dreambooth.train.data import crop_to_bucket, encode_crops

log = logging.getLogger(__name__)

NUM_VALIDATION_TIMESTEPS = 4


def fixed_timesteps(num_train_timesteps: int, count: int = NUM_VALIDATION_TIMESTEPS
                    ) -> torch.Tensor:
    """`count` timesteps at the middles of equal bins of [0, T): 125, 375, 625, 875 for T=1000."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * num_train_timesteps
            / count).long()


class ValidationLoss(Callback):
    """Logs `val_loss` (and `val_loss_t{t}` per fixed timestep) on `data_dir`'s images."""

    def __init__(self, data_dir: str | Path, *, instance_prompt: str, every_n_steps: int,
                 resolution: int, seed: int, caption_extension: str = ".txt",
                 batch_size: int = 8, num_timesteps: int = NUM_VALIDATION_TIMESTEPS):
        self.data_dir = Path(data_dir)
        self.instance_prompt, self.every_n_steps = instance_prompt, every_n_steps
        self.resolution, self.seed = resolution, seed
        self.caption_extension = caption_extension
        self.batch_size, self.num_timesteps = batch_size, num_timesteps
        self.latents: torch.Tensor | None = None  # (N, C, h, w), scaled like training latents
        self.time_ids: torch.Tensor | None = None  # (N, 6) SDXL size conditioning
        self.noise: torch.Tensor | None = None  # (N, K, C, h, w)
        self.timesteps: torch.Tensor | None = None  # (K,)
        self.captions: list[str] = []
        self._last_step = -1

    # ------------------------------------------------------------------------ data
    def prepare(self, pl_module) -> None:
        """Encode the held-out images once and draw their fixed noise (CPU tensors)."""
        if self.latents is not None:
            return
        # Held-out photos get the caption training would give them (sidecar files,
        # metadata.jsonl, [trigger]; else the instance prompt) and a centered square crop.
        companion = lambda path: is_companion(path, self.caption_extension)  # noqa: E731
        images = load_image_folder(self.data_dir, role="validation", min_size=self.resolution,
                                   companion=companion)
        captions = concept_captions(self.data_dir, self.instance_prompt, self.caption_extension)
        square = (self.resolution, self.resolution)
        crops = [crop_to_bucket(image, square, generator=None, random_flip=False, mask=None,
                                latent_factor=1, unmasked_weight=1.0) for _, image in images]
        means = torch.stack([mean[0] for mean, _ in encode_crops(crops, pl_module.vae)])
        self.latents = means * pl_module.vae.config.scaling_factor  # the posterior means
        self.time_ids = torch.stack([crop.time_ids[0] for crop in crops])
        self.captions = [captions.get(path, self.instance_prompt) for path, _ in images]
        self.timesteps = fixed_timesteps(
            pl_module.noise_scheduler.config.num_train_timesteps, self.num_timesteps)
        shape = (self.num_timesteps, *self.latents.shape[1:])
        self.noise = torch.stack([
            torch.randn(shape, generator=seeding.generator(self.seed, seeding.VALIDATION_LOSS,
                                                           index))
            for index in range(len(images))])

    def conditioning(self, pl_module, rows: torch.Tensor, time_ids: torch.Tensor) -> dict:
        """UNet keyword arguments for held-out images `rows`, through the module's own
        conditioning (each image's caption; SDXL's pooled embeddings and time ids included)."""
        return pl_module.unet_conditioning([self.captions[int(row)] for row in rows], time_ids)

    # ---------------------------------------------------------------------- scoring
    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        """The mean loss over images and timesteps, and the mean per timestep."""
        self.prepare(pl_module)
        num_images, k = self.latents.shape[0], self.num_timesteps
        # Items (image, timestep), image-major: (N K,) rows of the tensors below.
        rows = torch.arange(num_images).repeat_interleave(k)
        timesteps = self.timesteps.repeat(num_images)
        noise = self.noise.flatten(0, 1)
        sums = torch.zeros(k, dtype=torch.float64)
        device = pl_module.device
        with sampling_context(trainer, pl_module,
                              move_encoders=pl_module.prompt_embeds is None):
            for start in range(0, rows.shape[0], self.batch_size):
                chunk = rows[start:start + self.batch_size]
                latents = self.latents[chunk].to(device)  # (b, C, h, w)
                eps = noise[start:start + self.batch_size].to(latents)
                t = timesteps[start:start + self.batch_size].to(device)
                noisy_latents = pl_module.noise_scheduler.add_noise(latents, eps, t)
                model_pred = pl_module.unet(
                    noisy_latents, t,
                    **self.conditioning(pl_module, chunk, self.time_ids[chunk].to(device))).sample
                target = pl_module.diffusion_target(latents, eps, t)
                per_item = F.mse_loss(model_pred.float(), target.float(),
                                      reduction="none").mean(dim=(1, 2, 3))  # (b,)
                sums.index_add_(0, (torch.arange(start, start + len(chunk)) % k),
                                per_item.double().cpu())
        per_timestep = sums / num_images
        metrics = {"val_loss": float(per_timestep.mean())}
        for t, value in zip(self.timesteps.tolist(), per_timestep.tolist()):
            metrics[f"val_loss_t{t}"] = value
        return metrics

    def run(self, trainer, pl_module) -> dict[str, float]:
        if not trainer.is_global_zero:
            return {}
        step = trainer.global_step
        metrics = self.evaluate(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        log.info("val_loss at step %d: %.5f (%d held-out image(s) x %d timesteps)", step,
                 metrics["val_loss"], self.latents.shape[0], self.num_timesteps)
        return metrics

    # ------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:  # the base model's value, the curve's first point
            self._last_step = 0
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._last_step and step % self.every_n_steps == 0 and step > 0:
            self._last_step = step
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.run(trainer, pl_module)
