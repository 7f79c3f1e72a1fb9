"""End-to-end tests of the generation API on a tiny 32x32 pipeline (CPU, 2 denoising steps)."""

from __future__ import annotations

import numpy as np
import pytest

from dreambooth.generate import (
    SCHEDULERS,
    GenerationError,
    format_parameters,
    generate,
    load_pipeline,
    parse_parameters,
    sample_images,
    set_scheduler,
)
from dreambooth.images import read_png_text
from dreambooth.models import ModelLoadError
from dreambooth.tiny import save_tiny_pipeline

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


def test_bad_dtype_is_named(model_dir):
    with pytest.raises(GenerationError, match="dtype='fp8'"):
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
