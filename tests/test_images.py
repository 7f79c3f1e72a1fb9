"""Reading messy photo folders and writing PNGs: every test image is built here with PIL/numpy."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.images import (
    IMAGE_EXTENSIONS,
    ImageFolderError,
    ImageFormatError,
    ImageReadError,
    ImageTooLargeError,
    list_image_files,
    load_image_folder,
    load_rgb_image,
    make_grid,
    preprocess_image,
    read_image,
    read_png_text,
    save_png,
    tensor_to_pil,
)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _truncated(path: Path, fmt: str) -> Path:
    """Write a noisy image then cut it in half, like an interrupted copy."""
    _noise(64, 64).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _messages(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UserWarning)]


def test_extensions_are_lowercase_with_dot():
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"} == IMAGE_EXTENSIONS


def test_list_ignores_hidden_and_subfolders_and_warns_once_per_non_image(tmp_path):
    for name in ("b.png", "a.JPG", "c.webp"):
        _noise(8, 8).save(tmp_path / name)
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _noise(8, 8).save(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")
    (tmp_path / "sub").mkdir()
    _noise(8, 8).save(tmp_path / "sub" / "nested.png")
    (tmp_path / "notes.txt").write_text("a photo of sks dog")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        files = list_image_files(tmp_path)

    assert [p.name for p in files] == ["a.JPG", "b.png", "c.webp"]
    messages = _messages(record)
    assert len(messages) == 1 and "notes.txt" in messages[0]


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_image_is_skipped_with_warning_naming_it(tmp_path, fmt, suffix):
    _noise(16, 16).save(tmp_path / "good.png")
    bad = _truncated(tmp_path / f"bad{suffix}", fmt)

    with pytest.raises(ImageReadError, match="bad"):
        load_rgb_image(bad)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = load_image_folder(tmp_path)

    assert [p.name for p, _ in loaded] == ["good.png"]
    messages = _messages(record)
    assert len(messages) == 1 and str(bad) in messages[0]


def test_non_image_with_image_extension_raises_naming_path(tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_text("not a jpeg")
    with pytest.raises(ImageReadError, match="fake.jpg"):
        load_rgb_image(fake)


def test_missing_folder_error_names_folder_and_flag(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ImageFolderError,
                       match="class image folder .*nope.* does not exist") as info:
        load_image_folder(missing, role="class")
    assert "--class_data_dir" in str(info.value)


def test_file_instead_of_folder_is_an_error(tmp_path):
    path = tmp_path / "photo.png"
    _noise(8, 8).save(path)
    with pytest.raises(ImageFolderError, match="not a folder"):
        load_image_folder(path)


def test_folder_without_readable_images_says_what_was_skipped(tmp_path):
    with pytest.raises(ImageFolderError, match=str(tmp_path)):
        load_image_folder(tmp_path)

    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.png").write_bytes(b"garbage")
    with warnings.catch_warnings(record=True), pytest.raises(ImageFolderError) as info:
        warnings.simplefilter("always")
        load_image_folder(tmp_path)
    assert "1 file(s) that are no image or no readable file" in str(info.value)
    assert "1 unreadable" in str(info.value)


def test_folder_of_symlink_loops_names_them(tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    with pytest.warns(UserWarning, match="a.png': not a readable file") as record, \
            pytest.raises(ImageFolderError, match="skipped 3 file"):
        load_image_folder(tmp_path)
    assert sum("symbolic link" in str(w.message) for w in record) == 3


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent blue becomes white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    image = load_rgb_image(tmp_path / "rgba.png")
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((1, 0)) == (255, 255, 255)

    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)  # index 0 (black) is transparent
    image = load_rgb_image(tmp_path / "p.png")
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (0, 255, 0)


def test_grayscale_bilevel_and_cmyk_become_rgb(tmp_path):
    Image.fromarray(np.array([[0, 100]], dtype=np.uint8), mode="L").save(tmp_path / "l.png")
    Image.new("1", (2, 2), 1).save(tmp_path / "one.png")
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # full cyan
    cmyk.save(tmp_path / "cmyk.tiff")

    gray = load_rgb_image(tmp_path / "l.png")
    assert gray.mode == "RGB" and gray.getpixel((1, 0)) == (100, 100, 100)
    assert load_rgb_image(tmp_path / "one.png").getpixel((0, 0)) == (255, 255, 255)
    color = load_rgb_image(tmp_path / "cmyk.tiff")
    assert color.mode == "RGB"
    assert color.getpixel((0, 0)) == (255, 255, 255)
    assert color.getpixel((1, 0)) == (0, 255, 255)


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    source.save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode in ("I;16", "I")  # 16 bits reach the loader

    image = load_rgb_image(tmp_path / "scan.png")
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [255, 128, 0, 1]


def test_32bit_int_and_float_grayscale(tmp_path):
    Image.fromarray(np.array([[65535, 0]], dtype=np.int32), mode="I").save(tmp_path / "i.tiff")
    Image.fromarray(np.array([[1.0, 0.5]], dtype=np.float32), mode="F").save(tmp_path / "f.tiff")
    assert load_rgb_image(tmp_path / "i.tiff").getpixel((0, 0)) == (255, 255, 255)
    floats = load_rgb_image(tmp_path / "f.tiff")
    assert floats.getpixel((0, 0)) == (255, 255, 255)
    assert floats.getpixel((1, 0))[0] in (127, 128)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view", as phones write portrait photos
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "phone.jpg", exif=exif)
    assert Image.open(tmp_path / "phone.jpg").size == (40, 20)
    assert load_rgb_image(tmp_path / "phone.jpg").size == (20, 40)


def test_read_image_decodes_bytes_and_paths_alike(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    _noise(40, 20).save(tmp_path / "phone.jpg", exif=exif)
    data = (tmp_path / "phone.jpg").read_bytes()
    from_bytes, from_path = read_image(data), read_image(tmp_path / "phone.jpg")
    assert from_bytes.size == from_path.size == (20, 40)  # upright, both
    assert np.array_equal(np.asarray(from_bytes), np.asarray(from_path))
    assert read_image(data, upright=False).size == (40, 20)  # as stored


def test_read_image_limits_refuse_before_decoding(tmp_path):
    _noise(64, 16).save(tmp_path / "wide.png")
    data = (tmp_path / "wide.png").read_bytes()
    with pytest.raises(ImageFormatError, match="PNG file; accepted: JPEG") as info:
        read_image(data, formats=("JPEG",))
    assert info.value.format == "PNG"
    with pytest.raises(ImageTooLargeError, match="64x16") as info:
        read_image(tmp_path / "wide.png", max_side=63)
    assert info.value.size == (64, 16)
    assert read_image(data, formats=("PNG",), max_side=64).size == (64, 16)
    # A truncated body fails only when its pixels are decoded; the limits pass it first.
    with pytest.raises(ImageReadError, match="of 100 bytes: image file is truncated") as info:
        read_image(data[:100], formats=("PNG",), max_side=64)
    assert info.value.reason == "image file is truncated"


def test_small_images_warn_once_with_size(tmp_path):
    _noise(32, 48).save(tmp_path / "small.png")
    _noise(64, 80).save(tmp_path / "big.png")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = load_image_folder(tmp_path, min_size=64)
    assert len(loaded) == 2
    messages = _messages(record)
    assert len(messages) == 1
    assert "small.png" in messages[0] and "32x48" in messages[0] and "64" in messages[0]
    assert "upscaled" in messages[0]


def _three_bands(width: int = 300, height: int = 100) -> Image.Image:
    """Red, green and blue thirds from left to right."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    pixels[:, :third, 0] = 255
    pixels[:, third : 2 * third, 1] = 255
    pixels[:, 2 * third :, 2] = 255
    return Image.fromarray(pixels, mode="RGB")


def test_preprocess_center_crop_takes_the_middle():
    tensor = preprocess_image(_three_bands(), resolution=64, center_crop=True)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    red, green, blue = tensor.mean(dim=(1, 2)).tolist()
    assert green > 0.9 and red < -0.8 and blue < -0.8
    assert tensor[:, 32, 32].tolist() == pytest.approx([-1.0, 1.0, -1.0], abs=0.02)


def test_preprocess_upscales_small_images_to_resolution():
    tensor = preprocess_image(_noise(20, 30), resolution=64, center_crop=True)
    assert tensor.shape == (3, 64, 64)


def test_random_crop_is_deterministic_for_a_seed_and_varies_between_seeds():
    image = _noise(200, 80)

    def crop(seed: int) -> torch.Tensor:
        return preprocess_image(image, 32, center_crop=False,
                                generator=torch.Generator().manual_seed(seed))

    assert torch.equal(crop(7), crop(7))
    center = preprocess_image(image, 32, center_crop=False, generator=None)
    assert torch.equal(center, preprocess_image(image, 32, center_crop=True))
    assert any(not torch.equal(crop(seed), center) for seed in range(5))


def test_preprocess_rejects_non_rgb():
    with pytest.raises(ValueError, match="load_rgb_image"):
        preprocess_image(Image.new("RGBA", (8, 8)), 8, center_crop=True)


def test_tensor_to_pil_inverts_preprocess_and_clamps():
    image = _noise(16, 16)
    restored = tensor_to_pil(preprocess_image(image, 16, center_crop=True))
    assert np.array_equal(np.asarray(restored), np.asarray(image))

    out_of_range = torch.stack([torch.full((2, 2), 3.0), torch.full((2, 2), -3.0),
                                torch.zeros(2, 2)])
    assert tensor_to_pil(out_of_range).getpixel((0, 0)) == (255, 0, 128)


def test_make_grid_size_padding_and_resizing():
    images = [Image.new("RGB", (10, 8), (255, 255, 255)) for _ in range(4)]
    images.append(Image.new("RGB", (20, 16), (255, 255, 255)))  # resized to 10x8
    grid = make_grid(images)  # 5 images -> 3 columns, 2 rows
    assert grid.size == (30, 16)
    assert grid.getpixel((25, 12)) == (0, 0, 0)  # sixth cell is empty
    assert grid.getpixel((15, 12)) == (255, 255, 255)
    assert make_grid(images, columns=5).size == (50, 8)
    with pytest.raises(ValueError):
        make_grid([])


def test_save_png_round_trip_and_leaves_no_temporary_files(tmp_path):
    image = _noise(12, 10)
    text = {"prompt": "a photo of sks dog", "seed": "42", "note": "café ☕"}
    target = tmp_path / "samples" / "step_10.png"
    returned = save_png(image, target, text=text)

    assert returned == target
    assert read_png_text(target) == text
    with Image.open(target) as saved:
        assert saved.format == "PNG"
        assert np.array_equal(np.asarray(saved), np.asarray(image))
    assert [p.name for p in target.parent.iterdir()] == ["step_10.png"]


def test_failed_save_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "sample.png"
    save_png(_noise(4, 4), target, text={"seed": "1"})
    before = target.read_bytes()
    with pytest.raises(OSError):
        save_png(Image.new("CMYK", (4, 4)), target)  # PNG cannot store CMYK
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["sample.png"]


def test_read_png_text_refuses_other_formats(tmp_path):
    _noise(4, 4).save(tmp_path / "photo.jpg")
    with pytest.raises(ImageReadError, match="not a PNG"):
        read_png_text(tmp_path / "photo.jpg")
