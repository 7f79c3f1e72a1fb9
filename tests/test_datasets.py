"""Real datasets: captions, several concepts, aspect-ratio buckets and loss masks.

Unit tests of each piece, then tiny end-to-end trainings that use them all together, on SD1
and SDXL, full and LoRA, and an exact resume with buckets, masks, several concepts and EMA.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import tiny_config
from dreambooth.tiny import build_tiny_tokenizer, save_tiny_pipeline
from dreambooth.train.buckets import BucketSettings, assign_bucket, cover_size, make_buckets
from dreambooth.train.captions import (
    CaptionSettings,
    concept_captions,
    read_metadata,
    shuffle_tags,
    step_caption,
    warn_truncated,
)
from dreambooth.train.concepts import Concept, read_concepts_file, resolve_concepts
from dreambooth.train.data import CachedImage, ClassSet, MicroStepBatches, crop_to_bucket
from dreambooth.train.masks import MaskSettings, load_mask, mask_weights
from dreambooth.train.run import train
from test_resume import assert_same_weights, trained_weights


# ----------------------------------------------------------------------------- helpers
def photo(path: Path, size: tuple[int, int], shade: int = 0, mode: str = "RGB") -> Path:
    """A made-up subject (a blue disc on a warm background) of `size` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (200, 60 + shade, 50))
    draw = ImageDraw.Draw(image)
    draw.ellipse([size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4],
                 fill=(20, 40, 220))
    if mode == "RGBA":  # opaque on the left half only
        image = image.convert("RGBA")
        alpha = Image.new("L", size, 0)
        ImageDraw.Draw(alpha).rectangle([0, 0, size[0] // 2, size[1]], fill=255)
        image.putalpha(alpha)
    image.save(path)
    return path


def half_mask(path: Path, size: tuple[int, int]) -> Path:
    """A mask: the left half white (trained), the right half black."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle([0, 0, size[0] // 2 - 1, size[1]], fill=255)
    mask.save(path)
    return path


def dataset(root: Path) -> Path:
    """Two concepts with mixed aspect ratios, captions (sidecar and metadata.jsonl), masks, a
    class folder for the second, and a concepts file naming them."""
    dog, toy = root / "dog", root / "toy"
    for index, size in enumerate([(48, 32), (32, 48), (40, 40)]):
        photo(dog / f"dog-{index}.png", size, shade=20 * index)
    (dog / "dog-0.txt").write_text("[trigger], on the beach, red ball")
    (dog / "dog-1.txt").write_text("[trigger], in the snow")
    half_mask(dog / "dog-0.mask.png", (48, 32))
    for index, size in enumerate([(64, 32), (40, 40)]):
        photo(toy / f"toy-{index}.png", size, shade=40 * index)
    (toy / "metadata.jsonl").write_text(
        json.dumps({"file_name": "toy-0.png", "text": "a [trigger] on a box"}) + "\n")
    concepts = [
        {"instance_data_dir": str(dog), "instance_prompt": "sks dog", "repeats": 2},
        {"instance_data_dir": str(toy), "instance_prompt": "xyz toy",
         "class_data_dir": str(root / "class-toy"), "class_prompt": "a toy",
         "num_class_images": 2, "loss_weight": 0.5},
    ]
    (root / "concepts.yaml").write_text(yaml.safe_dump(concepts))
    return root / "concepts.yaml"


def dataset_config(model: Path, root: Path, output: Path, **overrides):
    values = dict(instance_data_dir=None, instance_prompt=None, concepts=str(dataset(root)),
                  with_prior_preservation=True, aspect_buckets=True, bucket_reso_steps=8,
                  random_flip=True, caption_dropout_rate=0.2, shuffle_caption=True,
                  keep_tokens=1, max_train_steps=4)
    values.update(overrides)
    return tiny_config(model, root / "unused", output, **values)


class RecordBatches(L.Callback):
    """Keeps every micro-batch the training step saw."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({key: value.cpu() if torch.is_tensor(value) else value
                             for key, value in batch.items()})


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", family="sdxl")


# ---------------------------------------------------------------------------- captions
def test_captions_from_sidecars_and_metadata_with_trigger(tmp_path):
    folder = tmp_path / "photos"
    for name in ("a", "b", "c", "d"):
        photo(folder / f"{name}.png", (32, 32))
    (folder / "a.txt").write_text("[trigger] at the beach\n")
    (folder / "b.caption").write_text("a [trigger], painting")
    (folder / "notes.txt").write_text("a caption of no photo")
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "from metadata"}) + "\n\n"
        + json.dumps({"file_name": "c.png", "text": "[trigger] on a box"}) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captions = concept_captions(folder, "sks dog", ".txt")
    # Caption files and metadata.jsonl are not "not images"; another extension's file and a
    # caption file of no photo are.
    assert [Path(str(w.message).split("'")[1]).name for w in caught] == ["b.caption",
                                                                         "notes.txt"]
    names = {path.name: text for path, text in captions.items()}
    assert names == {"a.png": "sks dog at the beach",  # the sidecar wins over metadata.jsonl
                     "b.png": "sks dog",  # .caption is not the extension asked for
                     "c.png": "sks dog on a box", "d.png": "sks dog"}
    assert {p.name: t for p, t in concept_captions(folder, "sks dog", ".caption").items()}[
        "b.png"] == "a sks dog, painting"


def test_empty_and_binary_caption_files_fall_back_with_a_warning_naming_them(tmp_path):
    folder = tmp_path / "photos"
    for name in ("empty", "binary"):
        photo(folder / f"{name}.png", (32, 32))
    (folder / "empty.txt").write_text("  \n")
    (folder / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.warns(UserWarning) as caught:
        captions = concept_captions(folder, "sks dog", ".txt")
    assert set(captions.values()) == {"sks dog"}
    messages = [str(w.message) for w in caught]
    assert any("empty.txt" in m and "empty" in m for m in messages), messages
    assert any("binary.txt" in m and "UTF-8" in m for m in messages), messages


def test_bad_metadata_line_is_one_error_naming_file_and_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl' line 2 is not JSON"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"line 1 needs string keys 'file_name' and 'text'"):
        read_metadata(tmp_path)


def test_long_captions_warn_once_per_run():
    tokenizer = build_tiny_tokenizer()
    long = " ".join(["dog"] * 100)
    captions = {"a.txt": long, "b.txt": long, "c.txt": "a sks dog"}
    with pytest.warns(UserWarning) as caught:
        assert warn_truncated(captions, tokenizer) == ["a.txt", "b.txt"]
    assert len(caught) == 1 and "2 caption(s)" in str(caught[0].message)
    assert "'a.txt'" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_truncated({"c.txt": "a sks dog"}, tokenizer) == []


def test_caption_dropout_and_shuffle_are_seeded_per_sample():
    caption = "sks dog, red ball, beach, sunset, smiling"
    settings = CaptionSettings(dropout_rate=0.25, shuffle=True, keep_tokens=1)
    drawn = [step_caption(caption, settings, seed=3, sample=n) for n in range(400)]
    # A pure function of (seed, sample): again, in another order, the same.
    assert [step_caption(caption, settings, 3, n) for n in reversed(range(400))] == drawn[::-1]
    assert drawn != [step_caption(caption, settings, 4, n) for n in range(400)]
    dropped = drawn.count("")
    assert 60 < dropped < 140  # 100 expected
    kept = [text for text in drawn if text]
    assert all(text.startswith("sks dog, ") for text in kept)  # keep_tokens=1
    assert all(sorted(text.split(", ")) == sorted(caption.split(", ")) for text in kept)
    assert len(set(kept)) > 10  # the other tags really move
    assert step_caption(caption, CaptionSettings(), 3, 0) == caption
    generator = torch.Generator().manual_seed(0)
    assert shuffle_tags("a, b", keep_tokens=2, generator=generator) == "a, b"


# ---------------------------------------------------------------------------- concepts
def test_concepts_file_in_yaml_and_concepts_list_json(tmp_path):
    for name in ("dog", "cat"):
        photo(tmp_path / name / "0.png", (32, 32))
    listing = [{"instance_prompt": "sks dog", "class_prompt": "a dog",
                "instance_data_dir": str(tmp_path / "dog"), "class_data_dir": str(tmp_path / "c")},
               {"instance_prompt": "zwx cat", "class_prompt": "a cat",
                "instance_data_dir": str(tmp_path / "cat"),
                "class_data_dir": str(tmp_path / "c2")}]
    (tmp_path / "concepts_list.json").write_text(json.dumps(listing))
    concepts = read_concepts_file(tmp_path / "concepts_list.json")
    assert [c.instance_prompt for c in concepts] == ["sks dog", "zwx cat"]
    assert concepts[0].class_key == (str(tmp_path / "c"), "a dog")
    assert concepts[0].repeats == 1 and concepts[0].loss_weight == 1.0
    listing[1].update(repeats=3, loss_weight=0.5, num_class_images=7)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(listing))
    second = read_concepts_file(tmp_path / "c.yaml")[1]
    assert (second.repeats, second.loss_weight, second.num_class_images) == (3, 0.5, 7)
    # Without --with_prior_preservation the class folders are not used.
    plain = resolve_concepts(concepts_file=str(tmp_path / "c.yaml"), instance_data_dir=None,
                             instance_prompt=None, class_data_dir=None, class_prompt=None,
                             with_prior=False)
    assert all(c.class_key is None for c in plain)


@pytest.mark.parametrize("entry, words", [
    ({"instance_prompt": "a", "instance_dir": "x"}, "entry 1: unknown key 'instance_dir'"),
    ({"instance_prompt": "a", "instance_data_dir": "{tmp}/nowhere"},
     "entry 1: instance_data_dir '{tmp}/nowhere' does not exist"),
    ({"instance_data_dir": "{tmp}"}, "entry 1: instance_prompt is required"),
    ({"instance_prompt": "a", "instance_data_dir": "{tmp}", "repeats": 0}, "repeats=0"),
    ({"instance_prompt": "a", "instance_data_dir": "{tmp}", "loss_weight": "x"},
     "loss_weight='x' must be a number"),
    ({"instance_prompt": "a", "instance_data_dir": "{tmp}", "class_data_dir": "{tmp}/c"},
     "class_prompt is required"),
    ("just text", "entry 1 is not a mapping"),
])
def test_bad_concept_entries_name_file_entry_and_key(tmp_path, entry, words):
    filled = (json.loads(json.dumps(entry).replace("{tmp}", str(tmp_path)))
              if isinstance(entry, dict) else entry)
    (tmp_path / "concepts.json").write_text(json.dumps([filled]))
    with pytest.raises(ValueError) as error:
        read_concepts_file(tmp_path / "concepts.json")
    message = str(error.value)
    assert "concepts.json" in message and words.replace("{tmp}", str(tmp_path)) in message
    assert "\n" not in message


def test_kohya_folders_are_concepts_with_repeats(tmp_path):
    photo(tmp_path / "data" / "10_sks dog" / "0.png", (32, 32))
    photo(tmp_path / "data" / "2_zwx cat" / "0.png", (32, 32))
    (tmp_path / "data" / ".ipynb_checkpoints").mkdir()
    concepts = resolve_concepts(concepts_file=None, instance_data_dir=str(tmp_path / "data"),
                                instance_prompt=None, class_data_dir=str(tmp_path / "class"),
                                class_prompt="a pet", with_prior=True)
    assert [(c.instance_prompt, c.repeats) for c in concepts] == [("sks dog", 10),
                                                                   ("zwx cat", 2)]
    assert {c.class_key for c in concepts} == {(str(tmp_path / "class"), "a pet")}
    (tmp_path / "data" / "extra").mkdir()
    with pytest.raises(ValueError, match=r"'extra' is not named so: rename it like '10_sks dog'"):
        resolve_concepts(concepts_file=None, instance_data_dir=str(tmp_path / "data"),
                         instance_prompt=None, class_data_dir=None, class_prompt=None,
                         with_prior=False)


def test_a_plain_folder_still_needs_instance_prompt_and_classes_need_one_prompt(tmp_path):
    photo(tmp_path / "dog" / "0.png", (32, 32))
    with pytest.raises(ValueError, match="instance_prompt is required"):
        resolve_concepts(concepts_file=None, instance_data_dir=str(tmp_path / "dog"),
                         instance_prompt=None, class_data_dir=None, class_prompt=None,
                         with_prior=False)
    listing = [{"instance_data_dir": str(tmp_path / "dog"), "instance_prompt": p,
                "class_data_dir": str(tmp_path / "class"), "class_prompt": c}
               for p, c in (("sks dog", "a dog"), ("zwx dog", "a puppy"))]
    (tmp_path / "c.json").write_text(json.dumps(listing))
    with pytest.raises(ValueError, match="given two class prompts"):
        resolve_concepts(concepts_file=str(tmp_path / "c.json"), instance_data_dir=None,
                         instance_prompt=None, class_data_dir=None, class_prompt=None,
                         with_prior=True)


# ----------------------------------------------------------------------------- buckets
SIZES = [(640, 480), (480, 640), (1000, 300), (300, 1000), (512, 512), (700, 520), (333, 999)]


@pytest.mark.parametrize("resolution, steps", [(512, 64), (1024, 64), (32, 8)])
def test_buckets_keep_aspect_and_divisible_latents(resolution, steps):
    settings = BucketSettings(resolution=resolution, enabled=True, reso_steps=steps)
    buckets = make_buckets(settings)
    assert (resolution, resolution) in buckets and len(buckets) > 3
    for width, height in buckets:
        assert width % steps == 0 and height % steps == 0
        assert width * height <= resolution ** 2
        assert settings.min_side <= min(width, height) and max(width, height) <= settings.max_side
    for size in SIZES:
        bucket = assign_bucket(size, buckets, settings)
        aspect = math.log(size[0] / size[1])
        distance = abs(math.log(bucket[0] / bucket[1]) - aspect)
        assert all(distance <= abs(math.log(w / h) - aspect) for w, h in buckets)
        if size[0] != size[1]:
            assert (bucket[0] > bucket[1]) == (size[0] > size[1])  # orientation kept
        covered = cover_size(size, bucket)
        assert covered[0] >= bucket[0] and covered[1] >= bucket[1]
        # Only rounding is cropped: the scaled photo's aspect differs from the bucket's at
        # most as much as the nearest bucket's does.
        assert abs(math.log(covered[0] / covered[1]) - aspect) < 0.02


def test_min_bucket_default_scales_with_small_resolutions():
    assert BucketSettings(resolution=512, enabled=True).min_side == 256
    assert BucketSettings(resolution=32, enabled=True, reso_steps=8).min_side == 16
    assert BucketSettings(resolution=32, enabled=True, reso_steps=8).max_side == 64
    assert make_buckets(BucketSettings(resolution=64)) == [(64, 64)]  # off: one square


def test_bucket_no_upscale_never_enlarges():
    settings = BucketSettings(resolution=512, enabled=True, no_upscale=True)
    for size in [(300, 200), (130, 70), (640, 480), (2000, 1500)]:
        bucket = assign_bucket(size, make_buckets(settings), settings)
        assert bucket[0] <= size[0] and bucket[1] <= size[1]
        assert bucket[0] % 64 == 0 and bucket[1] % 64 == 0
        assert bucket[0] * bucket[1] <= 512 ** 2
    assert assign_bucket((300, 200), [], settings) == (256, 192)  # rounded down, not up


# ------------------------------------------------------------------------------- masks
def test_masks_from_sidecar_mask_dir_and_alpha(tmp_path):
    image = photo(tmp_path / "a.png", (48, 32))
    assert load_mask(image, (48, 32), MaskSettings()) is None
    half_mask(tmp_path / "a.mask.png", (48, 32))
    mask = load_mask(image, (48, 32), MaskSettings())
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((47, 0)) == 0

    other = photo(tmp_path / "b.jpg", (48, 32))
    (tmp_path / "masks").mkdir()
    Image.new("L", (48, 32), 128).save(tmp_path / "masks" / "b.png")  # same stem, PNG
    mask = load_mask(other, (48, 32), MaskSettings(mask_dir=str(tmp_path / "masks")))
    assert mask.getpixel((10, 10)) == 128

    rgba = photo(tmp_path / "c.png", (48, 32), mode="RGBA")
    mask = load_mask(rgba, (48, 32), MaskSettings(alpha_mask=True))
    assert mask.getpixel((0, 5)) == 255 and mask.getpixel((47, 5)) == 0
    opaque = load_mask(other, (48, 32), MaskSettings(alpha_mask=True))  # no alpha: all 1
    assert opaque.getextrema() == (255, 255)


def test_bad_masks_are_one_clear_error_naming_the_file(tmp_path):
    image = photo(tmp_path / "a.png", (48, 32))
    half_mask(tmp_path / "a.mask.png", (32, 32))
    with pytest.raises(ValueError, match=r"a.mask.png' is 32x32 but its photo .* is 48x32"):
        load_mask(image, (48, 32), MaskSettings())
    (tmp_path / "a.mask.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"mask '.*a.mask.png' of photo 'a.png' is not a "
                                         r"readable image"):
        load_mask(image, (48, 32), MaskSettings())


def test_mask_follows_crop_and_flip_to_latent_weights(tmp_path):
    image = Image.open(photo(tmp_path / "a.png", (48, 32))).convert("RGB")
    mask = Image.open(half_mask(tmp_path / "m.png", (48, 32)))
    crop = crop_to_bucket(image, (40, 24), generator=None, random_flip=True, mask=mask,
                          latent_factor=4, unmasked_weight=0.1)
    assert crop.pixels.shape == (2, 3, 24, 40) and crop.weights.shape == (2, 1, 6, 10)
    weights = crop.weights[0, 0]
    assert torch.allclose(weights[:, 0], torch.tensor(1.0))  # left: masked in
    assert torch.allclose(weights[:, -1], torch.tensor(0.1))  # right: unmasked_weight
    assert torch.equal(crop.weights[1], crop.weights[0].flip(-1))  # mirrored with the photo
    # SDXL's time ids: the real original size (h, w), the crop corner, the bucket (h, w):
    # scaled to 40x27 to cover 40x24, 3 rows are left over, the centered crop starts at 1.
    assert crop.time_ids[0].tolist() == [32, 48, 1, 0, 24, 40]
    assert crop.time_ids[1].tolist() == [32, 48, 1, 0, 24, 40]  # no column left over
    assert mask_weights(Image.new("L", (8, 8), 255), (2, 2), 0.3).eq(1).all()


# ---------------------------------------------------------------- batches (no model)
def cached(bucket, concept, caption="c", views=1):
    w, h = bucket[0] // 4, bucket[1] // 4
    return CachedImage(torch.randn(views, 4, h, w), torch.zeros(views, 4, h, w),
                       torch.zeros(views, 6), None, caption, concept, bucket)


def test_batches_come_from_one_bucket_weighted_by_repeats_and_pair_class_samples():
    concepts = [Concept("a", "sks dog", repeats=3),
                Concept("b", "xyz toy", class_data_dir="c", class_prompt="a toy")]
    instance = ([cached((40, 24), 0, "dog wide"), cached((24, 40), 0, "dog tall")]
                + [cached((32, 32), 1, "toy") for _ in range(2)])
    class_set = ClassSet("a toy", {(32, 32): [cached((32, 32), -1)]})
    dataset = MicroStepBatches(instance, [class_set], concepts, batch_size=2,
                               num_micro_steps=300, seed=1, rank=0, world_size=1,
                               scaling_factor=1.0)
    counts = {"dog": 0, "toy": 0}
    for step in range(300):
        batch = dataset[step]
        assert len({tuple(latent.shape) for latent in batch["latents"]}) == 1
        prompts = batch["prompts"]
        counts["dog"] += sum(p.startswith("dog") for p in prompts)
        counts["toy"] += prompts.count("toy")
        assert prompts.count("a toy") == prompts.count("toy")  # one class sample per toy
        assert batch["is_prior"].tolist() == [p == "a toy" for p in prompts]
        assert batch["loss_weights"].tolist() == [1.0] * len(prompts)
    # 2 dog photos x 3 repeats vs 2 toy photos x 1: three times as many dog samples.
    assert 2.5 < counts["dog"] / counts["toy"] < 3.5


def test_batches_are_a_function_of_seed_and_step_across_world_sizes():
    concepts = [Concept("a", "sks dog")]
    instance = [cached(b, 0, f"p{i}") for i, b in
                enumerate([(40, 24)] * 3 + [(32, 32)] * 4 + [(24, 40)] * 2)]

    def batches(batch_size, world_size, rank, steps):
        data = MicroStepBatches(instance, [], concepts, batch_size=batch_size,
                                num_micro_steps=50, seed=5, rank=rank, world_size=world_size,
                                scaling_factor=1.0)
        return [data[step] for step in steps]

    one = batches(2, 1, 0, range(20))
    assert [b["prompts"] for b in batches(2, 1, 0, reversed(range(20)))][::-1] == [
        b["prompts"] for b in one]
    ranks = [batches(1, 2, rank, range(20)) for rank in (0, 1)]
    for step in range(20):
        assert one[step]["prompts"] == ranks[0][step]["prompts"] + ranks[1][step]["prompts"]
        assert torch.equal(one[step]["latents"], torch.cat([ranks[0][step]["latents"],
                                                            ranks[1][step]["latents"]]))
    # Rounds 0 and 1 hold 3 + 4 + 2 batches of 2: each bucket's entries twice, so every
    # photo exactly twice, whatever the rounding of the buckets' 1.5, 2 and 1 batches a round.
    seen = [p for batch in one[:9] for p in batch["prompts"]]
    assert sorted(seen) == sorted(f"p{i}" for i in range(9) for _ in range(2))


# ------------------------------------------------------------------ end to end (tiny)
def test_captions_concepts_buckets_masks_train_together_sd1(tmp_path, tiny_model):
    recorder = RecordBatches()
    output = train(dataset_config(tiny_model, tmp_path, tmp_path / "out", max_train_steps=6),
                   callbacks=[recorder])
    assert len(sorted((tmp_path / "class-toy").glob("class-*.png"))) == 2
    shapes = {tuple(b["latents"].shape[2:]) for b in recorder.batches}
    assert len(shapes) > 1 and any(h != w for h, w in shapes)  # non-square buckets were used
    prompts = [p for b in recorder.batches for p in b["prompts"]]
    assert not any("[trigger]" in p for p in prompts)
    assert any(p.startswith("sks dog, ") for p in prompts)  # keep_tokens kept the trigger
    assert "a toy" in prompts
    for batch in recorder.batches:
        prior = batch["is_prior"]
        assert (batch["weights"][prior] == 1).all()  # class samples carry no mask
        expected = [1.0 if is_prior or not p or "toy" not in p else 0.5
                    for p, is_prior in zip(batch["prompts"], prior.tolist())]
        # (a dropped caption "" can be either concept; it is not checked)
        assert all(w == e for w, e, p in zip(batch["loss_weights"].tolist(), expected,
                                              batch["prompts"]) if p)
    assert any((b["weights"] < 1).any() for b in recorder.batches)  # dog-0's mask was used
    saved = yaml.safe_load((output / "training_config.yaml").read_text())
    assert saved["aspect_buckets"] is True and saved["concepts"].endswith("concepts.yaml")
    base = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    moved = load_file(output / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(base[k], moved[k]) for k in base)


def test_sdxl_time_ids_carry_each_photos_original_size(tmp_path, tiny_sdxl):
    recorder = RecordBatches()
    train(dataset_config(tiny_sdxl, tmp_path, tmp_path / "out", max_train_steps=3,
                         with_prior_preservation=False, random_flip=False, center_crop=True),
          callbacks=[recorder])
    sizes = {(48, 32): (40, 24), (32, 48): (24, 40), (40, 40): (32, 32), (64, 32): (40, 24)}
    originals = {(w, h) for (w, h) in sizes}
    for batch in recorder.batches:
        height, width = batch["latents"].shape[2:]
        for ids in batch["time_ids"].tolist():
            original = (int(ids[1]), int(ids[0]))
            assert original in originals
            assert (ids[5], ids[4]) == sizes[original] == (width * 4, height * 4)


def test_lora_with_captions_records_their_tags(tmp_path, tiny_model):
    folder = tmp_path / "photos"
    for index in range(3):
        photo(folder / f"{index}.png", (40, 40), shade=30 * index)
        (folder / f"{index}.txt").write_text(f"[trigger], red ball, pose {index}")
    recorder = RecordBatches()
    output = train(tiny_config(tiny_model, folder, tmp_path / "out", use_lora=True,
                               instance_prompt="sks dog", max_train_steps=2),
                   callbacks=[recorder])
    assert {p for b in recorder.batches for p in b["prompts"]} <= {
        f"sks dog, red ball, pose {i}" for i in range(3)}
    kohya = next(path for path in output.glob("*.safetensors")
                 if path.name != "pytorch_lora_weights.safetensors")
    with safe_open(kohya, "pt") as file:
        tags = json.loads(file.metadata()["ss_tag_frequency"])["photos"]
    assert tags["red ball"] == 3 and tags["sks dog"] == 3 and tags["pose 0"] == 1


class CountTextEncoderCalls(L.Callback):
    def __init__(self):
        self.calls = []

    def on_train_start(self, trainer, pl_module):
        encoder = pl_module.text_encoder
        forward = encoder.forward

        def counted(*args, **kwargs):
            self.calls[-1] += 1
            return forward(*args, **kwargs)

        encoder.forward = counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls.append(0)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_text_encoder_runs_once_per_step_or_never(tmp_path, tiny_model, train_text_encoder):
    folder = tmp_path / "photos"
    for index in range(4):
        photo(folder / f"{index}.png", (40, 40), shade=30 * index)
        (folder / f"{index}.txt").write_text(f"[trigger], pose {index}")
    counter = CountTextEncoderCalls()
    train(tiny_config(tiny_model, folder, tmp_path / "out", max_train_steps=3,
                      train_text_encoder=train_text_encoder), callbacks=[counter])
    # Frozen: every caption's embedding was computed before the first step.
    assert counter.calls == ([1, 1, 1] if train_text_encoder else [0, 0, 0])


def test_an_all_white_mask_trains_exactly_as_no_mask(tmp_path, tiny_model):
    plain = tmp_path / "plain"
    masked = tmp_path / "masked"
    for index, size in enumerate([(48, 32), (40, 40)]):
        photo(plain / f"{index}.png", size, shade=40 * index)
        photo(masked / f"{index}.png", size, shade=40 * index)
        Image.new("L", size, 255).save(masked / f"{index}.mask.png")
    common = dict(aspect_buckets=True, bucket_reso_steps=8, max_train_steps=2)
    a = train(tiny_config(tiny_model, plain, tmp_path / "a", **common))
    b = train(tiny_config(tiny_model, masked, tmp_path / "b", **common))
    c = train(tiny_config(tiny_model, masked, tmp_path / "c", unmasked_weight=0.0, **common))
    assert_same_weights(trained_weights(a), trained_weights(b), atol=0)
    assert_same_weights(trained_weights(a), trained_weights(c), atol=0)  # nothing is 0 here
    half_mask(masked / "0.mask.png", (48, 32))
    d = train(tiny_config(tiny_model, masked, tmp_path / "d", **common))
    with pytest.raises(AssertionError):
        assert_same_weights(trained_weights(a), trained_weights(d), atol=0)


def test_loss_weight_zero_leaves_the_unet_as_it_was(tmp_path, tiny_model):
    photo(tmp_path / "dog" / "0.png", (40, 40))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump([
        {"instance_data_dir": str(tmp_path / "dog"), "instance_prompt": "sks dog",
         "loss_weight": 0}]))
    output = train(tiny_config(tiny_model, tmp_path, tmp_path / "out", instance_data_dir=None,
                               instance_prompt=None, concepts=str(tmp_path / "c.yaml"),
                               adam_weight_decay=0.0, max_train_steps=2))
    base = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    moved = load_file(output / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(base[k], moved[k]) for k in base)


RUN_IN_FRESH_PROCESS = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_datasets import dataset_config
from test_resume import InterruptAt
from dreambooth.train.run import train
args = json.loads(sys.argv[2])
interrupt = args.pop("interrupt_at")
callbacks = [InterruptAt(interrupt)] if interrupt is not None else []
try:
    train(dataset_config(Path(args.pop("model")), Path(args.pop("root")),
                         Path(args.pop("output")), **args),
          callbacks=callbacks)
except SystemExit:
    sys.exit(3)
"""


def test_exact_resume_with_buckets_masks_several_concepts_and_ema(tmp_path, tiny_model):
    """Stopped after 2 of 6 steps (Ctrl-C) and resumed, each run in a fresh process as a
    user's would be: the (EMA) weights of an uninterrupted run, bit for bit."""
    import subprocess
    import sys

    def run(output, interrupt_at=None, **extra):
        args = dict(model=str(tiny_model), root=str(tmp_path / "data"), output=str(output),
                    interrupt_at=interrupt_at, max_train_steps=6, checkpointing_steps=1,
                    train_text_encoder=True, num_threads=1, use_ema=True, **extra)
        result = subprocess.run([sys.executable, "-c", RUN_IN_FRESH_PROCESS,
                                 str(Path(__file__).parent), json.dumps(args)],
                                capture_output=True, text=True)
        assert result.returncode in (0, 3), result.stderr[-3000:]
        return result.returncode

    assert run(tmp_path / "reference") == 0
    interrupted = tmp_path / "interrupted"
    assert run(interrupted, interrupt_at=2) == 3
    assert not (interrupted / "model_index.json").exists()
    assert (interrupted / "checkpoints").is_dir()
    assert run(interrupted, resume_from_checkpoint="latest") == 0
    assert_same_weights(trained_weights(tmp_path / "reference"), trained_weights(interrupted),
                        atol=0)
    base = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    moved = load_file(interrupted / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(base[k], moved[k]) for k in base), "training changed nothing"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_every_dataset_option_with_ema_trains_each_family(tmp_path, family_model, lora):
    """Captions (dropout, shuffle), two concepts with priors, buckets, masks and EMA at once, for
    SD 1.x, 2.x and SDXL, full fine-tune and LoRA."""
    family, model = family_model
    recorder = RecordBatches()
    extra = dict(use_lora=True, rank=4, train_text_encoder=True) if lora else {}
    output = train(dataset_config(model, tmp_path, tmp_path / "out", max_train_steps=3,
                                  use_ema=True, **extra), callbacks=[recorder])
    shapes = {tuple(b["latents"].shape[2:]) for b in recorder.batches}
    assert any(h != w for h, w in shapes), f"{family}: only square buckets {shapes}"
    assert any((b["weights"] < 1).any() for b in recorder.batches)
    if lora:
        files = list(output.glob("*.safetensors"))
        assert files and all(f.stat().st_size > 0 for f in files)
    else:
        assert (output / "model_index.json").exists()
