"""Counter-based seeds: every random draw of a run is a pure function of (seed, what, where).

Exact resume needs the batch and the noise of step k to depend on (seed, k) only, not on how
many draws came before, so instead of one stream we derive an independent seed per use.
"""

from __future__ import annotations

import random

import numpy as np
import torch

# Streams: which kind of draw a derived seed is for.
INSTANCE_ORDER, CLASS_ORDER, SAMPLE, CROP, CLASS_IMAGE, VALIDATION = range(6)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from (seed, *keys) through numpy's SeedSequence hash (platform independent)."""
    state = np.random.SeedSequence([seed % (2**63), *keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded with derive_seed(seed, *keys)."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *keys))


def validation_seeds(seed: int, count: int) -> list[int]:
    """The fixed 32-bit seeds of a run's validation images (the same at every validation)."""
    return [derive_seed(seed, VALIDATION, index) % 2**32 for index in range(count)]


def capture_rng_state() -> dict:
    """Global RNG states (torch, CUDA, numpy, python) in a form torch.load(weights_only=True) reads."""
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
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    *internal, version = state["python"]
    random.setstate((version, tuple(internal), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
