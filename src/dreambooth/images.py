"""Reading users' photos robustly and writing PNGs.

DreamBooth trains on a handful of photos straight from a phone or a notebook folder, so this
module expects the mess they come with: hidden `.ipynb_checkpoints` folders, side files, EXIF
rotation, transparency, 16-bit scans and half-copied files. Every photo that cannot be used is
named in a warning or an error; none is silently "repaired" (truncated files are refused, not
padded, so `ImageFile.LOAD_TRUNCATED_IMAGES` is left alone). `read_image` decodes every image
file, from disk or from an upload to `dreambooth serve`.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from dreambooth.files import atomic_path

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Errors PIL raises for unreadable, truncated or non-image files (SyntaxError and EOFError come
# from some older decoders; DecompressionBombError guards against absurd pixel counts).
_PIL_READ_ERRORS = (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError)


class ImageFolderError(ValueError):
    """An image folder that cannot be used; the message names it and says what to do."""


class ImageReadError(ValueError):
    """A file that cannot be read as an image; the message names it and the reason.

    `reason` is the reason alone, for a caller that names the image its own way (the server
    names the form field of an upload).
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = message if reason is None else reason


class ImageFormatError(ImageReadError):
    """An image in a format the caller does not accept (`format`: PIL's name, e.g. "GIF")."""

    def __init__(self, message: str, file_format: str | None):
        super().__init__(message)
        self.format = file_format


class ImageTooLargeError(ImageReadError):
    """An image with a side over the caller's limit (`size`: its (width, height))."""

    def __init__(self, message: str, size: tuple[int, int]):
        super().__init__(message)
        self.size = size


def _scan_folder(folder: Path, companion: Callable[[Path], bool] | None = None
                 ) -> tuple[list[Path], list[Path]]:
    """Split the visible files directly in `folder` into (images, other files), sorted by name;
    each other file is warned about. Files `companion(path)` accepts (a photo's caption or
    mask beside it) are neither: they are left to the caller, without a warning."""
    if not folder.is_dir():
        raise ImageFolderError(f"image folder '{folder}' does not exist or is not a folder")
    images: list[Path] = []
    others: list[Path] = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or path.is_dir():
            continue  # .ipynb_checkpoints, .DS_Store and subfolders are never photos
        if companion is not None and companion(path):
            continue
        if not path.is_file():  # a link to nothing, a link loop, a socket ...: say so
            warnings.warn(f"skipping '{path}': not a readable file (a broken or looping "
                          "symbolic link?)", UserWarning, stacklevel=3)
            others.append(path)
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            _warn_not_image(path)
            others.append(path)
            continue
        images.append(path)
    return images, others


def _warn_not_image(path: Path) -> None:
    warnings.warn(
        f"skipping '{path}': extension '{path.suffix}' is not an image "
        f"(accepted: {', '.join(sorted(IMAGE_EXTENSIONS))})",
        UserWarning,
        stacklevel=3,
    )


def list_image_files(folder: Path, companion: Callable[[Path], bool] | None = None
                     ) -> list[Path]:
    """Image files directly in `folder`, sorted by name; each other visible file is warned about
    (but companions, see `_scan_folder`)."""
    images, _ = _scan_folder(Path(folder), companion)
    return images


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale high-bit-depth grayscale to 8-bit `L`; PIL's own convert("L") clips 16-bit values."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # I;16* are 16-bit by definition; PNG and TIFF decoders also hand 16-bit data over as I.
        values = np.asarray(image.convert("I"), dtype=np.float64).clip(0, 65535) / 257.0
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        # Float images are either normalised to [0, 1] or already on the 0..255 scale.
        values = values * 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else values
        values = np.nan_to_num(values).clip(0, 255)
    else:
        return image
    return Image.fromarray(np.rint(values).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Return 8-bit RGB; transparent pixels become white, as a photo viewer would show them."""
    image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr; 16-bit RGB PNGs already open as RGB


def read_image(
    source: str | Path | bytes,
    *,
    formats: Collection[str] | None = None,
    max_side: int | None = None,
    upright: bool = True,
    rgb: bool = False,
) -> Image.Image:
    """Decode the image file at `source` (a path, or the bytes of an upload) fully.

    Every pixel is decoded here, so a truncated file fails now, not mid-training. A file whose
    PIL format (e.g. "PNG") is not in `formats` or with a side over `max_side` pixels is refused
    before its pixels are decoded. `upright` turns the image by its EXIF orientation (phone
    photos store rotation there); `rgb` converts it to 8-bit RGB, transparency on white.
    Raises ImageReadError (ImageFormatError, ImageTooLargeError for the two limits).
    """
    if isinstance(source, bytes):
        name, file = f"of {len(source)} bytes", io.BytesIO(source)
    else:
        name, file = f"'{Path(source)}'", Path(source)
    try:
        with Image.open(file) as opened:
            if formats is not None and opened.format not in formats:
                raise ImageFormatError(f"image {name} is a {opened.format} file; accepted: "
                                       f"{', '.join(formats)}", opened.format)
            if max_side is not None and max(opened.size) > max_side:
                raise ImageTooLargeError(
                    f"image {name} is {opened.width}x{opened.height}; the largest accepted "
                    f"side is {max_side} pixels", opened.size)
            opened.load()
            # A copy either way: closing the file at the end of `with` frees `opened`'s pixels.
            image = ImageOps.exif_transpose(opened) if upright else opened.copy()
            return _to_rgb(image) if rgb else image
    except ImageReadError:
        raise
    except _PIL_READ_ERRORS as error:
        raise ImageReadError(f"cannot read image {name}: {error}", str(error)) from error


def load_rgb_image(path: Path) -> Image.Image:
    """Decode `path` fully (so truncation fails here, not mid-training), upright, 8-bit RGB."""
    return read_image(Path(path), rgb=True)


def load_image_folder(
    folder: Path, *, role: str = "instance", min_size: int | None = None,
    companion: Callable[[Path], bool] | None = None,
) -> list[tuple[Path, Image.Image]]:
    """Load every readable photo in `folder` as RGB; skip the rest with one warning each.

    Raises ImageFolderError naming the folder when it is missing or holds no readable photo,
    since training on an empty set would fail much later and less clearly.
    """
    folder = Path(folder)
    flag = f"--{role}_data_dir"
    if not folder.exists():
        raise ImageFolderError(
            f"{role} image folder '{folder}' does not exist: pass {flag} with a folder of photos"
        )
    if not folder.is_dir():
        raise ImageFolderError(
            f"{role} image folder '{folder}' is a file, not a folder: "
            f"pass {flag} with a folder of photos"
        )
    paths, others = _scan_folder(folder, companion)
    loaded: list[tuple[Path, Image.Image]] = []
    unreadable = 0
    for path in paths:
        try:
            image = load_rgb_image(path)
        except ImageReadError as error:
            unreadable += 1
            warnings.warn(f"skipping {role} image: {error}", UserWarning, stacklevel=2)
            continue
        if min_size is not None and min(image.size) < min_size:
            warnings.warn(
                f"{role} image '{path}' is {image.width}x{image.height}, smaller than "
                f"{min_size} on its shorter side: it will be upscaled; results may be blurry",
                UserWarning,
                stacklevel=2,
            )
        loaded.append((path, image))
    if not loaded:
        raise ImageFolderError(
            f"{role} image folder '{folder}' has no readable image: skipped {len(others)} "
            f"file(s) that are no image or no readable file and {unreadable} unreadable image "
            "file(s); "
            f"add photos ({', '.join(sorted(IMAGE_EXTENSIONS))}) or pass another {flag}"
        )
    return loaded


def resize_and_crop(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    generator: torch.Generator | None = None,
) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to `resolution` and crop a square.

    Returns the crop, its (top, left) corner and the resized (height, width).
    The crop is centered when `center_crop` is set or no generator is given, so randomness
    only ever comes from an injected generator. SDXL conditions on the crop's top-left corner.
    """
    if image.mode != "RGB":
        raise ValueError(
            f"preprocess_image expects an RGB image, got mode {image.mode!r}: "
            "load it with load_rgb_image"
        )
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
    scale = resolution / min(image.size)
    width = max(resolution, round(image.width * scale))
    height = max(resolution, round(image.height * scale))
    if (width, height) != image.size:
        # LANCZOS keeps detail when shrinking; BICUBIC rings less when enlarging.
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        image = image.resize((width, height), resample=resample)
    max_left, max_top = image.width - resolution, image.height - resolution
    if center_crop or generator is None:
        left, top = max_left // 2, max_top // 2
    else:
        left = int(torch.randint(0, max_left + 1, (1,), generator=generator).item())
        top = int(torch.randint(0, max_top + 1, (1,), generator=generator).item())
    crop = image.crop((left, top, left + resolution, top + resolution))
    return crop, (top, left), (image.height, image.width)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] from an RGB image."""
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def preprocess_image(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resize the shorter side to `resolution`, crop a square, return (3, R, R) in [-1, 1]."""
    cropped, _, _ = resize_and_crop(image, resolution, center_crop, generator)
    return pil_to_tensor(cropped)


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """Inverse of preprocess_image for a (3, H, W) tensor in [-1, 1]; values outside are clamped."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"tensor_to_pil expects shape (3, H, W), got {tuple(tensor.shape)}")
    pixels = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return Image.fromarray(pixels.to(torch.uint8).permute(1, 2, 0).numpy(), mode="RGB")


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile images row by row into one RGB image; empty cells stay black."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), (0, 0, 0))
    for index, image in enumerate(images):
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
        row, column = divmod(index, columns)
        grid.paste(image.convert("RGB"), (column * width, row * height))
    return grid


def save_png(image: Image.Image, path: str | Path, text: dict[str, str] | None = None) -> Path:
    """Write `image` as a PNG atomically, storing `text` (e.g. prompt, seed) as text chunks."""
    path = Path(path)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)  # tEXt, or iTXt when the value is not Latin-1
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_text(path: str | Path) -> dict[str, str]:
    """Return the text chunks of a PNG written by save_png (or any other PNG)."""
    try:
        with Image.open(path) as image:
            image.load()  # text chunks after the pixel data are only parsed by load()
            file_format, text = image.format, dict(getattr(image, "text", {}))
    except _PIL_READ_ERRORS as error:
        raise ImageReadError(f"cannot read PNG '{path}': {error}") from error
    if file_format != "PNG":
        raise ImageReadError(f"'{path}' is a {file_format} file, not a PNG")
    return text
