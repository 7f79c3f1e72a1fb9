"""Aspect-ratio buckets (NovelAI 2022, as in kohya's sd-scripts): train on whole photos.

Buckets are (width, height) sizes of about resolution^2 pixels, sides multiples of
`reso_steps` between `min_reso` and `max_reso`. Each photo goes to the bucket whose aspect
ratio is nearest its own (on a log scale, so 2:1 and 1:2 are as far from 1:1), is scaled to
cover it and cropped only by what rounding leaves over. With `no_upscale` a photo smaller than
the bucket area gets a bucket of its own size rounded down, never enlarged.

Without buckets every photo goes to the one square bucket (resolution x resolution), scaled
to cover it and cropped: plain DreamBooth's square crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class BucketSettings:
    resolution: int
    enabled: bool = False
    min_reso: int | None = None  # None: min(256, resolution // 2), on the step grid
    max_reso: int | None = None  # None: 2 x resolution
    reso_steps: int = 64
    no_upscale: bool = False

    @property
    def min_side(self) -> int:
        default = min(256, self.resolution // 2)
        side = self.min_reso if self.min_reso is not None else default
        return max(self.reso_steps, side // self.reso_steps * self.reso_steps)

    @property
    def max_side(self) -> int:
        side = self.max_reso if self.max_reso is not None else 2 * self.resolution
        return max(self.min_side, side // self.reso_steps * self.reso_steps)


def make_buckets(settings: BucketSettings) -> list[Size]:
    """Every bucket of about resolution^2 pixels (kohya's `make_bucket_resolutions`), sorted."""
    if not settings.enabled:
        return [(settings.resolution, settings.resolution)]
    steps, area = settings.reso_steps, settings.resolution ** 2
    square = max(steps, settings.resolution // steps * steps)
    buckets = {(square, square)}
    width = settings.min_side
    while width <= settings.max_side:
        height = min(settings.max_side, area // width // steps * steps)
        if height >= settings.min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += steps
    return sorted(buckets)


def assign_bucket(size: Size, buckets: list[Size], settings: BucketSettings) -> Size:
    """The bucket of a photo of `size` (width, height)."""
    if not settings.enabled:
        return buckets[0]
    width, height = size
    if settings.no_upscale:
        steps = settings.reso_steps
        scale = min(1.0, math.sqrt(settings.resolution ** 2 / (width * height)))
        return (max(steps, int(width * scale) // steps * steps),
                max(steps, int(height * scale) // steps * steps))
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), b))


def cover_size(size: Size, bucket: Size) -> Size:
    """The (width, height) a photo of `size` is resized to so it covers `bucket`, aspect kept."""
    width, height = size
    scale = max(bucket[0] / width, bucket[1] / height)
    return (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
