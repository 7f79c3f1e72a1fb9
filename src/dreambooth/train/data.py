"""Instance and class images as batches of cached latents, one batch per training micro-step.

The VAE is frozen, so each image (and its mirror image with `random_flip`) is encoded once and
its latent distribution (mean, std) is cached; a batch draws `mean + std * eps` from it.

Micro-step i's batch is a pure function of (seed, i): the global batch of G = batch x world
samples has slots j = 0..G-1, sample number n = i * G + j walks through a fresh permutation of
the images every epoch, and rank r takes slots [r * batch, (r + 1) * batch). So 1 process with
batch 2 and 2 processes with batch 1 see the same samples, and a resumed run picks up at
micro-step `global_step * accumulation` with the same data an uninterrupted run would see.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dreambooth import seeding
from dreambooth.images import list_image_files, load_image_folder, pil_to_tensor, resize_and_crop

log = logging.getLogger(__name__)


class LatentCache:
    """Latent distributions of one image set: (N, V, C, h, w) means and stds, V views per image.

    `time_ids` (N, V, 6) hold SDXL's size conditioning per view: original (height, width),
    crop (top, left) and target (height, width), as in the SDXL paper (sec. 2.2).
    """

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, time_ids: torch.Tensor):
        self.means, self.stds, self.time_ids = means, stds, time_ids

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def num_views(self) -> int:
        return self.means.shape[1]

    @classmethod
    @torch.no_grad()
    def encode(cls, folder: Path, *, role: str, vae, resolution: int, center_crop: bool,
               random_flip: bool, seed: int, limit: int | None = None,
               batch_size: int = 8) -> "LatentCache":
        """Read `folder` robustly, crop, and encode every image (and its mirror) with `vae`."""
        images = load_image_folder(folder, role=role, min_size=resolution)[:limit]
        pixels, time_ids = [], []
        for index, (_, image) in enumerate(images):
            crop_generator = seeding.generator(seed, seeding.CROP, role == "class", index)
            crop, (top, left), (_, resized_width) = resize_and_crop(
                image, resolution, center_crop, generator=crop_generator)
            view = pil_to_tensor(crop)
            ids = [[image.height, image.width, top, left, resolution, resolution]]
            if random_flip:  # the mirrored crop starts where the original one ended
                ids.append([image.height, image.width, top, resized_width - left - resolution,
                            resolution, resolution])
            pixels.append(torch.stack([view, view.flip(-1)]) if random_flip else view[None])
            time_ids.append(torch.tensor(ids, dtype=torch.float32))
        pixels = torch.stack(pixels)  # (N, V, 3, H, W) in [-1, 1]
        n, v = pixels.shape[:2]
        device, dtype = vae.device, vae.dtype
        means, stds = [], []
        flat = pixels.flatten(0, 1)
        for start in range(0, flat.shape[0], batch_size):
            chunk = flat[start:start + batch_size].to(device=device, dtype=dtype)
            dist = vae.encode(chunk).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        means = torch.cat(means).unflatten(0, (n, v))
        stds = torch.cat(stds).unflatten(0, (n, v))
        log.info("encoded %d %s image(s) x %d view(s) into latents %s", n, role, v,
                 tuple(means.shape[2:]))
        return cls(means, stds, torch.stack(time_ids))


class _EpochOrder:
    """Sample number n -> image index, through a new seeded permutation each epoch."""

    def __init__(self, size: int, seed: int, stream: int):
        self.size, self.seed, self.stream = size, seed, stream
        self._permutations: dict[int, torch.Tensor] = {}

    def __call__(self, n: int) -> int:
        epoch, position = divmod(n, self.size)
        if epoch not in self._permutations:
            if len(self._permutations) > 64:
                self._permutations.clear()
            self._permutations[epoch] = torch.randperm(
                self.size, generator=seeding.generator(self.seed, self.stream, epoch))
        return int(self._permutations[epoch][position])


class MicroStepBatches(Dataset):
    """Item i is this rank's batch for micro-step i: latents, per-sample seeds, prior mask.

    Returns `latents` (B or 2B, C, h, w) scaled by the VAE's scaling factor, instance samples
    first and then as many class samples; `seeds` (same length) from which the training step
    draws noise and timesteps; `time_ids` (B, 6) for SDXL; `is_prior` marking class samples.
    """

    def __init__(self, instance: LatentCache, prior: LatentCache | None, *, batch_size: int,
                 num_micro_steps: int, seed: int, rank: int, world_size: int,
                 scaling_factor: float):
        self.instance, self.prior = instance, prior
        self.batch_size, self.num_micro_steps = batch_size, num_micro_steps
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.scaling_factor = scaling_factor
        self._instance_order = _EpochOrder(len(instance), seed, seeding.INSTANCE_ORDER)
        self._prior_order = _EpochOrder(len(prior), seed, seeding.CLASS_ORDER) if prior else None

    def __len__(self) -> int:
        return self.num_micro_steps

    def _draw(self, cache: LatentCache, order: _EpochOrder, kind: int, micro_step: int):
        global_batch = self.batch_size * self.world_size
        latents, seeds, time_ids = [], [], []
        for slot in range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size):
            n = micro_step * global_batch + slot
            sample_generator = seeding.generator(self.seed, seeding.SAMPLE, kind, n)
            view = int(torch.randint(cache.num_views, (1,), generator=sample_generator))
            image = order(n)
            mean, std = cache.means[image, view], cache.stds[image, view]
            eps = torch.randn(mean.shape, generator=sample_generator)
            latents.append((mean + std * eps) * self.scaling_factor)  # (C, h, w)
            seeds.append(seeding.derive_seed(self.seed, seeding.SAMPLE, kind, n, 1))
            time_ids.append(cache.time_ids[image, view])
        return latents, seeds, time_ids

    def __getitem__(self, micro_step: int) -> dict[str, torch.Tensor]:
        latents, seeds, time_ids = self._draw(self.instance, self._instance_order, 0, micro_step)
        is_prior = [False] * len(latents)
        if self.prior is not None:
            prior = self._draw(self.prior, self._prior_order, 1, micro_step)
            latents, seeds, time_ids = latents + prior[0], seeds + prior[1], time_ids + prior[2]
            is_prior += [True] * len(prior[0])
        return {
            "latents": torch.stack(latents),
            "seeds": torch.tensor(seeds, dtype=torch.int64),
            "time_ids": torch.stack(time_ids),  # (B, 6) SDXL size conditioning
            "is_prior": torch.tensor(is_prior),
            "micro_step": torch.tensor(micro_step),
        }


class ResumingSampler(Sampler[int]):
    """Yields micro-steps from where training stands (`first_micro_step()`) to the end.

    Its length is the whole run, which is what Lightning's epoch loop counts against after a
    restart (it restores the number of batches already seen).
    """

    def __init__(self, num_micro_steps: int, first_micro_step: Callable[[], int]):
        self.num_micro_steps, self.first_micro_step = num_micro_steps, first_micro_step

    def __len__(self) -> int:
        return self.num_micro_steps

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first_micro_step(), self.num_micro_steps))


class ResumableLoader(DataLoader):
    """A DataLoader whose position is derived from the trainer's global step.

    It has nothing of its own to save; the state_dict methods tell Lightning it is resumable.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DreamBoothDataModule(L.LightningDataModule):
    """Owns the instance and class images: reads, crops and encodes them once, then serves
    one deterministic batch per micro-step."""

    def __init__(self, *, instance_data_dir: str | Path, class_data_dir: str | Path | None,
                 num_class_images: int, resolution: int, center_crop: bool, random_flip: bool,
                 train_batch_size: int, gradient_accumulation_steps: int, max_train_steps: int,
                 seed: int, vae):
        super().__init__()
        self.instance_data_dir = Path(instance_data_dir)
        self.class_data_dir = Path(class_data_dir) if class_data_dir else None
        self.num_class_images = num_class_images
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.train_batch_size = train_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_train_steps = max_train_steps
        self.seed = seed
        self.vae = vae
        self.instance: LatentCache | None = None
        self.prior: LatentCache | None = None

    def encode_images(self) -> None:
        """Encode instance and class images once, with the VAE wherever the trainer put it.

        Runs at the first `train_dataloader()` call, after callbacks' setup has generated any
        missing class images and after the strategy has moved the model to its device.
        """
        if self.instance is not None:
            return
        common = dict(vae=self.vae, resolution=self.resolution, center_crop=self.center_crop,
                      random_flip=self.random_flip, seed=self.seed)
        self.instance = LatentCache.encode(self.instance_data_dir, role="instance", **common)
        if self.class_data_dir is not None:
            self.prior = LatentCache.encode(self.class_data_dir, role="class",
                                            limit=self.num_class_images, **common)
            if len(self.prior) < self.num_class_images:
                log.warning("class_data_dir '%s' has %d readable images, fewer than "
                            "num_class_images=%d", self.class_data_dir, len(self.prior),
                            self.num_class_images)

    def train_dataloader(self) -> DataLoader:
        self.encode_images()
        trainer = self.trainer
        num_micro_steps = self.max_train_steps * self.gradient_accumulation_steps
        dataset = MicroStepBatches(
            self.instance, self.prior, batch_size=self.train_batch_size,
            num_micro_steps=num_micro_steps, seed=self.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            scaling_factor=self.vae.config.scaling_factor,
        )
        sampler = ResumingSampler(
            num_micro_steps,
            lambda: trainer.global_step * self.gradient_accumulation_steps if trainer else 0)
        return ResumableLoader(dataset, batch_size=None, sampler=sampler)


def steps_for_epochs(instance_data_dir: str | Path, *, num_class_images: int, with_prior: bool,
                     num_train_epochs: int, train_batch_size: int,
                     gradient_accumulation_steps: int, repeats: int = 1) -> int:
    """diffusers' rule for max_train_steps when only epochs are given (per device)."""
    dataset_size = len(list_image_files(Path(instance_data_dir))) * repeats
    if with_prior:
        dataset_size = max(dataset_size, num_class_images)
    batches = math.ceil(dataset_size / train_batch_size)
    return max(1, num_train_epochs * math.ceil(batches / gradient_accumulation_steps))
