"""Single-file checkpoints and `dreambooth export`: family detection, safe and clear reading,
exports that diffusers' own `from_single_file` reads back tensor for tensor, LoRA files and
merges, atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dreambooth.cli import main
from dreambooth.families import UnknownArchitectureError, detect_family
from dreambooth.formats import ExportError, single_file
from dreambooth.formats.export import export_model
from dreambooth.formats.lora_files import (
    DIFFUSERS_LORA_FILE,
    LoraFileError,
    kohya_lora_file,
    lora_metadata,
    merge_lora,
    peft_to_kohya,
    save_lora_files,
)
from dreambooth.formats.single_file import (
    MismatchedWeightsError,
    SingleFileError,
    UnreadableCheckpointError,
    check_checkpoint,
    config_folder,
    load_single_file,
    read_header,
    read_state_dict,
    resolve_prediction_type,
)
from dreambooth.tiny import build_tiny_pipeline
from dreambooth.train.lora import LoraSettings, add_lora_adapters

FAMILIES = ("sd1", "sd2", "sdxl")
PIPELINES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline,
             "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Conversions and shipped configs go to a per-test cache, never ~/.cache."""
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_sdxl(seed: int = 0):
    """A tiny SDXL whose second text encoder is wider than the first, as in SDXL (768 / 1280):
    diffusers' single-file reader tells the two encoders apart by their width."""
    base = build_tiny_pipeline(family="sdxl", seed=seed)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(base.tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=48, hidden_act="gelu",
        bos_token_id=base.tokenizer.bos_token_id, eos_token_id=base.tokenizer.eos_token_id,
        pad_token_id=base.tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=2, norm_num_groups=16, transformer_layers_per_block=(1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
        attention_head_dim=(2, 4), cross_attention_dim=32 + 48, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=48 + 6 * 8)
    return StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(base.scheduler.config))


def build_family(family: str, **kwargs):
    return tiny_sdxl() if family == "sdxl" else build_tiny_pipeline(family=family, **kwargs)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    models = {}
    for family in FAMILIES:
        build_family(family).save_pretrained(root / family)
        models[family] = root / family
    v_model = build_tiny_pipeline(family="sd2", prediction_type="v_prediction")
    v_model.save_pretrained(root / "sd2-v")
    models["sd2-v"] = root / "sd2-v"
    return models


@pytest.fixture(scope="session")
def exported(family_models, tmp_path_factory) -> dict:
    """Each tiny family exported once as a single file."""
    root = tmp_path_factory.mktemp("exported")
    return {family: export_model(folder, "single-file", root / f"{family}.safetensors")
            for family, folder in family_models.items()}


def components(pipeline) -> dict:
    names = ["unet", "vae", "text_encoder", "text_encoder_2"]
    return {name: getattr(pipeline, name) for name in names
            if getattr(pipeline, name, None) is not None}


def assert_same_weights(a, b, dtype=None):
    first, second = components(a), components(b)
    assert first.keys() == second.keys()
    for name in first:
        sa, sb = first[name].state_dict(), second[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            expected = sa[key].to(dtype) if dtype is not None else sa[key]
            assert torch.equal(expected, sb[key]), f"{name}.{key}"


# ------------------------------------------------------------------------------------------
# Family detection and key descriptions
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_detected_from_the_key_layout(exported, family):
    keys = read_header(exported[family]).keys
    assert detect_family(keys) == family
    expected_prefix = {"sd1": "cond_stage_model.transformer.text_model.",
                       "sd2": "cond_stage_model.model.transformer.resblocks.",
                       "sdxl": "conditioner.embedders.1.model.transformer.resblocks."}[family]
    assert any(key.startswith(expected_prefix) for key in keys)
    assert any(key.startswith("model.diffusion_model.input_blocks.") for key in keys)
    assert any(key.startswith("first_stage_model.decoder.up.") for key in keys)


@pytest.mark.parametrize("keys, words", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"], ["'lora_unet_*' (2)", "LoRA"]),
    (["transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.proj_out.weight"],
     ["diffusers SD3/FLUX transformer", "pass the diffusers folder"]),
    (["double_blocks.0.img_attn.qkv.lora_down.weight"], ["LoRA"]),  # not taken for FLUX
    (["down_blocks.0.resnets.0.conv1.weight", "mid_block.resnets.0.conv1.weight"],
     ["diffusers component"]),
    (["model.diffusion_model.input_blocks.0.0.weight",
      "conditioner.embedders.0.model.ln_final.weight"], ["SDXL refiner"]),
    (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"],
     ["without a text encoder", "'first_stage_model.encoder.*' (1)"]),
    ([], ["no tensors"]),
])
def test_unknown_architecture_error_describes_the_keys(keys, words):
    with pytest.raises(UnknownArchitectureError) as error:
        detect_family(keys)
    for word in words:
        assert word in str(error.value)


def test_unknown_file_error_names_the_file(tmp_path):
    path = tmp_path / "lora-by-mistake.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(UnknownArchitectureError, match="lora-by-mistake.safetensors.*LoRA"):
        load_single_file(path)


# ------------------------------------------------------------------------------------------
# Shipped configs and tokenizer
# ------------------------------------------------------------------------------------------

# Parameter counts of the public models (diffusers/transformers modules).
PUBLIC_SIZES = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd2-v": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
             "text_encoder_2": 694_659_840},
}
# The original LDM configs' UNet parameters (v1-inference.yaml, v2-inference(-v).yaml,
# sd_xl_base.yaml), which diffusers' own helper turns into diffusers configs.
LDM_UNET = {
    "sd1": dict(model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                channel_mult=[1, 2, 4, 4], num_heads=8, transformer_depth=1, context_dim=768),
    "sd2": dict(model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                channel_mult=[1, 2, 4, 4], num_head_channels=64, use_linear_in_transformer=True,
                transformer_depth=1, context_dim=1024),
    "sdxl": dict(model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2,
                 channel_mult=[1, 2, 4], num_head_channels=64, use_linear_in_transformer=True,
                 transformer_depth=[1, 2, 10], context_dim=2048, num_classes="sequential",
                 adm_in_channels=2816),
}
IMAGE_SIZE = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}
SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sd2-v": 0.18215, "sdxl": 0.13025}


@pytest.mark.parametrize("name", ["sd1", "sd2", "sd2-v", "sdxl"])
def test_shipped_configs_are_the_public_architectures(name):
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    family = "sd2" if name == "sd2-v" else name
    folder = config_folder(family, "v_prediction" if name == "sd2-v" else "epsilon")
    models = single_file._meta_models(family, folder)
    sizes = {key: sum(p.numel() for p in model.parameters()) for key, model in models.items()}
    assert sizes == PUBLIC_SIZES[name]

    ldm = {"model": {"params": {"scale_factor": SCALE[name], "unet_config": {"params": {
        "in_channels": 4, "out_channels": 4, **LDM_UNET[family]}}, "first_stage_config": {
        "params": {"ddconfig": {"z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 128,
                                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2}}}}}}
    with pytest.warns(FutureWarning):  # image_size is deprecated there; fine for a check
        unet = create_unet_diffusers_config_from_ldm(ldm, {}, image_size=IMAGE_SIZE[name])
        vae = create_vae_diffusers_config_from_ldm(ldm, {}, image_size=IMAGE_SIZE[name])
    for config, model in ((unet, models["unet"]), (vae, models["vae"])):
        for key, value in config.items():
            shipped = model.config[key]
            assert (list(shipped) if isinstance(shipped, tuple) else shipped) == value, key
    index = json.loads((folder / "model_index.json").read_text())
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == ("v_prediction" if name == "sd2-v" else "epsilon")
    assert scheduler["_class_name"] == index["scheduler"][1]
    assert (scheduler["beta_start"], scheduler["beta_end"]) == (0.00085, 0.012)


@pytest.mark.parametrize("name, tokenizer, pad", [
    ("sd1", "tokenizer", "<|endoftext|>"), ("sd2", "tokenizer", "!"),
    ("sdxl", "tokenizer", "<|endoftext|>"), ("sdxl", "tokenizer_2", "!")])
def test_shipped_tokenizers_are_clip_bpe(name, tokenizer, pad):
    loaded = CLIPTokenizer.from_pretrained(config_folder(name) / tokenizer)
    assert len(loaded) == 49408 and loaded.model_max_length == 77
    assert loaded("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert loaded.pad_token == pad
    padded = loaded("a dog", padding="max_length", max_length=6).input_ids
    assert padded == [49406, 320, 1929, 49407] + [loaded.pad_token_id] * 2


def test_config_folders_are_assembled_once_and_share_one_vocabulary(cache_dir):
    first = config_folder("sdxl")
    assert config_folder("sdxl") == first
    assert (first / "tokenizer" / "vocab.json").read_bytes() == \
        (single_file.ASSETS / "clip_tokenizer" / "vocab.json").read_bytes()
    shipped = sum(p.stat().st_size for folder in ("clip_tokenizer", "configs")
                  for p in (single_file.ASSETS / folder).rglob("*") if p.is_file())
    assert shipped < 3_000_000  # what single-file loading ships (not the bundled models)
    assert not list(first.parent.glob(".*"))  # no staging leftovers


# ------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_exported_single_file_reads_back_exactly_with_diffusers(family, family_models, exported):
    folder = family_models[family]
    original = PIPELINES[family].from_pretrained(folder)
    loaded = PIPELINES[family].from_single_file(str(exported[family]), config=str(folder),
                                                local_files_only=True)
    assert_same_weights(original, loaded)
    with safe_open(str(exported[family]), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.architecture"] == {
        "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
        "sdxl": "stable-diffusion-xl-v1-base"}[family]
    assert metadata["modelspec.prediction_type"] == "epsilon"


@pytest.mark.parametrize("family", FAMILIES)
def test_load_single_file_builds_a_cached_pipeline_folder(family, family_models, exported,
                                                           cache_dir, monkeypatch):
    folder = load_single_file(exported[family], config=family_models[family])
    assert folder.is_relative_to(cache_dir / "single-file")
    assert_same_weights(PIPELINES[family].from_pretrained(family_models[family]),
                        PIPELINES[family].from_pretrained(folder))
    source = json.loads((folder / "single_file_source.json").read_text())
    assert source["family"] == family and source["prediction_type"] == "epsilon"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".convert-")]

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(single_file, "_from_single_file", no_second_conversion)
    assert load_single_file(exported[family], config=family_models[family]) == folder


def test_single_file_exports_to_diffusers(family_models, exported, tmp_path, monkeypatch):
    # Stand-in for the shipped SDXL config, which describes the full-size model.
    monkeypatch.setattr(single_file, "config_folder", lambda family, prediction=None:
                        family_models[family])
    out = export_model(exported["sdxl"], "diffusers", tmp_path / "from-file")
    assert_same_weights(StableDiffusionXLPipeline.from_pretrained(family_models["sdxl"]),
                        StableDiffusionXLPipeline.from_pretrained(out))
    assert json.loads((out / "export.json").read_text())["family"] == "sdxl"


def test_fp16_export_is_the_rounded_model(family_models, tmp_path):
    out = export_model(family_models["sd1"], "single-file", tmp_path / "half.safetensors",
                       dtype="fp16")
    header = read_header(out)
    assert {t.dtype for t in header.tensors.values()} == {torch.float16}
    loaded = StableDiffusionPipeline.from_single_file(
        str(out), config=str(family_models["sd1"]), local_files_only=True,
        torch_dtype=torch.float16)
    assert_same_weights(StableDiffusionPipeline.from_pretrained(family_models["sd1"]), loaded,
                        dtype=torch.float16)


def test_sdxl_whose_text_encoders_have_equal_width_is_refused(tmp_path):
    """diffusers' reader would load the first encoder's weights into the second: no export."""
    folder = tmp_path / "same-width-sdxl"
    build_tiny_pipeline(family="sdxl").save_pretrained(folder)
    out = tmp_path / "x.safetensors"
    with pytest.raises(ExportError, match="text_encoder_2: .*missing"):
        export_model(folder, "single-file", out)
    assert not out.exists() and not list(tmp_path.glob(".x.safetensors*"))


@pytest.mark.parametrize("name, model_type", [("sd1", "v1"), ("sd2", "v2"), ("sd2-v", "v2"),
                                              ("sdxl", "xl_base")])
def test_full_size_exports_have_the_public_layout(name, model_type):
    """The real architectures, built on the meta device (names and shapes, no memory): the
    export passes diffusers' reader check, and diffusers' own model-type detection and marker
    keys recognise it."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    from dreambooth.formats.export import single_file_state_dict

    family = "sd2" if name == "sd2-v" else name
    models = single_file._meta_models(family, config_folder(name))
    state = single_file_state_dict(SimpleNamespace(**models), family)  # raises if not intact
    assert infer_diffusers_model_type(state) == model_type
    markers = {"v1": ["v1", "clip"], "v2": ["v2", "open_clip"],
               "xl_base": ["xl_base", "clip_sdxl", "open_clip_sdxl"]}[model_type]
    assert all(CHECKPOINT_KEY_NAMES[marker] in state for marker in markers)
    # UNet 686 (SDXL 1680) + VAE 248 + CLIP-L 196 / OpenCLIP-H 23 layers 280 / bigG 389 tensors.
    # (Files from Stability also carry buffers such as position_ids, logit_scale, alphas_cumprod;
    # SD 2.x files a 24th OpenCLIP layer that SD 2.x never runs and diffusers does not load.)
    assert len(state) == {"sd1": 1130, "sd2": 1214, "sd2-v": 1214, "sdxl": 2513}[name]
    if family == "sdxl":  # OpenCLIP bigG: fused q/k/v and the pooled-output projection
        prefix = "conditioner.embedders.1.model."
        assert state[prefix + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
        assert state[prefix + "text_projection"].shape == (1280, 1280)
        assert state["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)


@pytest.mark.slow
def test_sd15_size_single_file_round_trip_is_exact(tmp_path):
    """A full SD 1.5-size pipeline (1.07 B random weights) survives export -> diffusers'
    from_single_file with the shipped config, every tensor bit for bit."""
    from diffusers import PNDMScheduler

    from dreambooth.formats.export import single_file_state_dict

    folder = config_folder("sd1")
    torch.manual_seed(0)
    original = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
        scheduler=PNDMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = tmp_path / "sd15-random.safetensors"
    state = single_file_state_dict(original, "sd1")
    assert len(state) == 1130  # UNet 686 + VAE 248 + CLIP text 196 tensors
    save_file(state, str(path))
    del state
    assert detect_family(read_header(path).keys) == "sd1"
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(folder),
                                                      local_files_only=True)
    assert_same_weights(original, loaded)
    del loaded
    # The cached pipeline folder made with the shipped config holds the same tensors.
    cached = load_single_file(path)
    for name, module in components(original).items():
        saved = load_file(str(next((cached / name).glob("*.safetensors"))))
        expected = module.state_dict()
        assert saved.keys() == expected.keys(), name
        assert all(torch.equal(saved[k], expected[k]) for k in expected), name
    # And the file trains as --pretrained_model_name_or_path (LoRA, 1 step, small images).
    from conftest import tiny_config, write_subject_photos
    from dreambooth.models import load_components
    from dreambooth.train.run import train

    assert load_components(path).family == "sd1"
    photos = write_subject_photos(tmp_path / "photos", count=2, size=64)
    output = train(tiny_config(path, photos, tmp_path / "lora", resolution=64, max_train_steps=1,
                               train_batch_size=1, use_lora=True))
    assert (output / "pytorch_lora_weights.safetensors").exists()


# ------------------------------------------------------------------------------------------
# Reading files safely
# ------------------------------------------------------------------------------------------

def test_ckpt_is_read_with_weights_only(exported, family_models, tmp_path):
    state = load_file(str(exported["sd1"]))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 3, "epoch": 1}, ckpt)
    again = read_state_dict(ckpt)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    folder = load_single_file(ckpt, config=family_models["sd1"])
    assert_same_weights(StableDiffusionPipeline.from_pretrained(family_models["sd1"]),
                        StableDiffusionPipeline.from_pretrained(folder))


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_needs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": RunsCode(marker)}, ckpt)
    for reader in (read_state_dict, read_header, load_single_file):
        with pytest.raises(UnreadableCheckpointError,
                           match=r"evil\.ckpt.*needs code.*(?s:.*)safetensors"):
            reader(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "header", "empty", "zip"])
def test_damaged_files_are_named_in_the_error(exported, tmp_path, damage):
    data = exported["sd1"].read_bytes()
    path = tmp_path / ("broken.ckpt" if damage == "zip" else "broken.safetensors")
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "header":
        path.write_bytes(data[:8] + b"#" + data[9:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"state_dict": {"x": torch.zeros(100)}}, path)
        path.write_bytes(path.read_bytes()[:-300])
    for reader in (read_header, read_state_dict, load_single_file):
        with pytest.raises(UnreadableCheckpointError, match=r"broken\..*(truncated|corrupted)"):
            reader(path)


def test_wrong_suffix_and_missing_file(tmp_path):
    with pytest.raises(SingleFileError, match="expected .safetensors or .ckpt"):
        read_header(tmp_path / "model.onnx")
    with pytest.raises(SingleFileError, match="does not exist"):
        load_single_file(tmp_path / "nothing.safetensors")


def test_checkpoint_that_does_not_fit_the_architecture(exported, family_models, tmp_path):
    # A tiny SD1 file against the shipped SD 1.5 config: shapes are named.
    with pytest.raises(MismatchedWeightsError, match=r"tiny|sd1.*wrong shape"):
        load_single_file(exported["sd1"])
    # An inpainting-style UNet (9 input channels) gets a hint.
    header = read_header(exported["sd1"])
    header.tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(
        32, 9, 3, 3, device="meta")
    with pytest.raises(MismatchedWeightsError, match="9 input channels"):
        check_checkpoint(header, "sd1", family_models["sd1"])
    # A file without a VAE.
    state = {k: v for k, v in load_file(str(exported["sd1"])).items()
             if not k.startswith("first_stage_model.")}
    save_file(state, str(tmp_path / "no-vae.safetensors"))
    with pytest.raises(MismatchedWeightsError, match="no-vae.safetensors.*no VAE"):
        load_single_file(tmp_path / "no-vae.safetensors", config=family_models["sd1"])


def test_sd1_text_encoder_keys_without_text_model_level_are_read(exported, family_models, tmp_path):
    canonical, short = "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."
    state = {k.replace(canonical, short): v for k, v in load_file(str(exported["sd1"])).items()}
    path = tmp_path / "old-converter.safetensors"
    save_file(state, str(path))
    folder = load_single_file(path, config=family_models["sd1"])
    assert_same_weights(StableDiffusionPipeline.from_pretrained(family_models["sd1"]),
                        StableDiffusionPipeline.from_pretrained(folder))


# ------------------------------------------------------------------------------------------
# Prediction type (SD 2.x epsilon vs v)
# ------------------------------------------------------------------------------------------

def test_prediction_type_conventions(tmp_path):
    def header(tensors=None, metadata=None, name="m.safetensors"):
        return single_file.CheckpointHeader(tmp_path / name, tensors or {}, metadata or {})

    assert resolve_prediction_type(header(), "sd1")[0] == "epsilon"
    assert resolve_prediction_type(header(), "sd2", "v_prediction")[0] == "v_prediction"
    with pytest.raises(SingleFileError, match="prediction_type must be one of"):
        resolve_prediction_type(header(), "sd2", "v")
    assert resolve_prediction_type(header({"v_pred": torch.empty(0)}), "sdxl")[0] == "v_prediction"
    assert resolve_prediction_type(header(metadata={"modelspec.prediction_type": "v"}), "sd2")[0] \
        == "v_prediction"
    assert resolve_prediction_type(header(metadata={
        "modelspec.architecture": "stable-diffusion-v2-768-v"}), "sd2")[0] == "v_prediction"
    (tmp_path / "a1111.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert resolve_prediction_type(header(name="a1111.safetensors"), "sd2")[0] == "v_prediction"
    # ComfyUI's weight test for SD 2.x, read from the file.
    probe = single_file._SD2_V_PROBE_KEY
    for std, expected in ((0.2, "v_prediction"), (0.0, "epsilon")):
        path = tmp_path / f"probe-{std}.safetensors"
        save_file({probe: torch.randn(320, generator=torch.Generator().manual_seed(0)) * std},
                  str(path))
        found = resolve_prediction_type(read_header(path), "sd2")
        assert found[0] == expected and "ComfyUI" in found[1]


def test_v_prediction_survives_export_and_load(family_models, exported):
    with safe_open(str(exported["sd2-v"]), "pt") as handle:
        assert "v_pred" in handle.keys()
        assert handle.metadata()["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    # The epsilon folder as config: the file's own marker decides.
    folder = load_single_file(exported["sd2-v"], config=family_models["sd2"])
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


# ------------------------------------------------------------------------------------------
# The export command
# ------------------------------------------------------------------------------------------

def test_export_cli_single_file_and_diffusers(family_models, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert main(["export", "--model", str(family_models["sd2"]), "--format", "single-file",
                 "--dtype", "bf16", "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    provenance = json.loads(read_header(out).metadata["dreambooth.export"])
    assert provenance["source"] == str(family_models["sd2"]) and provenance["dtype"] == "bfloat16"
    assert {t.dtype for t in read_header(out).tensors.values()} == {torch.bfloat16}
    assert detect_family(read_header(out).keys) == "sd2"

    folder = tmp_path / "as-diffusers"
    assert main(["export", "--model", str(out), "--format", "diffusers", "--dtype", "fp32",
                 "--output", str(folder)]) != 0  # tiny file vs the shipped SD 2.1 config
    assert "does not fit the SD2 architecture" in capsys.readouterr().err
    assert not folder.exists()
    assert main(["export", "--model", str(family_models["sd2"]), "--format", "diffusers",
                 "--dtype", "fp16", "--output", str(folder)]) == 0
    assert json.loads((folder / "export.json").read_text())["format"] == "diffusers"
    weights = read_header(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.tensors.values()} == {torch.float16}
    reloaded = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    assert_same_weights(StableDiffusionPipeline.from_pretrained(family_models["sd2"]), reloaded,
                        dtype=torch.float16)


def test_failed_export_leaves_existing_outputs_alone(family_models, tmp_path, capsys):
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"previous export")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["export", "--model", str(broken), "--format", "single-file",
                 "--output", str(out)]) == 2
    assert "broken.safetensors" in capsys.readouterr().err
    assert out.read_bytes() == b"previous export"
    assert {p.name for p in tmp_path.iterdir()} - {"cache"} == {"broken.safetensors",
                                                               "keep.safetensors"}
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "mine.txt").write_text("x")
    assert main(["export", "--model", str(family_models["sd1"]), "--format", "diffusers",
                 "--output", str(folder)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["mine.txt"]
    assert main(["export", "--model", str(family_models["sd1"]), "--format", "single-file",
                 "--output", str(tmp_path / "model.ckpt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------

SETTINGS = dict(rank=4, alpha=8.0, dropout=0.0, use_dora=False,
                unet_target_modules=("to_q", "to_k", "to_v", "to_out.0"),
                text_encoder_target_modules=("q_proj", "k_proj", "v_proj", "out_proj"))


def write_lora(folder, pipeline, family: str, *, text_encoder: bool = True, seed: int = 0):
    """A LoRA run's output files with random (non-zero) A and B matrices."""
    settings = LoraSettings(**SETTINGS)
    encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if family == "sdxl" else [])
    add_lora_adapters(pipeline.unet, encoders, settings, train_text_encoder=text_encoder)
    generator = torch.Generator().manual_seed(seed)
    for model in (pipeline.unet, *encoders):
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    metadata = lora_metadata(settings=settings, base_model="tiny", trigger_phrase="sks dog",
                             output_name=folder.name, resolution=32, prediction_type="epsilon",
                             training_steps=1, learning_rate=1e-4,
                             text_encoder_lr=1e-4 if text_encoder else None, num_train_images=4,
                             family=family)
    save_lora_files(folder, pipeline.unet, encoders, settings=settings, metadata=metadata,
                    output_name=folder.name, family=family)
    return folder


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    return write_lora(tmp_path_factory.mktemp("lora-sd1"), build_family("sd1"), "sd1")


def test_lora_formats_are_exported_in_the_chosen_dtype(lora_run, family_models, tmp_path):
    source = load_file(str(lora_run / DIFFUSERS_LORA_FILE))
    out = export_model(lora_run, "lora-diffusers", tmp_path / "d.safetensors", dtype="fp16")
    written = load_file(str(out))
    assert written.keys() == source.keys()
    assert all(written[k].dtype == torch.float16 and torch.equal(written[k], source[k].half())
               for k in source)
    with safe_open(str(out), "pt") as handle:
        assert "lora_adapter_metadata" in handle.metadata()
    pipeline = StableDiffusionPipeline.from_pretrained(family_models["sd1"])
    pipeline.load_lora_weights(str(out))  # diffusers accepts it

    kohya = load_file(str(kohya_lora_file(lora_run)))
    out = export_model(lora_run, "lora-kohya", tmp_path / "k.safetensors")
    assert load_file(str(out)).keys() == kohya.keys()
    # From the diffusers file alone, the kohya file is derived exactly as training writes it.
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((lora_run / DIFFUSERS_LORA_FILE).read_bytes())
    derived = load_file(str(export_model(lone, "lora-kohya", tmp_path / "k2.safetensors")))
    assert derived.keys() == kohya.keys()
    assert all(torch.equal(derived[k], kohya[k]) for k in kohya)
    with pytest.raises(LoraFileError, match="kohya-layout LoRA"):
        export_model(kohya_lora_file(lora_run), "lora-diffusers", tmp_path / "no.safetensors")


def test_merge_lora_adds_exactly_the_lora_delta(lora_run, family_models, tmp_path):
    scale = 0.5
    out = export_model(family_models["sd1"], "diffusers", tmp_path / "merged",
                       merge_lora_path=lora_run, lora_scale=scale)
    base = StableDiffusionPipeline.from_pretrained(family_models["sd1"])
    merged = StableDiffusionPipeline.from_pretrained(out)
    lora = load_file(str(lora_run / DIFFUSERS_LORA_FILE))
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    text_module = "encoder.layers.1.self_attn.q_proj"
    for component, name in (("unet", module), ("text_encoder", text_module)):
        # The file keeps transformers 4's `text_model.` level (diffusers 0.3x, ComfyUI).
        key = f"{component}.text_model.{name}" if component == "text_encoder" else f"unet.{name}"
        down = lora[f"{key}.lora_A.weight"]  # (r, in)
        up = lora[f"{key}.lora_B.weight"]  # (out, r)
        before = getattr(base, component).state_dict()[f"{name}.weight"]
        after = getattr(merged, component).state_dict()[f"{name}.weight"]
        torch.testing.assert_close(after, before + scale * (8.0 / 4) * up @ down,
                                   rtol=0, atol=1e-6)
    # Same weights as diffusers' own fuse on a fresh pipeline.
    base.load_lora_weights(str(lora_run / DIFFUSERS_LORA_FILE))
    base.fuse_lora(lora_scale=scale)
    base.unload_lora_weights()
    assert_same_weights(base, merged)
    # Merged straight into a single file as well.
    single = export_model(family_models["sd1"], "single-file", tmp_path / "merged.safetensors",
                          merge_lora_path=lora_run / DIFFUSERS_LORA_FILE, lora_scale=scale)
    assert_same_weights(merged, StableDiffusionPipeline.from_single_file(
        str(single), config=str(family_models["sd1"]), local_files_only=True))


def test_lora_of_another_family_is_refused(family_models, tmp_path):
    sdxl_lora = write_lora(tmp_path / "sdxl-lora", tiny_sdxl(), "sdxl", text_encoder=False)
    out = tmp_path / "never.safetensors"
    with pytest.raises(LoraFileError, match="made for SDXL.*model is SD1"):
        export_model(family_models["sd1"], "single-file", out, merge_lora_path=sdxl_lora)
    # Without metadata, the width of the cross-attention keys gives it away.
    state = load_file(str(sdxl_lora / DIFFUSERS_LORA_FILE))
    bare = tmp_path / "bare.safetensors"
    save_file(state, str(bare))
    pipeline = StableDiffusionPipeline.from_pretrained(family_models["sd1"])
    with pytest.raises(LoraFileError, match="80-wide text features.*take 32"):
        merge_lora(pipeline, bare, "sd1")
    assert not out.exists()


def test_lora_export_refuses_merge_and_other_adapters(lora_run, tmp_path):
    with pytest.raises(ExportError, match="does not apply"):
        export_model(lora_run, "lora-kohya", tmp_path / "x.safetensors", merge_lora_path=lora_run)
    with pytest.raises(ExportError, match="output of a LoRA run"):
        export_model(lora_run, "single-file", tmp_path / "y.safetensors")
    with pytest.raises(LoraFileError, match="other adapters"):
        peft_to_kohya({"unet.a.lora_E": torch.ones(2)}, {}, sdxl=False)  # AdaLoRA
