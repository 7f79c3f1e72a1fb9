"""Generation and serving with SD 3.x and FLUX.1 on tiny pipelines (dreambooth.tiny, CPU, 32x32,
2-4 flow-matching steps): determinism per seed, edits, LoRAs, A1111 parameters, the server."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dreambooth.cli import main
from dreambooth.formats.infotext import model_hash, parse_parameters
from dreambooth.generate import (
    FLOW_SCHEDULERS,
    GenerationError,
    apply_lora,
    default_steps,
    edit_images,
    generate,
    sample_images,
    set_scheduler,
    traits,
)
from dreambooth.images import read_png_text
from dreambooth.models import load_pipeline
from dreambooth.pipelines import default_guidance
from dreambooth.tiny import save_tiny_pipeline

FAMILIES = ("sd3", "flux")
PROMPT = "a photo of sks dog"
SIZE = dict(height=32, width=32)
PICTURE = Image.new("RGB", (32, 32), (200, 40, 40))
BLUE = Image.new("RGB", (32, 32), (20, 40, 220))
MASK = Image.new("L", (32, 32), 0)
MASK.paste(255, (0, 0, 32, 16))  # white: repaint the top half


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-models")
    return {family: save_tiny_pipeline(root / f"tiny-{family}", family=family)
            for family in FAMILIES}


@pytest.fixture(scope="module")
def pipelines(folders):
    return {family: load_pipeline(folder, device="cpu") for family, folder in folders.items()}


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def one_image(pipeline, seed: int = 1, prompt: str = PROMPT, **kwargs) -> np.ndarray:
    return pixels(sample_images(pipeline, prompt, seeds=[seed], num_inference_steps=3, **SIZE,
                                **kwargs)[0])


def schnell(pipeline):
    """The FLUX.1 pipeline with a transformer without guidance input (FLUX.1-schnell's
    `guidance_embeds` false), over the same other modules."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    config = {**pipeline.transformer.config, "guidance_embeds": False}
    transformer = FluxTransformer2DModel.from_config(config).eval()
    return FluxPipeline(**{**pipeline.components, "transformer": transformer})


# --- text to image -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_an_image_depends_only_on_its_seed(pipelines, family):
    pipeline = pipelines[family]
    kwargs = dict(seeds=[0, 1, 2], num_inference_steps=2, **SIZE)
    one_by_one = sample_images(pipeline, PROMPT, batch_size=1, **kwargs)
    together = sample_images(pipeline, PROMPT, batch_size=3, **kwargs)
    for alone, batched in zip(one_by_one, together):
        assert np.abs(pixels(alone) - pixels(batched)).max() <= 1
    assert not np.array_equal(pixels(together[0]), pixels(together[1]))
    assert np.array_equal(one_image(pipeline, 5), one_image(pipeline, 5))


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_from_a_folder_writes_a1111_parameters(folders, pipelines, family, tmp_path):
    result = generate(folders[family], PROMPT, num_images=2, seed=7, num_inference_steps=2,
                      output_dir=tmp_path, **SIZE)
    assert [path.name for path in result.paths] == ["00000-7.png", "00001-8.png"]
    live = generate(pipelines[family], PROMPT, num_images=1, seed=8, num_inference_steps=2,
                    **SIZE)
    assert np.array_equal(pixels(live.images[0]), pixels(Image.open(result.paths[1])))
    params = parse_parameters(read_png_text(result.paths[1])["parameters"])
    assert params["prompt"] == PROMPT and params["Seed"] == "8" and params["Steps"] == "2"
    assert params["Sampler"] == "Euler" and params["Size"] == "32x32"
    assert params["Model"] == f"tiny-{family}"
    assert params["Model hash"] == model_hash(folders[family])
    if family == "sd3":  # classifier-free guidance, SD 3 Medium's 7
        assert params["CFG scale"] == "7.0" and "Distilled CFG Scale" not in params
    else:  # FLUX.1-dev: no CFG; its distilled guidance as Forge writes it
        assert params["CFG scale"] == "1.0" and params["Distilled CFG Scale"] == "3.5"


def test_defaults_follow_the_family(pipelines):
    sd3, flux = pipelines["sd3"], pipelines["flux"]
    assert (default_steps(sd3), default_guidance(sd3)) == (28, 7.0)
    assert (default_steps(flux), default_guidance(flux)) == (28, 3.5)
    fast = schnell(flux)
    assert (default_steps(fast), default_guidance(fast)) == (4, 0.0)
    # T5 reads at most what the tokenizer holds: the tiny SD 3's 256, FLUX.1-dev's 512,
    # schnell's 256.
    assert [traits(p).max_sequence_length for p in (sd3, flux, fast)] == [256, 512, 256]
    assert traits(sd3).native_size == 32  # its transformer's sample_size x the VAE's 4
    # Steps by default: 4 on schnell; the image is the one 4 explicit steps give.
    by_default = sample_images(fast, PROMPT, seeds=[2], **SIZE)[0]
    explicit = sample_images(fast, PROMPT, seeds=[2], num_inference_steps=4, **SIZE)[0]
    assert np.array_equal(pixels(by_default), pixels(explicit))


def test_a_trained_model_samples_with_its_recorded_t5_length(folders, pipelines, tmp_path):
    import shutil

    from dreambooth.models import TRAINING_CONFIG_FILE

    trained = shutil.copytree(folders["flux"], tmp_path / "trained")
    (trained / TRAINING_CONFIG_FILE).write_text(
        "max_sequence_length: 16\nvalidation_guidance_scale: 5.0\n")
    pipeline = load_pipeline(trained, device="cpu")
    assert traits(pipeline).max_sequence_length == 16 and default_guidance(pipeline) == 5.0
    # The same weights: only the T5 padding FLUX attends to (and the guidance) differ.
    base = one_image(pipelines["flux"], guidance_scale=5.0)
    assert not np.array_equal(one_image(pipeline, guidance_scale=5.0), base)


def test_flux_guidance_is_the_distilled_input_and_schnell_has_none(pipelines):
    flux = pipelines["flux"]
    assert not np.array_equal(one_image(flux, guidance_scale=1.0),
                              one_image(flux, guidance_scale=8.0))
    fast = schnell(flux)
    assert np.array_equal(one_image(fast), one_image(fast, guidance_scale=0.0))
    with pytest.raises(GenerationError, match="guidance_scale=3.5 has no effect") as info:
        one_image(fast, guidance_scale=3.5)
    assert info.value.param == "guidance_scale"


def test_negative_prompt_works_on_sd3_and_is_refused_on_flux(pipelines):
    sd3 = pipelines["sd3"]
    assert not np.array_equal(one_image(sd3), one_image(sd3, negative_prompt="blurry"))
    with pytest.raises(GenerationError, match="negative_prompt is not used by FLUX.1") as info:
        one_image(pipelines["flux"], negative_prompt="blurry")
    assert info.value.param == "negative_prompt"


@pytest.mark.parametrize("family", FAMILIES)
def test_samplers_of_the_flow_ode_run_and_unet_samplers_are_refused(pipelines, family):
    pipeline = pipelines[family]
    original = pipeline.scheduler
    euler = one_image(pipeline)
    assert set_scheduler(pipeline, "dpm++") == "DPM++ 2M"
    assert pipeline.scheduler.config.use_flow_sigmas
    assert pipeline.scheduler.config.flow_shift == original.config.shift
    dpm = one_image(pipeline)
    pipeline.scheduler = original
    assert not np.array_equal(euler, dpm)
    assert np.abs(euler - dpm).mean() < 40  # the same ODE, another solver
    for name in ("ddim", "euler_a", "pndm"):
        with pytest.raises(GenerationError, match=f"scheduler='{name}' samples the noise "
                                                  "schedule of UNet models") as info:
            generate(pipeline, PROMPT, num_images=1, scheduler=name, **SIZE)
        assert ", ".join(FLOW_SCHEDULERS) in str(info.value)
    assert pipeline.scheduler is original


def test_sizes_off_the_token_grid_are_refused(pipelines):
    from diffusers import AutoencoderKL, FluxPipeline

    flux = pipelines["flux"]
    # A VAE of 8x (as the real ones): FLUX.1's 2x2 latent patches make 16-pixel tokens.
    config = {**flux.vae.config, "block_out_channels": (16, 32, 32, 32),
              "down_block_types": ("DownEncoderBlock2D",) * 4,
              "up_block_types": ("UpDecoderBlock2D",) * 4}
    big = FluxPipeline(**{**flux.components, "vae": AutoencoderKL.from_config(config)})
    assert traits(big).size_multiple == 16
    with pytest.raises(GenerationError, match="height=40 is not a multiple of 16") as info:
        sample_images(big, PROMPT, seeds=[0], num_inference_steps=1, height=40, width=32)
    assert info.value.param == "height"
    with pytest.raises(GenerationError, match="width=36 is not a positive multiple of 8"):
        sample_images(flux, PROMPT, seeds=[0], num_inference_steps=1, height=32, width=36)
    assert sample_images(big, PROMPT, seeds=[0], num_inference_steps=1, height=32,
                         width=48)[0].size == (48, 32)
    with pytest.raises(GenerationError, match="image is 40x32, not a multiple of 16"):
        edit_images(big, PROMPT, image=Image.new("RGB", (40, 32)), seeds=[0],
                    num_inference_steps=2)
    edited = edit_images(big, PROMPT, image=Image.new("RGB", (40, 32)), seeds=[0],
                         num_inference_steps=2, height=32, width=48)
    assert edited[0].size == (48, 32)


def test_the_cli_says_what_is_wrong_in_one_line(folders, tmp_path, capsys):
    common = ["generate", "--model", str(folders["flux"]), "--prompt", PROMPT,
              "--output_dir", str(tmp_path), "--num_images", "1", "--height", "32",
              "--width", "32", "--num_inference_steps", "1"]
    for extra, message in ((["--negative_prompt", "blurry"], "negative_prompt is not used"),
                           (["--scheduler", "ddim"], "scheduler='ddim' samples the noise")):
        assert main(common + extra) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and message in error and "\n" not in error
    assert main(common) == 0
    assert [path.name for path in tmp_path.iterdir()] == ["00000-0.png"]


# --- image to image and inpainting -------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_img2img_follows_the_picture_as_far_as_strength_says(pipelines, family):
    pipeline = pipelines[family]

    def edit(picture, strength):
        return pixels(edit_images(pipeline, PROMPT, image=picture, strength=strength, seeds=[3],
                                  num_inference_steps=4)[0])

    # At strength 1 the flow starts from pure noise (x_1 = noise): the picture plays no part.
    assert np.array_equal(edit(PICTURE, 1.0), edit(BLUE, 1.0))
    half_red, half_blue = edit(PICTURE, 0.5), edit(BLUE, 0.5)
    assert np.abs(half_red - half_blue).max() > 10
    assert half_red.shape == (32, 32, 3)
    kwargs = dict(image=PICTURE, seeds=[0, 1, 2], num_inference_steps=4)
    one_by_one = edit_images(pipeline, PROMPT, batch_size=1, **kwargs)
    together = edit_images(pipeline, PROMPT, batch_size=3, **kwargs)
    for alone, batched in zip(one_by_one, together):
        assert np.abs(pixels(alone) - pixels(batched)).max() <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_inpainting_changes_only_the_masked_latents(pipelines, family):
    pipeline = pipelines[family]
    decoded = []
    # The latents the VAE decodes (B, 16, 8, 8): the picture's outside the mask, generated
    # inside it.
    hook = pipeline.vae.decoder.register_forward_pre_hook(
        lambda module, args: decoded.append(args[0].clone()))
    try:
        for prompt in (PROMPT, "a blue star on the beach"):
            edit_images(pipeline, prompt, image=PICTURE, mask=MASK, seeds=[4],
                        num_inference_steps=4)
    finally:
        hook.remove()
    first, second = decoded
    kept = slice(4, 8)  # latent rows 4-7: the bottom half, black in the mask
    assert torch.equal(first[..., kept, :], second[..., kept, :])
    assert (first[..., :4, :] - second[..., :4, :]).abs().max() > 1e-3


# --- LoRA --------------------------------------------------------------------------------------

def diffusers_lora(pipeline, folder, *, seed: int, strength: float = 3.0):
    """A LoRA file written by diffusers' own `save_lora_weights` of the family's pipeline,
    from a peft-adapted copy of the tiny transformer (random A and B)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cls = (FluxTransformer2DModel if traits(pipeline).family.startswith("flux")
           else SD3Transformer2DModel)
    torch.manual_seed(seed)
    transformer = cls.from_config(pipeline.transformer.config)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = {key: value * strength if "lora_B" in key else value
              for key, value in get_peft_model_state_dict(transformer).items()}
    type(pipeline).save_lora_weights(folder, transformer_lora_layers=layers)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture
def lora_pipelines(folders):
    """Pipelines of their own: LoRA adapters stay loaded (switched off) once applied."""
    return {family: load_pipeline(folder, device="cpu") for family, folder in folders.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_changes_the_image_and_scale_0_does_not(lora_pipelines, family, tmp_path):
    pipeline = lora_pipelines[family]
    base = one_image(pipeline)
    lora = diffusers_lora(pipeline, tmp_path / "lora", seed=1)
    apply_lora(pipeline, lora, 1.0)
    full = one_image(pipeline)
    apply_lora(pipeline, lora, 0.0)
    off = one_image(pipeline)
    apply_lora(pipeline, None)
    assert np.abs(full - base).max() > 10
    assert np.array_equal(off, base)
    assert np.array_equal(one_image(pipeline), base)
    adapters = pipeline.get_list_adapters()  # loaded once, into the transformer only
    assert list(adapters) == ["transformer"] and len(adapters["transformer"]) == 1
    unet_lora = tmp_path / "unet.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.zeros(4, 8),
               "unet.down_blocks.0.attentions.0.to_q.lora_B.weight": torch.zeros(8, 4)},
              str(unet_lora))
    with pytest.raises(GenerationError, match="no LoRA weights for this model's transformer"):
        apply_lora(pipeline, unet_lora)
    assert np.array_equal(one_image(pipeline), base)


def _assert_kohya_lora_matches_diffusers(pipeline, modules: dict[str, str], seed: int,
                                         tmp_path) -> None:
    """One random LoRA on `modules` ({kohya name without `lora_unet_`: diffusers module}),
    written in kohya's layout and in diffusers' (alpha folded into B): both give one image."""
    base = one_image(pipeline)
    generator = torch.Generator().manual_seed(seed)
    rank, alpha = 4, 2.0
    kohya, peft_layout = {}, {}
    for name, module in modules.items():
        layer = pipeline.transformer.get_submodule(module)
        down = torch.randn(rank, layer.in_features, generator=generator)
        up = torch.randn(layer.out_features, rank, generator=generator)
        kohya |= {f"lora_unet_{name}.lora_down.weight": down,
                  f"lora_unet_{name}.lora_up.weight": up,
                  f"lora_unet_{name}.alpha": torch.tensor(alpha)}
        peft_layout |= {f"transformer.{module}.lora_A.weight": down,
                        f"transformer.{module}.lora_B.weight": up * alpha / rank}
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    save_file(peft_layout, str(tmp_path / "diffusers.safetensors"))
    apply_lora(pipeline, tmp_path / "kohya.safetensors")
    with_kohya = one_image(pipeline)
    apply_lora(pipeline, tmp_path / "diffusers.safetensors")
    with_diffusers = one_image(pipeline)
    assert np.abs(with_kohya - base).max() > 10
    assert np.abs(with_kohya - with_diffusers).max() <= 1


def test_a_kohya_sd3_lora_gives_the_images_of_the_same_diffusers_lora(lora_pipelines, tmp_path):
    # diffusers reads no kohya SD 3 files; formats.lora_files.kohya_to_diffusers converts them.
    _assert_kohya_lora_matches_diffusers(
        lora_pipelines["sd3"], {"joint_blocks_0_x_block_attn_proj":
                                "transformer_blocks.0.attn.to_out.0"}, 3, tmp_path)


def test_a_kohya_flux_lora_gives_the_images_of_the_same_diffusers_lora(lora_pipelines,
                                                                       tmp_path):
    # BFL module names (kohya's `lora_unet_` prefix) and the diffusers modules they are.
    _assert_kohya_lora_matches_diffusers(lora_pipelines["flux"], {
        "double_blocks_0_img_attn_proj": "transformer_blocks.0.attn.to_out.0",
        "double_blocks_0_txt_attn_proj": "transformer_blocks.0.attn.to_add_out",
        "double_blocks_0_img_mlp_0": "transformer_blocks.0.ff.net.0.proj"}, 2, tmp_path)


def test_generate_records_the_lora_as_a1111_does(folders, tmp_path):
    pipeline = load_pipeline(folders["flux"], device="cpu")
    lora = diffusers_lora(pipeline, tmp_path / "sks-style", seed=3)
    result = generate(pipeline, PROMPT, num_images=1, num_inference_steps=2, lora=lora.parent,
                      lora_scale=0.5, output_dir=tmp_path / "out", **SIZE)
    params = parse_parameters(read_png_text(result.paths[0])["parameters"])
    assert params["prompt"] == f"{PROMPT} <lora:pytorch_lora_weights:0.5>"
    assert params["Lora hashes"].startswith("pytorch_lora_weights: ")
    assert pipeline.get_list_adapters()  # loaded, and switched off after the call:
    plain = generate(pipeline, PROMPT, num_images=1, num_inference_steps=2, **SIZE).images[0]
    fresh = generate(folders["flux"], PROMPT, num_images=1, num_inference_steps=2, **SIZE)
    assert np.array_equal(pixels(plain), pixels(fresh.images[0]))


# --- the server --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):
    from fastapi.testclient import TestClient
    from openai import OpenAI

    from dreambooth.serve.app import create_app

    lora = diffusers_lora(load_pipeline(folders["flux"], device="cpu"),
                          tmp_path_factory.mktemp("served-lora"), seed=4)
    app = create_app({"flux": folders["flux"], "sd3": folders["sd3"]},
                     loras={"flux-style": lora}, device="cpu", batch_wait_ms=0,
                     max_image_size=256, max_steps=40)
    with TestClient(app, raise_server_exceptions=False) as http:
        yield http, OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0,
                           http_client=http)


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


STEPS = {"num_inference_steps": 2, "seed": 11}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_server_generates_what_the_api_generates(server, pipelines, family):
    _, client = server
    answer = client.images.generate(model=family, prompt=PROMPT, n=2, size="32x32",
                                    extra_body=STEPS)
    images = [decode(item.b64_json) for item in answer.data]
    assert [item.model_extra["seed"] for item in answer.data] == [11, 12]
    direct = sample_images(pipelines[family], PROMPT, seeds=[11, 12], num_inference_steps=2,
                           **SIZE)
    for served, local in zip(images, direct):
        assert np.abs(pixels(served) - pixels(local)).max() <= 1
    params = parse_parameters(images[0].info["parameters"])
    assert params["Sampler"] == "Euler" and params["Model"] == family
    assert params["CFG scale"] == ("7.0" if family == "sd3" else "1.0")
    # quality: a share of the model's own 28 steps.
    low = client.images.generate(model=family, prompt=PROMPT, size="32x32", quality="low",
                                 extra_body={"seed": 11})
    assert parse_parameters(decode(low.data[0].b64_json).info["parameters"])["Steps"] == "14"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_server_edits_and_inpaints(server, family):
    _, client = server

    def png(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 16))  # alpha 0: change the top half
    for extra in ({}, {"mask": ("mask.png", png(mask), "image/png")}):
        answer = client.images.edit(model=family, image=("in.png", png(PICTURE), "image/png"),
                                    prompt=PROMPT, extra_body={"num_inference_steps": 4},
                                    **extra)
        image = decode(answer.data[0].b64_json)
        assert image.size == (32, 32)
        params = parse_parameters(image.info["parameters"])
        assert params["Denoising strength"] == ("1.0" if extra else "0.8")


def test_the_server_applies_a_flux_lora(server):
    _, client = server

    def one(**extra):
        answer = client.images.generate(model="flux", prompt=PROMPT, size="32x32",
                                        extra_body={**STEPS, **extra})
        return decode(answer.data[0].b64_json)

    base, styled = one(), one(lora="flux-style")
    assert np.abs(pixels(styled) - pixels(base)).max() > 10
    assert np.array_equal(pixels(one(lora="flux-style", lora_scale=0.0)), pixels(base))
    assert "<lora:flux-style:1>" in styled.info["parameters"]
    assert np.array_equal(pixels(one()), pixels(base))  # off again


def test_the_server_answers_chat_and_a1111_for_flux(server):
    http, _ = server
    chat = http.post("/api/v1/chat/completions", json={
        "model": "flux", "modalities": ["image", "text"], "size": "32x32", **STEPS,
        "messages": [{"role": "user", "content": PROMPT}]})
    assert chat.status_code == 200, chat.text
    url = chat.json()["choices"][0]["message"]["images"][0]["image_url"]["url"]
    assert decode(url.split(",", 1)[1]).size == (32, 32)
    a1111 = {"prompt": PROMPT, "width": 32, "height": 32, "steps": 2, "seed": 3,
             "override_settings": {"sd_model_checkpoint": "flux"}}
    answer = http.post("/sdapi/v1/txt2img", json={**a1111, "distilled_cfg_scale": 5.0,
                                                  "sampler_name": "Euler"})
    assert answer.status_code == 200, answer.text
    infotext = parse_parameters(decode(answer.json()["images"][0]).info["parameters"])
    assert infotext["Distilled CFG Scale"] == "5.0" and infotext["CFG scale"] == "1.0"
    # Forge's way: cfg_scale 1, the guidance in distilled_cfg_scale; our default: the model's.
    default = http.post("/sdapi/v1/txt2img", json={**a1111, "cfg_scale": 1})
    assert default.status_code == 200
    assert '"distilled_cfg_scale": 3.5' in default.json()["info"]


@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/images/generations", {"scheduler": "ddim"}, "scheduler",
     "samples the noise schedule of UNet models"),
    ("/v1/images/generations", {"negative_prompt": "blurry"}, "negative_prompt",
     "negative_prompt is not used by FLUX.1"),
    ("/v1/images/generations", {"size": "36x36"}, "size", "multiples of 8"),
    ("/sdapi/v1/txt2img", {"cfg_scale": 7}, "cfg_scale", "send cfg_scale 1"),
    ("/sdapi/v1/txt2img", {"sampler_name": "DDIM"}, "sampler_name",
     "'DDIM' on FLUX.1 models; valid: Euler, DPM++ 2M"),
])
def test_what_flux_cannot_do_is_one_clear_400(server, path, body, param, message):
    http, _ = server
    request = ({"model": "flux", "prompt": PROMPT, "size": "32x32"} if path.startswith("/v1")
               else {"prompt": PROMPT, "width": 32, "height": 32,
                     "override_settings": {"sd_model_checkpoint": "flux"}})
    response = http.post(path, json={**request, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_sd3_takes_a_negative_prompt_over_the_server(server):
    _, client = server
    answer = client.images.generate(model="sd3", prompt=PROMPT, size="32x32",
                                    extra_body={**STEPS, "negative_prompt": "blurry"})
    params = parse_parameters(decode(answer.data[0].b64_json).info["parameters"])
    assert params["negative_prompt"] == "blurry"


def test_a_transformer_step_costs_its_size():
    from dreambooth.pipelines import Traits
    from dreambooth.serve.batching import BatchKey
    from dreambooth.serve.state import DEFAULT_MAX_WORK, work

    flux_dev = Traits(family="flux", label="FLUX.1", default_steps=28, size_multiple=16,
                      native_size=1024, max_sequence_length=512, text_tokens=512,
                      patch_pixels=16, guidance="distilled")
    key = BatchKey("txt2img", 1024, 1024, 28, 3.5, None, None, 1.0, None)
    one = work(key, 1, 8, flux_dev, int(11.9e9))
    assert 80 < one < DEFAULT_MAX_WORK < 2 * one  # one 1024 px FLUX.1-dev image by default
    sdxl = BatchKey("txt2img", 1024, 1024, 50, 7.5, None, None, 1.0, None)
    assert one < work(sdxl, 1, 8) < 1.3 * one  # about SDXL's 50 steps (its UNet, no traits)
    # A tiny transformer costs what a UNet of its pixels does, not less.
    tiny = BatchKey("txt2img", 32, 32, 2, 3.5, None, None, 1.0, None)
    assert work(tiny, 1, 4, flux_dev, 10_000) >= work(tiny, 1, 4) * 0.99


def test_a_schnell_model_is_served_without_guidance(pipelines):
    from fastapi.testclient import TestClient

    from dreambooth.serve.app import create_app

    app = create_app({"schnell": schnell(pipelines["flux"])}, device="cpu", batch_wait_ms=0)
    request = {"prompt": PROMPT, "size": "32x32", "seed": 1}
    with TestClient(app, raise_server_exceptions=False) as http:
        answer = http.post("/v1/images/generations", json=request)
        assert answer.status_code == 200, answer.text
        params = parse_parameters(decode(answer.json()["data"][0]["b64_json"]).info["parameters"])
        assert params["Steps"] == "4" and params["CFG scale"] == "1.0"
        assert "Distilled CFG Scale" not in params
        refused = http.post("/v1/images/generations", json={**request, "guidance_scale": 3.5})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "guidance_scale"
        # Forge sends distilled_cfg_scale whatever the model; a model without it ignores it.
        forge = http.post("/sdapi/v1/txt2img", json={
            "prompt": PROMPT, "width": 32, "height": 32, "steps": 2, "cfg_scale": 1,
            "distilled_cfg_scale": 3.5})
        assert forge.status_code == 200, forge.text
