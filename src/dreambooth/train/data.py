"""Instance and class images as batches of cached latents, one batch per training micro-step.

The VAE is frozen, so each image (and its mirror image with `random_flip`) is resized to its
bucket (buckets.py; without aspect buckets the one square), cropped, encoded once, and its
latent distribution (mean, std) is cached with its caption, concept and mask weights; a batch
draws `mean + std * eps` from it.

Micro-step i's batch is a pure function of (seed, i). The global batch of G = batch x world
samples comes from one bucket. Bucket b has E_b entries (each of its photos `repeats` times,
its concept's) and so E_b / G batches per round: round r holds
floor((r + 1) E_b / G) - floor(r E_b / G) batches of bucket b, in a seeded order per round (one
bucket: no order to draw), so every bucket is drawn in proportion to its entries however they
round. Batch j of bucket b takes slots j * G .. j * G + G - 1 of bucket b's sample stream,
which walks through a fresh permutation of the bucket's entries every epoch; rank r takes
slots [r * batch, (r + 1) * batch). So 1 process with batch 2 and 2 processes with batch 1 see
the same samples, and a resumed run picks up at micro-step `global_step * accumulation` with
the same data an uninterrupted run would see. Sample number n = i * G + slot seeds the
sample's view, posterior noise and caption (dropout, shuffle) and its training noise. With
one bucket, batch j is micro-step j: the plain DreamBooth stream.

With prior preservation each instance sample brings a class sample of its concept's class
from the same bucket: class images are bucketed like the photos, and where a bucket holds no
class image of that class, the class images are also encoded center-cropped to that bucket.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from dreambooth import seeding
from dreambooth.images import load_image_folder, pil_to_tensor
from dreambooth.train.buckets import BucketSettings, Size, assign_bucket, cover_size, make_buckets
from dreambooth.train.captions import CaptionSettings, is_companion, step_caption
from dreambooth.train.concepts import Concept
from dreambooth.train.masks import MaskSettings, load_mask, mask_weights

log = logging.getLogger(__name__)


@dataclass
class CachedImage:
    """One image, ready for batches: V views (V = 2 with `random_flip`: it and its mirror).

    `time_ids` (V, 6) hold SDXL's size conditioning per view: original (height, width),
    crop (top, left) and target (height, width), as in the SDXL paper (sec. 2.2).
    """

    means: torch.Tensor  # (V, C, h, w)
    stds: torch.Tensor  # (V, C, h, w)
    time_ids: torch.Tensor  # (V, 6)
    weights: torch.Tensor | None  # (V, 1, h, w) loss weights from its mask; None: all 1
    caption: str
    concept: int
    bucket: Size  # (width, height) in pixels

    @property
    def num_views(self) -> int:
        return self.means.shape[0]


@dataclass
class _Crop:
    pixels: torch.Tensor  # (V, 3, H, W) in [-1, 1]
    time_ids: torch.Tensor  # (V, 6)
    weights: torch.Tensor | None  # (V, 1, h, w)


def crop_to_bucket(image: Image.Image, bucket: Size, *, generator: torch.Generator | None,
                   random_flip: bool, mask: Image.Image | None, latent_factor: int,
                   unmasked_weight: float) -> _Crop:
    """Scale `image` (and its mask) to cover `bucket`, crop what is left over (centered without
    a generator), and make the views: the crop and, with `random_flip`, its mirror."""
    width, height = cover_size(image.size, bucket)
    resized = image
    if (width, height) != image.size:
        # LANCZOS keeps detail when shrinking; BICUBIC rings less when enlarging.
        shrink = width < image.width
        resized = image.resize((width, height), resample=Image.Resampling.LANCZOS if shrink
                               else Image.Resampling.BICUBIC)
    max_left, max_top = width - bucket[0], height - bucket[1]
    if generator is None:
        left, top = max_left // 2, max_top // 2
    else:
        left = int(torch.randint(0, max_left + 1, (1,), generator=generator).item())
        top = int(torch.randint(0, max_top + 1, (1,), generator=generator).item())
    box = (left, top, left + bucket[0], top + bucket[1])
    view = pil_to_tensor(resized.crop(box))
    ids = [[image.height, image.width, top, left, bucket[1], bucket[0]]]
    weights = None
    if mask is not None:
        mask_crop = mask.resize((width, height), resample=Image.Resampling.BILINEAR).crop(box)
        latent_size = (bucket[0] // latent_factor, bucket[1] // latent_factor)
        weights = mask_weights(mask_crop, latent_size, unmasked_weight)[None]  # (1, 1, h, w)
    if random_flip:  # the mirrored crop starts where the original one ended
        ids.append([image.height, image.width, top, width - left - bucket[0], bucket[1],
                    bucket[0]])
        view = torch.stack([view, view.flip(-1)])
        if weights is not None:
            weights = torch.cat([weights, weights.flip(-1)])
    else:
        view = view[None]
    return _Crop(view, torch.tensor(ids, dtype=torch.float32), weights)


@torch.no_grad()
def encode_crops(crops: list[_Crop], vae, batch_size: int = 8
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(means, stds), each (V, C, h, w), of every crop, encoding crops of one size together."""
    results: list = [None] * len(crops)
    by_shape: dict[tuple, list[int]] = {}
    for index, crop in enumerate(crops):
        by_shape.setdefault(tuple(crop.pixels.shape), []).append(index)
    for indices in by_shape.values():
        pixels = torch.stack([crops[i].pixels for i in indices])  # (N, V, 3, H, W)
        n, v = pixels.shape[:2]
        flat = pixels.flatten(0, 1)
        means, stds = [], []
        for start in range(0, flat.shape[0], batch_size):
            chunk = flat[start:start + batch_size].to(device=vae.device, dtype=vae.dtype)
            dist = vae.encode(chunk).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        means = torch.cat(means).unflatten(0, (n, v))
        stds = torch.cat(stds).unflatten(0, (n, v))
        for row, index in enumerate(indices):
            results[index] = (means[row], stds[row])
    return results


class _EpochOrder:
    """Sample number n -> entry index, through a new seeded permutation each epoch.

    The permutation of epoch e is drawn from generator(seed, stream, e, *keys): with keys
    (0,) the same as without (SeedSequence pads with zeros), so bucket 0 keeps the stream
    runs without buckets had.
    """

    def __init__(self, size: int, seed: int, stream: int, *keys: int):
        self.size, self.seed, self.stream, self.keys = size, seed, stream, keys
        self._permutations: dict[int, torch.Tensor] = {}

    def __call__(self, n: int) -> int:
        epoch, position = divmod(n, self.size)
        if epoch not in self._permutations:
            if len(self._permutations) > 64:
                self._permutations.clear()
            self._permutations[epoch] = torch.randperm(
                self.size, generator=seeding.generator(self.seed, self.stream, epoch, *self.keys))
        return int(self._permutations[epoch][position])


@dataclass
class ClassSet:
    """The class images of one (class_data_dir, class_prompt), by bucket."""

    prompt: str
    pools: dict[Size, list[CachedImage]]


class MicroStepBatches(Dataset):
    """Item i is this rank's batch for micro-step i (see the module docstring).

    Returns `latents` (B + P, C, h, w) normalised as the VAE's config says, (z - shift_factor)
    x scaling_factor (SD 3.x and FLUX.1 VAEs have a shift, the others none), B instance samples
    first and then P class samples (one per instance sample whose concept has a prior);
    `seeds` from which the training step draws noise and timesteps; `time_ids` (B + P, 6) for
    SDXL; `is_prior`; `prompts` (B + P strings); `weights` (B + P, 1, h, w) mask weights of the
    loss; `loss_weights` (B + P,) the concepts' loss weights (1 for class samples).
    """

    def __init__(self, instance: list[CachedImage], class_sets: list[ClassSet],
                 concepts: list[Concept], *, batch_size: int, num_micro_steps: int, seed: int,
                 rank: int, world_size: int, scaling_factor: float,
                 captions: CaptionSettings = CaptionSettings(), shift_factor: float = 0.0):
        self.instance, self.class_sets, self.concepts = instance, class_sets, concepts
        self.batch_size, self.num_micro_steps = batch_size, num_micro_steps
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.scaling_factor, self.captions = scaling_factor, captions
        self.shift_factor = shift_factor
        keys = [concept.class_key for concept in concepts]
        distinct = list(dict.fromkeys(key for key in keys if key is not None))
        self.class_of = [None if key is None else distinct.index(key) for key in keys]
        self.buckets = sorted({image.bucket for image in instance})
        self.entries = [[index for index, image in enumerate(instance) if image.bucket == bucket
                         for _ in range(concepts[image.concept].repeats)]
                        for bucket in self.buckets]
        self.global_batch = batch_size * world_size
        self._orders = [_EpochOrder(len(entries), seed, seeding.INSTANCE_ORDER, b)
                        for b, entries in enumerate(self.entries)]
        pools = [(j, bucket) for j, class_set in enumerate(class_sets)
                 for bucket in sorted(class_set.pools)]
        self._class_orders = {
            pool: _EpochOrder(len(class_sets[pool[0]].pools[pool[1]]), seed,
                              seeding.CLASS_ORDER, index)
            for index, pool in enumerate(pools)}
        self._rounds: dict[int, list[tuple[int, int]]] = {}

    def __len__(self) -> int:
        return self.num_micro_steps

    def _batches_before(self, round_index: int) -> list[int]:
        """Batches of each bucket in rounds 0 .. round_index - 1."""
        return [round_index * len(entries) // self.global_batch for entries in self.entries]

    def batch_plan(self, micro_step: int) -> tuple[int, int]:
        """(bucket index, batch number within that bucket's stream) of a micro-step."""
        # The round holding the micro-step: the last whose first batch is not after it
        # (rounds may be empty when every bucket has fewer than G entries).
        low, high = 0, (micro_step + 2) * self.global_batch
        while low < high:
            middle = (low + high + 1) // 2
            if sum(self._batches_before(middle)) <= micro_step:
                low = middle
            else:
                high = middle - 1
        round_index = low
        if round_index not in self._rounds:
            if len(self._rounds) > 64:
                self._rounds.clear()
            first, after = self._batches_before(round_index), self._batches_before(round_index + 1)
            labels = [b for b in range(len(self.entries)) for _ in range(after[b] - first[b])]
            if len(self.entries) > 1:
                order = torch.randperm(len(labels), generator=seeding.generator(
                    self.seed, seeding.BUCKET_ORDER, round_index))
                labels = [labels[i] for i in order.tolist()]
            seen: Counter[int] = Counter()
            plan = []
            for b in labels:
                plan.append((b, first[b] + seen[b]))
                seen[b] += 1
            self._rounds[round_index] = plan
        return self._rounds[round_index][micro_step - sum(self._batches_before(round_index))]

    def _sample(self, image: CachedImage, kind: int, n: int) -> dict:
        sample_generator = seeding.generator(self.seed, seeding.SAMPLE, kind, n)
        view = int(torch.randint(image.num_views, (1,), generator=sample_generator))
        mean, std = image.means[view], image.stds[view]
        eps = torch.randn(mean.shape, generator=sample_generator)
        weights = (image.weights[view] if image.weights is not None
                   else torch.ones(1, *mean.shape[1:]))
        latents = mean + std * eps  # z ~ the posterior, (C, h, w)
        if self.shift_factor:
            latents = latents - self.shift_factor
        return {"latents": latents * self.scaling_factor,
                "seeds": seeding.derive_seed(self.seed, seeding.SAMPLE, kind, n, 1),
                "time_ids": image.time_ids[view], "weights": weights}

    def __getitem__(self, micro_step: int) -> dict:
        global_batch = self.global_batch
        bucket_index, chunk = self.batch_plan(micro_step)
        bucket = self.buckets[bucket_index]
        samples, priors = [], []
        for slot in range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size):
            n = micro_step * global_batch + slot
            entry = self.entries[bucket_index][self._orders[bucket_index](chunk * global_batch
                                                                            + slot)]
            image = self.instance[entry]
            concept = self.concepts[image.concept]
            samples.append({**self._sample(image, 0, n), "is_prior": False,
                            "prompts": step_caption(image.caption, self.captions, self.seed, n),
                            "loss_weights": concept.loss_weight})
            j = self.class_of[image.concept]
            if j is not None:
                pool = self.class_sets[j].pools[bucket]
                class_image = pool[self._class_orders[(j, bucket)](n)]
                priors.append({**self._sample(class_image, 1, n), "is_prior": True,
                               "prompts": self.class_sets[j].prompt, "loss_weights": 1.0})
        samples += priors
        column = lambda key: [sample[key] for sample in samples]  # noqa: E731
        return {
            "latents": torch.stack(column("latents")),
            "seeds": torch.tensor(column("seeds"), dtype=torch.int64),
            "time_ids": torch.stack(column("time_ids")),  # (B, 6) SDXL size conditioning
            "is_prior": torch.tensor(column("is_prior")),
            "prompts": column("prompts"),
            "weights": torch.stack(column("weights")),  # (B, 1, h, w)
            "loss_weights": torch.tensor(column("loss_weights"), dtype=torch.float32),
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
    """Owns the instance and class images: reads, buckets, crops and encodes them once, then
    serves one deterministic batch per micro-step."""

    def __init__(self, *, concepts: list[Concept], captions: dict[Path, str],
                 num_class_images: int, buckets: BucketSettings, center_crop: bool,
                 random_flip: bool, train_batch_size: int, gradient_accumulation_steps: int,
                 max_train_steps: int, seed: int, vae, caption_extension: str = ".txt",
                 caption_settings: CaptionSettings = CaptionSettings(),
                 masks: MaskSettings = MaskSettings()):
        super().__init__()
        self.concepts, self.captions = concepts, captions
        self.num_class_images = num_class_images
        self.bucket_settings, self.bucket_sizes = buckets, make_buckets(buckets)
        self.center_crop, self.random_flip = center_crop, random_flip
        self.train_batch_size = train_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_train_steps = max_train_steps
        self.seed = seed
        self.vae = vae
        self.caption_extension = caption_extension
        self.caption_settings, self.masks = caption_settings, masks
        self.instance: list[CachedImage] | None = None
        self.class_sets: list[ClassSet] = []

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _load(self, folder: str, role: str) -> list[tuple[Path, Image.Image]]:
        return load_image_folder(
            Path(folder), role=role,
            min_size=None if self.bucket_settings.enabled else self.bucket_settings.resolution,
            companion=lambda path: is_companion(path, self.caption_extension))

    def _crop(self, image: Image.Image, bucket: Size, *, is_class: bool, index: int,
              class_set: int = 0, mask: Image.Image | None = None, centered: bool = False
              ) -> _Crop:
        # Class set 0's key 0 is as good as none (SeedSequence pads with zeros): one prior
        # class crops as runs before concepts did.
        generator = None if self.center_crop or centered else seeding.generator(
            self.seed, seeding.CROP, is_class, index, class_set)
        return crop_to_bucket(image, bucket, generator=generator, random_flip=self.random_flip,
                              mask=mask, latent_factor=self.latent_factor,
                              unmasked_weight=self.masks.unmasked_weight)

    def _cache(self, crops: list[_Crop], captions: list[str], concepts: list[int],
               buckets: list[Size]) -> list[CachedImage]:
        encoded = encode_crops(crops, self.vae)
        return [CachedImage(means, stds, crop.time_ids, crop.weights, caption, concept, bucket)
                for (means, stds), crop, caption, concept, bucket
                in zip(encoded, crops, captions, concepts, buckets)]

    def encode_images(self) -> None:
        """Encode instance and class images once, with the VAE wherever the trainer put it.

        Runs at the first `train_dataloader()` call, after callbacks' setup has generated any
        missing class images and after the strategy has moved the model to its device.
        """
        if self.instance is not None:
            return
        crops, captions, concept_ids, buckets = [], [], [], []
        for concept_id, concept in enumerate(self.concepts):
            for path, image in self._load(concept.instance_data_dir, "instance"):
                bucket = assign_bucket(image.size, self.bucket_sizes, self.bucket_settings)
                mask = load_mask(path, image.size, self.masks)
                crops.append(self._crop(image, bucket, is_class=False, index=len(crops),
                                        mask=mask))
                captions.append(self.captions.get(path, concept.instance_prompt))
                concept_ids.append(concept_id)
                buckets.append(bucket)
        self.instance = self._cache(crops, captions, concept_ids, buckets)
        counts = Counter(buckets)
        log.info("encoded %d instance image(s) x %d view(s) into %d bucket(s): %s",
                 len(crops), 1 + self.random_flip, len(counts),
                 ", ".join(f"{w}x{h}: {c}" for (w, h), c in sorted(counts.items())))

        class_keys = list(dict.fromkeys(c.class_key for c in self.concepts if c.class_key))
        for j, (folder, prompt) in enumerate(class_keys):
            wanted = max(c.num_class_images or self.num_class_images for c in self.concepts
                         if c.class_key == (folder, prompt))
            images = self._load(folder, "class")[:wanted]
            if len(images) < wanted:
                log.warning("class_data_dir '%s' has %d readable images, fewer than "
                            "num_class_images=%d", folder, len(images), wanted)
            sizes = [assign_bucket(image.size, self.bucket_sizes, self.bucket_settings)
                     for _, image in images]
            crops = [self._crop(image, bucket, is_class=True, index=index, class_set=j)
                     for index, ((_, image), bucket) in enumerate(zip(images, sizes))]
            cached = self._cache(crops, [prompt] * len(crops), [-1] * len(crops), sizes)
            pools: dict[Size, list[CachedImage]] = {}
            for image in cached:
                pools.setdefault(image.bucket, []).append(image)
            needed = {image.bucket for image in self.instance
                      if self.concepts[image.concept].class_key == (folder, prompt)}
            for bucket in sorted(needed - pools.keys()):
                crops = [self._crop(image, bucket, is_class=True, index=index, centered=True)
                         for index, (_, image) in enumerate(images)]
                pools[bucket] = self._cache(crops, [prompt] * len(crops), [-1] * len(crops),
                                            [bucket] * len(crops))
            self.class_sets.append(ClassSet(prompt, pools))

    def train_dataloader(self) -> DataLoader:
        self.encode_images()
        trainer = self.trainer
        num_micro_steps = self.max_train_steps * self.gradient_accumulation_steps
        dataset = MicroStepBatches(
            self.instance, self.class_sets, self.concepts, batch_size=self.train_batch_size,
            num_micro_steps=num_micro_steps, seed=self.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            scaling_factor=self.vae.config.scaling_factor, captions=self.caption_settings,
            shift_factor=self.vae.config.get("shift_factor") or 0.0,
        )
        sampler = ResumingSampler(
            num_micro_steps,
            lambda: trainer.global_step * self.gradient_accumulation_steps if trainer else 0)
        return ResumableLoader(dataset, batch_size=None, sampler=sampler)


def steps_for_epochs(num_instance_samples: int, *, num_class_images: int, with_prior: bool,
                     num_train_epochs: int, train_batch_size: int,
                     gradient_accumulation_steps: int) -> int:
    """diffusers' rule for max_train_steps when only epochs are given (per device).

    `num_instance_samples`: instance photos per epoch, each counted `repeats` times.
    """
    dataset_size = num_instance_samples
    if with_prior:
        dataset_size = max(dataset_size, num_class_images)
    batches = math.ceil(dataset_size / train_batch_size)
    return max(1, num_train_epochs * math.ceil(batches / gradient_accumulation_steps))
