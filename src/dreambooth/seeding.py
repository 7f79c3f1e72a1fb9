"""Counter-based seeds: every random draw of a run is a pure function of (seed, what, where).

Exact resume needs the batch and the noise of step k to depend on (seed, k) only, not on how
many draws came before, so instead of one stream we derive an independent seed per use:
`derive_seed(seed, STREAM, index)` and `generator(...)` here, `world.scene_rng(seed, *keys)`
(numpy) for the world's renders. Every stream number of the project is named below.

Both hash their keys with numpy's SeedSequence, which pads short key lists with zeros, so
(seed, k) and (seed, k, 0) give the same state: two streams of one base seed need different
numbers, or keys of different lengths that never end in zeros.

Torch is imported only where a torch generator or state is asked for, so the world's renderer
uses these numbers without importing torch.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# --- DreamBooth training (train/): derive_seed(TrainConfig.seed, STREAM, index)
INSTANCE_ORDER, CLASS_ORDER, SAMPLE, CROP, CLASS_IMAGE, VALIDATION = range(6)
# generator(seed, CAPTION, n): caption dropout and tag shuffle of instance sample n.
CAPTION = 6
# generator(seed, BUCKET_ORDER, r): the order of the aspect buckets' batches in round r
# (8: 7 is the world's TEXTURE key, of other base seeds, but kept apart for the reader).
BUCKET_ORDER = 8
VALIDATION_LOSS = 9  # generator(seed, 9, i): the fixed noise of held-out image i's val_loss

# --- World pretraining (world/pretrain.py, world/callbacks.py): keys of PretrainConfig.seed,
# kept apart from DreamBooth's 0-5.
PRETRAIN_VAE_SAMPLE = 100  # stage 1: the VAE posterior sample of batch i
PRETRAIN_LATENT_SAMPLE = 101  # stage 2: the VAE posterior sample of batch i
PRETRAIN_CAPTION = 102  # dropout, partial and rare-word draws of sample n's caption (numpy)
PRETRAIN_NOISE = 103  # stage 2: noise and timestep of sample n
PRETRAIN_DECODER_STREAM = 104  # derive_seed(seed, 104): stage 1b's render stream (its base seed)
# generator(seed, 104, i): the sampling noise of held-out prompt i in the pretraining samples.
# The same number as PRETRAIN_DECODER_STREAM, and with SeedSequence's zero padding prompt 0's
# 63-bit seed equals stage 1b's base seed. No draw is shared: prompt 0's seed starts a torch
# generator, the base seed only enters numpy's default_rng([base, n]) (hashed again with n)
# and derive_seed(base, ...). Kept at 104 so the shipped base model and the logged sample grids
# reproduce bit for bit.
HELD_OUT_SAMPLES = 104
PRETRAIN_DECODER_SAMPLE = 105  # stage 1b: the VAE posterior sample of batch i
PRETRAIN_VAE_INIT = 200  # torch.manual_seed(derive_seed(seed, 200)): stage 1's initial VAE
PRETRAIN_DIFFUSION_INIT = 201  # the same for stage 2's text encoder and UNet
VAE_REPORT_STREAM_OFFSET = 1  # the VAE is measured on training stream seed + 1 (never trained on)

# --- The world evaluator (world/evaluator.py): scene_rng(EvaluatorTrainConfig.seed, 5, i) draws
# training pair i (numpy; VALIDATION's 5 seeds torch generators of DreamBooth runs). By the zero
# padding, pair 0 draws the numbers of training scene 5 of the base model's stream of the same
# seed (both 0): one pair of 6000, for another model; kept so the shipped evaluator reproduces.
EVALUATOR_PAIRS = 5

# --- The world's renders (world/render.py, world/subjects.py)
TEXTURE = 7  # scene_rng(Scene.texture_seed, 7): the layout of a textured background
SUBJECT_PHOTOS = 1000  # scene_rng(seed, 1000, crc32(subject name)): a subject's photo poses

# --- Held-out and evaluation sets: base seeds no training stream uses
HELD_OUT_RENDERS = 20_250_001  # scene_rng(HELD_OUT_RENDERS, n): the evaluator's held-out set
HELD_OUT_PHOTOS = 1  # world.photos(subject, seed=1): new photos beside the training ones (0)
GUIDANCE_SWEEP_CAPTIONS = 7  # random.Random(7): the training captions a guidance is picked on
HELD_OUT_SUBJECTS = 20_261_202  # scene_rng(HELD_OUT_SUBJECTS, i): held-out subject i's look


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from (seed, *keys) through numpy's SeedSequence hash (platform independent)."""
    state = np.random.SeedSequence([seed % (2**63), *keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded with derive_seed(seed, *keys)."""
    import torch

    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *keys))


def validation_seeds(seed: int, count: int) -> list[int]:
    """The fixed 32-bit seeds of a run's validation images (the same at every validation)."""
    return [derive_seed(seed, VALIDATION, index) % 2**32 for index in range(count)]


def capture_rng_state() -> dict:
    """Global RNG states (torch, CUDA, numpy, python) in a form torch.load(weights_only=True)
    reads."""
    import torch

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    *internal, version = state["python"]
    random.setstate((version, tuple(internal), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
