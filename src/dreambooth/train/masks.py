"""Loss masks: which parts of a photo the loss looks at (kohya's masked loss).

A photo's mask is, in this order: `photo.mask.png` beside `photo.png` (any image extension),
a file named like the photo in `mask_dir` (same name, or same stem with an image extension),
or with `alpha_mask` the photo's own alpha channel (a photo without one counts as all opaque).
Mask value 1 gives the loss weight 1, 0 gives `unmasked_weight`; a mask is cropped, flipped
and downsampled to the latent grid with its photo (see data.py). Photos without a mask, and
class images, weigh 1 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreambooth.images import IMAGE_EXTENSIONS, ImageReadError, read_image


@dataclass(frozen=True)
class MaskSettings:
    mask_dir: str | None = None
    alpha_mask: bool = False
    unmasked_weight: float = 0.1


def find_mask(image: Path, mask_dir: str | None) -> Path | None:
    """The mask file of photo `image`, or None."""
    candidates = [image.with_name(f"{image.stem}.mask{ext}") for ext in sorted(IMAGE_EXTENSIONS)]
    if mask_dir:
        folder = Path(mask_dir)
        candidates += [folder / image.name]
        candidates += [folder / f"{image.stem}{ext}" for ext in sorted(IMAGE_EXTENSIONS)]
    return next((path for path in candidates if path.is_file()), None)


def load_mask(image_path: Path, size: tuple[int, int], settings: MaskSettings
              ) -> Image.Image | None:
    """The mask of the photo at `image_path` (upright size `size`) as an 8-bit `L` image, or
    None. A mask that is no image or not the photo's size raises ValueError naming it."""
    path = find_mask(image_path, settings.mask_dir)
    if path is not None:
        try:
            mask = read_image(path)
        except ImageReadError as error:
            raise ValueError(f"mask '{path}' of photo '{image_path.name}' is not a readable "
                             f"image ({error.reason}): save it as a grayscale PNG") from None
        if mask.size != size:
            raise ValueError(f"mask '{path}' is {mask.width}x{mask.height} but its photo "
                             f"'{image_path}' is {size[0]}x{size[1]}: masks must have their "
                             "photo's size")
        return mask.convert("L")  # its brightness: white 1, black 0
    if settings.alpha_mask:
        image = read_image(image_path)
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            return image.convert("RGBA").getchannel("A")
        return Image.new("L", size, 255)  # no alpha channel: all opaque
    return None


def mask_weights(mask: Image.Image, latent_size: tuple[int, int], unmasked_weight: float
                 ) -> torch.Tensor:
    """(1, h, w) loss weights on the latent grid: the crop's mask averaged over each latent
    pixel's patch, then mapped 1 -> 1 and 0 -> unmasked_weight."""
    small = mask.resize(latent_size, resample=Image.Resampling.BOX)
    values = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None]
    return unmasked_weight + (1.0 - unmasked_weight) * values
