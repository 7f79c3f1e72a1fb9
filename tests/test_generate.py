"""End-to-end tests of the generation API on a tiny 32x32 pipeline (CPU, 2 denoising steps)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dreambooth.cli import main
from dreambooth.formats.infotext import format_parameters, model_hash, parse_parameters
from dreambooth.generate import (
    SCHEDULERS,
    GenerationError,
    apply_lora,
    edit_images,
    generate,
    sample_images,
    sampling_settings,
    set_scheduler,
)
from dreambooth.images import read_png_text
from dreambooth.models import ModelLoadError, load_pipeline, pipeline_class
from dreambooth.tiny import save_tiny_pipeline
from lora_files import write_lora

STEPS = 2
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="module")
def pipeline(model_dir):
    return load_pipeline(model_dir, device="cpu")


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_generate_writes_pngs_grid_and_parameters(model_dir, tmp_path):
    result = generate(
        str(model_dir), PROMPT, negative_prompt="blurry", num_images=3, seed=5,
        num_inference_steps=STEPS, scheduler="euler_a", output_dir=tmp_path / "out",
    )
    assert result.seeds == [5, 6, 7]
    assert [p.name for p in result.paths] == ["00000-5.png", "00001-6.png", "00002-7.png"]
    assert result.grid_path == tmp_path / "out" / "grid-00000.png"
    assert all(p.is_file() for p in result.paths) and result.grid_path.is_file()
    assert [image.size for image in result.images] == [(32, 32)] * 3
    for path, seed in zip(result.paths, result.seeds):
        params = parse_parameters(read_png_text(path)["parameters"])
        assert params["prompt"] == PROMPT and params["negative_prompt"] == "blurry"
        assert params["Seed"] == str(seed) and params["Steps"] == str(STEPS)
        assert params["Size"] == "32x32" and params["Sampler"] == "Euler a"
        assert params["CFG scale"] == "7.5" and params["Model"] == "tiny-sd"
        assert params["Model hash"] == model_hash(model_dir)


def test_single_image_writes_no_grid(pipeline, tmp_path):
    result = generate(
        pipeline, PROMPT, num_images=1, num_inference_steps=STEPS, output_dir=tmp_path
    )
    assert result.grid_path is None and len(result.paths) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-0.png"]


def test_same_seed_same_image_different_seed_differs(pipeline):
    def one(seed):
        result = generate(pipeline, PROMPT, num_images=1, seed=seed, num_inference_steps=STEPS)
        return pixels(result.images[0])

    assert np.array_equal(one(3), one(3))
    assert not np.array_equal(one(3), one(4))


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])  # euler_a also draws noise each step
def test_image_depends_only_on_its_seed_not_batching(pipeline, scheduler):
    set_scheduler(pipeline, scheduler)
    kwargs = dict(seeds=[0, 1, 2], num_inference_steps=STEPS)
    one_by_one = sample_images(pipeline, PROMPT, batch_size=1, **kwargs)
    together = sample_images(pipeline, PROMPT, batch_size=3, **kwargs)
    for a, b in zip(one_by_one, together):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    set_scheduler(pipeline, "pndm")


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_each_scheduler_runs_and_pipeline_scheduler_is_restored(pipeline, name):
    before = pipeline.scheduler
    result = generate(pipeline, PROMPT, num_images=1, num_inference_steps=STEPS, scheduler=name)
    assert result.images[0].size == (32, 32)
    assert pipeline.scheduler is before


def test_set_scheduler_keeps_model_config_and_names_sampler(pipeline):
    original = pipeline.scheduler
    assert set_scheduler(pipeline, None) == "PLMS"  # the tiny model ships PNDM
    try:
        assert set_scheduler(pipeline, "dpm++") == "DPM++ 2M"
        assert pipeline.scheduler.config.algorithm_type == "dpmsolver++"
        assert pipeline.scheduler.config.beta_schedule == original.config.beta_schedule
    finally:
        pipeline.scheduler = original


def test_ddim_does_not_clip_latents_unless_the_model_config_asks():
    from types import SimpleNamespace

    from diffusers import PNDMScheduler

    silent = SimpleNamespace(scheduler=PNDMScheduler())  # a config without clip_sample
    set_scheduler(silent, "ddim")
    assert silent.scheduler.config.clip_sample is False  # DDIM's own default is True
    asking = SimpleNamespace(scheduler=PNDMScheduler.from_config({"clip_sample": True}))
    set_scheduler(asking, "ddim")
    assert asking.scheduler.config.clip_sample is True


def test_unknown_scheduler_lists_valid_names(pipeline):
    with pytest.raises(GenerationError, match="scheduler='heun'") as info:
        generate(pipeline, PROMPT, num_images=1, scheduler="heun")
    assert all(name in str(info.value) for name in SCHEDULERS)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=30), "height=30 is not a positive multiple of 8"),
        (dict(width=0), "width=0"),
        (dict(num_inference_steps=0), "num_inference_steps=0"),
        (dict(guidance_scale=-1.0), "guidance_scale=-1.0"),
        (dict(num_images=0), "num_images=0"),
        (dict(prompt="  "), "prompt is empty"),
    ],
)
def test_bad_arguments_name_the_argument(pipeline, kwargs, message):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(GenerationError, match=message):
        generate(pipeline, **kwargs)


def test_folder_that_is_not_a_pipeline_raises_model_load_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="model_index.json"):
        generate(tmp_path, PROMPT, num_images=1)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_every_family_generates_and_edits(tmp_path, family):
    from diffusers import StableDiffusionXLPipeline

    folder = save_tiny_pipeline(tmp_path / f"tiny-{family}", family=family)
    pipeline = load_pipeline(folder, device="cpu")
    assert type(pipeline) is pipeline_class(family)
    result = generate(pipeline, PROMPT, num_images=2, num_inference_steps=2, seed=3,
                      output_dir=tmp_path / "out")
    assert len(result.paths) == 2
    again = generate(folder, PROMPT, num_images=1, num_inference_steps=2, seed=4)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[1]))
    edited = edit_images(pipeline, PROMPT, image=result.images[0], seeds=[1],
                         num_inference_steps=4)
    assert edited[0].size == result.images[0].size
    assert isinstance(pipeline, StableDiffusionXLPipeline) == (family == "sdxl")


def test_bad_dtype_is_named(model_dir):
    with pytest.raises(ModelLoadError, match="dtype='fp8'"):
        load_pipeline(model_dir, dtype="fp8")


def test_loaded_pipeline_gives_same_images_as_model_path(model_dir, pipeline):
    kwargs = dict(num_images=2, seed=11, num_inference_steps=STEPS)
    from_path = generate(model_dir, PROMPT, **kwargs).images
    from_pipeline = generate(pipeline, PROMPT, **kwargs).images
    for a, b in zip(from_path, from_pipeline):
        assert np.array_equal(pixels(a), pixels(b))


def test_negative_prompt_changes_output(pipeline):
    kwargs = dict(num_images=1, seed=2, num_inference_steps=STEPS)
    plain = generate(pipeline, PROMPT, **kwargs).images[0]
    negative = generate(pipeline, PROMPT, negative_prompt="red ball", **kwargs).images[0]
    assert not np.array_equal(pixels(plain), pixels(negative))


def test_second_call_continues_numbering_without_overwriting(pipeline, tmp_path):
    kwargs = dict(num_images=2, num_inference_steps=STEPS, output_dir=tmp_path)
    first = generate(pipeline, PROMPT, seed=0, **kwargs)
    first_bytes = [p.read_bytes() for p in first.paths]
    second = generate(pipeline, "a photo of sks cat", seed=0, **kwargs)
    assert [p.name for p in second.paths] == ["00002-0.png", "00003-1.png"]
    assert second.grid_path.name == "grid-00002.png"
    assert [p.read_bytes() for p in first.paths] == first_bytes
    assert len(list(tmp_path.glob("*.png"))) == 6


def test_random_seed_is_recorded(pipeline, tmp_path):
    result = generate(
        pipeline, PROMPT, num_images=2, seed=None, num_inference_steps=STEPS, output_dir=tmp_path
    )
    base = result.seeds[0]
    assert result.seeds == [base, base + 1]
    assert parse_parameters(read_png_text(result.paths[1])["parameters"])["Seed"] == str(base + 1)


def test_parameters_round_trip_and_a1111_layout():
    text = format_parameters(
        prompt="a photo\nof sks dog", negative_prompt="", steps=30, sampler="Euler a",
        cfg_scale=7.5, seed=1, width=512, height=512, model_name="my, model: v1",
    )
    assert "Negative prompt" not in text
    fields = "Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: "
    assert text.splitlines()[-1] == fields + '"my, model: v1"'
    params = parse_parameters(text)
    assert params["prompt"] == "a photo\nof sks dog" and params["negative_prompt"] == ""
    assert params["Model"] == "my, model: v1"
    with_negative = format_parameters(
        prompt="dog", negative_prompt="blurry, dark", steps=4, sampler="DDIM", cfg_scale=1,
        seed=9, width=32, height=64, model_name="m",
    )
    assert with_negative == (
        "dog\nNegative prompt: blurry, dark\n"
        "Steps: 4, Sampler: DDIM, CFG scale: 1.0, Seed: 9, Size: 32x64, Model: m"
    )
    assert parse_parameters(with_negative)["negative_prompt"] == "blurry, dark"


def test_parameters_use_a1111_sampler_names_model_hash_and_lora_syntax():
    text = format_parameters(
        prompt="sks dog", negative_prompt="", steps=4, sampler="DDPMScheduler", cfg_scale=7,
        seed=1, width=32, height=32, model_name="m", model_hash="0123456789",
        loras=[("sks_v1", 0.8, "abcdef012345"), ("style", 1.0, "fedcba987654")],
    )
    assert text.splitlines()[0] == "sks dog <lora:sks_v1:0.8> <lora:style:1>"
    params = parse_parameters(text)
    assert params["Sampler"] == "Euler a" and params["Model hash"] == "0123456789"
    assert params["Lora hashes"] == "sks_v1: abcdef012345, style: fedcba987654"
    assert "Lora:" not in text and "Lora scale" not in text
    # A1111's field order: Model hash before Model.
    assert text.index("Model hash: 0123456789, Model: m") > 0


def test_model_hash_is_a1111s_for_a_file_and_stable_for_a_folder(model_dir, tmp_path):
    import hashlib
    import shutil

    single = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(10.0)}, str(single))
    assert model_hash(single) == hashlib.sha256(single.read_bytes()).hexdigest()[:10]
    folder = shutil.copytree(model_dir, tmp_path / "copy")
    first = model_hash(folder)
    assert len(first) == 10 and first == model_hash(model_dir)  # the bytes, not the path
    # A run's checkpoints and LoRA files are not the model; a changed weight file is.
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "checkpoint-1.ckpt").write_bytes(b"x")
    save_file({"w": torch.zeros(1)}, str(folder / "pytorch_lora_weights.safetensors"))
    assert model_hash(folder) == first
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    key = next(iter(state))
    state[key] = state[key] + 1
    save_file(state, str(weights))
    assert model_hash(folder) != first
    assert model_hash("some-org/not-on-disk") is None


def test_a_scheduler_without_a_named_sampler_is_written_as_its_a1111_sampler(pipeline, tmp_path):
    from diffusers import DDPMScheduler

    original = pipeline.scheduler
    pipeline.scheduler = DDPMScheduler.from_config(original.config)
    try:
        result = generate(pipeline, PROMPT, num_images=1, num_inference_steps=STEPS,
                          output_dir=tmp_path)
    finally:
        pipeline.scheduler = original
    assert parse_parameters(read_png_text(result.paths[0])["parameters"])["Sampler"] == "Euler a"


def test_prompts_per_seed_give_the_images_each_prompt_gives_alone(pipeline):
    prompts = [PROMPT, "a blue star", "a red ring on the beach"]
    together = sample_images(pipeline, prompts, seeds=[4, 5, 6], num_inference_steps=STEPS,
                             negative_prompt=["", "blurry", ""])
    for image, prompt, negative, seed in zip(together, prompts, ["", "blurry", ""], [4, 5, 6]):
        alone = sample_images(pipeline, prompt, seeds=[seed], negative_prompt=negative,
                              num_inference_steps=STEPS)[0]
        assert np.abs(pixels(image) - pixels(alone)).max() <= 1


def test_prompt_list_must_match_seeds(pipeline):
    with pytest.raises(GenerationError, match="prompt has 2 entries for 3 seeds"):
        sample_images(pipeline, [PROMPT, PROMPT], seeds=[0, 1, 2], num_inference_steps=STEPS)


# --- image-to-image and inpainting ---------------------------------------------------------

PICTURE = Image.new("RGB", (32, 32), (200, 40, 40))
MASK = Image.new("L", (32, 32), 0)
MASK.paste(255, (8, 8, 24, 24))  # white: repaint


@pytest.mark.parametrize("mask", [None, MASK], ids=["img2img", "inpaint"])
def test_edit_depends_only_on_seed_not_batching(pipeline, mask):
    kwargs = dict(image=PICTURE, mask=mask, seeds=[0, 1, 2], num_inference_steps=4)
    one_by_one = edit_images(pipeline, PROMPT, batch_size=1, **kwargs)
    together = edit_images(pipeline, PROMPT, batch_size=3, **kwargs)
    assert [image.size for image in together] == [(32, 32)] * 3  # the picture's size
    for a, b in zip(one_by_one, together):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    assert not np.array_equal(pixels(together[0]), pixels(together[1]))


def test_edit_inputs_change_the_result(pipeline):
    def edit(**kwargs):
        arguments = {"image": PICTURE, "seeds": [3], "num_inference_steps": 4, **kwargs}
        return pixels(edit_images(pipeline, PROMPT, **arguments)[0])

    img2img, inpaint = edit(), edit(mask=MASK)
    assert not np.array_equal(img2img, inpaint)
    assert not np.array_equal(img2img, edit(strength=0.5))
    assert not np.array_equal(img2img, edit(image=Image.new("RGB", (32, 32), (0, 0, 255))))
    text_only = pixels(sample_images(pipeline, PROMPT, seeds=[3], num_inference_steps=4)[0])
    assert not np.array_equal(img2img, text_only)
    # Per-seed pictures: each image starts from its own picture.
    blue = Image.new("RGB", (32, 32), (0, 0, 255))
    both = edit_images(pipeline, PROMPT, image=[PICTURE, blue], seeds=[3, 3],
                       num_inference_steps=4)
    assert np.abs(pixels(both[0]) - img2img).max() <= 1
    assert not np.array_equal(pixels(both[0]), pixels(both[1]))


def test_edit_resizes_to_requested_size(pipeline):
    images = edit_images(pipeline, PROMPT, image=Image.new("RGB", (40, 24)), seeds=[0],
                         num_inference_steps=2, strength=1.0, height=32, width=32)
    assert images[0].size == (32, 32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask=Image.new("L", (16, 16))), "mask 0 is 16x16 but its image is 32x32"),
    (dict(strength=0.0), "strength=0.0 must be in"),
    (dict(strength=1.5), "strength=1.5 must be in"),
    (dict(strength=0.4, num_inference_steps=2), "leaves no denoising step"),
    (dict(image=Image.new("RGB", (30, 30))), "image is 30x30, not a multiple of 8"),
    (dict(seeds=[0, 1], image=[PICTURE]), "image has 1 entries for 2 seeds"),
])
def test_bad_edit_arguments_name_the_argument(pipeline, kwargs, message):
    kwargs = {"image": PICTURE, "seeds": [0], "num_inference_steps": 4, **kwargs}
    with pytest.raises(GenerationError, match=message):
        edit_images(pipeline, PROMPT, **kwargs)


# --- LoRA ----------------------------------------------------------------------------------

@pytest.fixture
def lora_pipeline(model_dir):
    """A pipeline of its own: LoRA adapters stay loaded (switched off) once applied."""
    return load_pipeline(model_dir, device="cpu")


def one_image(pipeline, seed: int = 1, **kwargs) -> np.ndarray:
    return pixels(sample_images(pipeline, PROMPT, seeds=[seed], num_inference_steps=STEPS,
                                **kwargs)[0])


@pytest.mark.parametrize("text_encoder", [False, True], ids=["unet", "unet+text_encoder"])
def test_lora_files_in_diffusers_and_kohya_format_give_the_same_images(
        lora_pipeline, tmp_path, text_encoder):
    base = one_image(lora_pipeline)
    diffusers_file = write_lora(lora_pipeline, tmp_path / "d.safetensors", seed=1,
                                text_encoder=text_encoder)
    kohya_file = write_lora(lora_pipeline, tmp_path / "k.safetensors", seed=1, kohya=True,
                            text_encoder=text_encoder)
    apply_lora(lora_pipeline, diffusers_file)
    with_diffusers = one_image(lora_pipeline)
    apply_lora(lora_pipeline, kohya_file)
    with_kohya = one_image(lora_pipeline)
    assert np.abs(with_diffusers - base).max() > 10
    assert np.abs(with_diffusers - with_kohya).max() <= 1
    apply_lora(lora_pipeline, None)
    assert np.array_equal(one_image(lora_pipeline), base)


def test_lora_is_loaded_once_and_scaled_per_call(lora_pipeline, tmp_path):
    base = one_image(lora_pipeline)
    folder = tmp_path / "my-lora"
    write_lora(lora_pipeline, folder / "pytorch_lora_weights.safetensors", seed=2)
    apply_lora(lora_pipeline, folder, 1.0)  # a folder holding the diffusers file
    full = one_image(lora_pipeline)
    apply_lora(lora_pipeline, folder, 0.5)
    half = one_image(lora_pipeline)
    apply_lora(lora_pipeline, folder, 0.0)
    off = one_image(lora_pipeline)
    apply_lora(lora_pipeline, folder, 1.0)
    assert np.array_equal(one_image(lora_pipeline), full)
    assert len(lora_pipeline.get_list_adapters()["unet"]) == 1  # loaded once
    assert np.abs(off - base).max() <= 1
    assert 0 < np.abs(half - base).max() < np.abs(full - base).max() + 1
    # A file rewritten on disk is loaded again, replacing the old adapter.
    write_lora(lora_pipeline, folder / "pytorch_lora_weights.safetensors", seed=3)
    apply_lora(lora_pipeline, folder)
    assert not np.array_equal(one_image(lora_pipeline), full)
    assert len(lora_pipeline.get_list_adapters()["unet"]) == 1


def test_lora_applies_to_edits_through_shared_modules(lora_pipeline, tmp_path):
    lora = write_lora(lora_pipeline, tmp_path / "l.safetensors", seed=4)
    kwargs = dict(image=PICTURE, seeds=[0], num_inference_steps=4)
    plain = pixels(edit_images(lora_pipeline, PROMPT, **kwargs)[0])
    with sampling_settings(lora_pipeline, lora=lora):
        styled = pixels(edit_images(lora_pipeline, PROMPT, **kwargs)[0])
    assert np.abs(styled - plain).max() > 10
    assert np.array_equal(pixels(edit_images(lora_pipeline, PROMPT, **kwargs)[0]), plain)


def test_bad_lora_files_are_named_and_leave_the_pipeline_usable(lora_pipeline, tmp_path):
    base = one_image(lora_pipeline)
    with pytest.raises(GenerationError, match="not found"):
        apply_lora(lora_pipeline, tmp_path / "missing.safetensors")
    (tmp_path / "weights.ckpt").write_bytes(b"pickle")
    with pytest.raises(GenerationError, match="not a .safetensors file"):
        apply_lora(lora_pipeline, tmp_path / "weights.ckpt")
    good = write_lora(lora_pipeline, tmp_path / "good.safetensors", seed=5)
    wrong_shapes = {key: torch.zeros(value.shape[0], value.shape[1] + 8) if "lora_A" in key
                    else value for key, value in load_file(good).items()}
    save_file(wrong_shapes, str(tmp_path / "other-model.safetensors"))
    with pytest.raises(GenerationError, match="cannot be applied to this model"):
        apply_lora(lora_pipeline, tmp_path / "other-model.safetensors")
    save_file({"unet.no.such.layer.lora_A.weight": torch.zeros(4, 8),
               "unet.no.such.layer.lora_B.weight": torch.zeros(8, 4)},
              str(tmp_path / "no-match.safetensors"))
    with pytest.raises(GenerationError, match="not found in the base model"):
        apply_lora(lora_pipeline, tmp_path / "no-match.safetensors")
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(GenerationError, match="holds no LoRA weights"):
        apply_lora(lora_pipeline, tmp_path / "empty.safetensors")
    with pytest.raises(GenerationError, match="lora_scale=nan"):
        apply_lora(lora_pipeline, good, float("nan"))
    assert np.array_equal(one_image(lora_pipeline), base)


def test_generate_and_cli_record_the_lora(model_dir, tmp_path):
    pipeline = load_pipeline(model_dir, device="cpu")
    lora = write_lora(pipeline, tmp_path / "sks-style.safetensors", seed=6)
    base = generate(pipeline, PROMPT, num_images=1, num_inference_steps=STEPS).images[0]
    result = generate(pipeline, PROMPT, num_images=1, num_inference_steps=STEPS, lora=lora,
                      lora_scale=0.7, output_dir=tmp_path / "api")
    params = parse_parameters(read_png_text(result.paths[0])["parameters"])
    # As A1111 writes it: pasted into A1111, the prompt applies the LoRA again.
    assert params["prompt"] == f"{PROMPT} <lora:sks-style:0.7>"
    data = lora.read_bytes()
    tensor_data = data[8 + int.from_bytes(data[:8], "little"):]
    assert params["Lora hashes"] == f"sks-style: {hashlib.sha256(tensor_data).hexdigest()[:12]}"
    assert not np.array_equal(pixels(result.images[0]), pixels(base))
    after = generate(pipeline, PROMPT, num_images=1, num_inference_steps=STEPS).images[0]
    assert np.array_equal(pixels(after), pixels(base))  # LoRA off again after the call
    code = main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--num_images", "1",
                 "--num_inference_steps", str(STEPS), "--lora", str(lora), "--lora_scale", "0.7",
                 "--output_dir", str(tmp_path / "cli")])
    assert code == 0
    cli_png = tmp_path / "cli" / "00000-0.png"
    assert read_png_text(cli_png)["parameters"] == read_png_text(result.paths[0])["parameters"]
    assert np.array_equal(pixels(Image.open(cli_png)), pixels(result.images[0]))
