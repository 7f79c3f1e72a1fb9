"""SD 3.x and FLUX.1 in the formats the ecosystem loads: single files in the BFL / Stability
layouts and LoRAs in the kohya / ComfyUI layout (q, k, v fused), each checked by a second
reader: diffusers' own single-file and kohya-LoRA readers, and a ComfyUI-style merge."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders import single_file_utils as sfu
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth.formats.export import export_model
from dreambooth.formats.lora_files import (
    DIFFUSERS_LORA_FILE,
    LoraFileError,
    lora_family,
    lora_metadata,
    merge_lora,
    peft_to_kohya,
    save_lora_files,
)
from dreambooth.formats.single_file import SingleFileError, UnreadableCheckpointError
from dreambooth.formats.transformer_checkpoints import (
    load_transformer_file,
    sd3_pipeline_from_single_file,
    transformer_config,
)
from dreambooth.formats.transformer_keys import (
    ModuleLora,
    from_original,
    lora_delta,
    lora_to_original,
    to_original,
    transformer_file_family,
    transformer_variant,
)
from dreambooth.tiny import build_tiny_pipeline, save_tiny_pipeline
from dreambooth.train.lora import LoraSettings, add_lora_adapters

FAMILIES = ("sd3", "flux")
# Every linear layer kind a LoRA may adapt, double/joint and single blocks alike.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
           "to_add_out", "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2", "norm1.linear",
           "norm_out.linear")
# alpha / rank = 2, a power of two: scaling is exact in floating point, so merges compare equal.
SETTINGS = LoraSettings(rank=4, alpha=8.0, dropout=0.0, use_dora=False,
                        unet_target_modules=TARGETS, text_encoder_target_modules=())


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))


def _tiny(family: str, seed: int = 0):
    # The shared tiny SD3 has CLIP-G wider than CLIP-L and an identity CLIP-L projection, as
    # diffusers' single-file reader needs (see dreambooth.tiny).
    return build_tiny_pipeline(family=family, seed=seed)


def _with_random_lora(transformer, settings=SETTINGS, seed: int = 1):
    """The transformer with a peft LoRA whose A and B are both random (B is zero at init)."""
    add_lora_adapters(transformer, [], settings, train_text_encoder=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return transformer


def _metadata(family: str, pipeline) -> dict[str, str]:
    return lora_metadata(settings=SETTINGS, base_model="/models/tiny", trigger_phrase="sks dog",
                         output_name="tiny", resolution=32, prediction_type="epsilon",
                         training_steps=3, learning_rate=1e-4, text_encoder_lr=None,
                         num_train_images=4, family=family,
                         variant=transformer_variant(family, pipeline.transformer.config))


def _lora_files(tmp_path, family: str):
    """(pipeline, diffusers file, kohya file) of a random LoRA on every TARGETS layer."""
    pipeline = _tiny(family)
    transformer = _with_random_lora(_tiny(family).transformer)
    paths = save_lora_files(tmp_path / f"{family}-lora", transformer, [], settings=SETTINGS,
                            metadata=_metadata(family, pipeline), output_name="tiny",
                            family=family)
    return pipeline, *paths


def _comfy_merge(original: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]):
    """What ComfyUI does with a kohya-layout LoRA (comfy/lora.py): `lora_unet_<name with _>`
    names the model weight `<name>.weight`; W += alpha / rank * up @ down."""
    names = {key[:-len(".weight")].replace(".", "_"): key for key in original
             if key.endswith(".weight")}
    merged = dict(original)
    for key in lora:
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[:-len(".lora_down.weight")]
        target = names[base.removeprefix("lora_unet_")]
        down, up = lora[key], lora[f"{base}.lora_up.weight"]
        alpha = lora[f"{base}.alpha"].item()
        merged[target] = original[target] + (alpha / down.shape[0]) * (up @ down)
    return merged


def _fused(pipeline, lora_path):
    pipeline.load_lora_weights(str(lora_path), adapter_name="x")
    pipeline.fuse_lora(adapter_names=["x"])
    pipeline.unload_lora_weights()
    return {k: v.clone() for k, v in pipeline.transformer.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Weights: diffusers <-> original names
# --------------------------------------------------------------------------------------------

def test_sd3_original_names_are_what_diffusers_reads_back():
    # A dual-attention SD 3.5-medium-like model with qk-norm covers every SD3 layer kind.
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
        dual_attention_layers=(0,), qk_norm="rms_norm")
    state = {key: torch.randn_like(value) for key, value in model.state_dict().items()}
    original = to_original(state, "sd3")
    assert "joint_blocks.2.context_block.adaLN_modulation.1.weight" in original
    assert "joint_blocks.0.x_block.attn2.qkv.weight" in original
    back = sfu.convert_sd3_transformer_checkpoint_to_diffusers(
        {"model.diffusion_model." + key: value for key, value in original.items()})
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], state[key]) for key in state)
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    ours = from_original(original, "sd3", shapes)
    assert all(torch.equal(ours[key], state[key]) for key in state)


def _thin_flux_state():
    """FLUX.1-dev's real widths (3072, MLP 12288) with 2 + 2 blocks, each tensor (rows, 1) and
    every row numbered: diffusers' reader splits rows only, so this checks its cuts value by
    value in a few kilobytes."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    state, row = {}, 0
    for key, value in model.state_dict().items():
        rows = value.shape[0]
        state[key] = torch.arange(row, row + rows, dtype=torch.float64).reshape(
            rows, *([1] * (value.ndim - 1)))
        row += rows
    return state


def test_flux_original_names_are_what_diffusers_reads_back_at_flux1_width():
    state = _thin_flux_state()
    original = to_original(state, "flux")
    assert original["single_blocks.1.linear1.weight"].shape[0] == 3 * 3072 + 12288
    assert "double_blocks.1.txt_attn.norm.key_norm.scale" in original
    back = sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], state[key]) for key in state)
    # Our reader, which cuts at the model's own widths, agrees with diffusers' at FLUX.1's.
    ours = from_original(original, "flux", {k: tuple(v.shape) for k, v in state.items()})
    assert all(torch.equal(ours[key], state[key]) for key in state)


def test_shipped_configs_describe_the_released_transformers():
    from dreambooth.formats.transformer_checkpoints import TRANSFORMER_CONFIGS

    widths = {"flux-dev": 3072, "flux-schnell": 3072, "sd3-medium": 1536, "sd3.5-large": 2432,
              "sd3.5-medium": 1536}
    for variant in TRANSFORMER_CONFIGS:
        family = "flux" if variant.startswith("flux") else "sd3"
        cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
        config = cls.load_config(str(transformer_config(variant)))
        assert transformer_variant(family, config) == variant
        with torch.device("meta"):
            model = cls.from_config(config)
        assert model.inner_dim == widths[variant]
        original = to_original(model.state_dict(), family)
        assert transformer_file_family(original) == family
        # What we write for the released model is what diffusers' own reader takes (on meta
        # tensors: names and shapes, no memory).
        convert = (sfu.convert_flux_transformer_checkpoint_to_diffusers if family == "flux"
                   else sfu.convert_sd3_transformer_checkpoint_to_diffusers)
        back = convert({"model.diffusion_model." + k: v for k, v in original.items()})
        assert {k: tuple(v.shape) for k, v in back.items()} == \
            {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------------

@pytest.fixture
def sd3_folder(tmp_path):
    folder = tmp_path / "tiny-sd3"
    _tiny("sd3").save_pretrained(folder)
    return folder


def test_sd3_single_file_loads_back_through_diffusers(tmp_path, sd3_folder):
    path = export_model(sd3_folder, "single-file", tmp_path / "sd3.safetensors")
    with safe_open(str(path), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert transformer_file_family(keys) == "sd3"
    for prefix in ("model.diffusion_model.joint_blocks.", "first_stage_model.",
                   "text_encoders.clip_l.transformer.text_model.",
                   "text_encoders.clip_g.transformer.text_model.",
                   "text_encoders.t5xxl.transformer.encoder."):
        assert any(key.startswith(prefix) for key in keys), prefix
    assert metadata["modelspec.architecture"] == "stable-diffusion-v3-medium"
    assert "modelspec.prediction_type" not in metadata

    loaded = sd3_pipeline_from_single_file(path, sd3_folder)
    folder = _tiny("sd3")
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        ours, theirs = getattr(folder, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    kwargs = dict(prompt="a photo of sks dog", num_inference_steps=2, height=32, width=32,
                  output_type="np")
    images = [p(**kwargs, generator=torch.Generator().manual_seed(0)).images
              for p in (folder, loaded)]
    # Same weights; the loaded text encoders may pick another attention kernel (1e-6 apart).
    np.testing.assert_allclose(*images, atol=1e-5)


def test_flux_single_file_is_the_bfl_transformer_and_loads_back(tmp_path):
    folder = tmp_path / "tiny-flux"
    save_tiny_pipeline(folder, family="flux")
    path = export_model(folder, "single-file", tmp_path / "flux.safetensors", dtype="bf16")
    with safe_open(str(path), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
        assert handle.get_tensor("img_in.weight").dtype == torch.bfloat16
    assert {"img_in.weight", "txt_in.weight", "time_in.in_layer.weight",
            "vector_in.in_layer.weight", "guidance_in.in_layer.weight", "final_layer.linear.weight",
            "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"} <= keys
    assert not any(key.startswith(("model.", "first_stage_model.", "text_encoders."))
                   for key in keys)
    assert metadata["modelspec.architecture"] == "flux-1-dev"
    assert metadata["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"

    model = load_transformer_file(path, config=folder)
    original = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    ours = {k: v.to(torch.bfloat16) for k, v in original.state_dict().items()}
    assert all(torch.equal(ours[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())


def test_a_transformer_file_that_does_not_fit_gets_one_clear_error(tmp_path):
    folder = tmp_path / "tiny-flux"
    save_tiny_pipeline(folder, family="flux")
    path = export_model(folder, "single-file", tmp_path / "flux.safetensors")
    with pytest.raises(SingleFileError, match="does not fit.*config"):
        load_transformer_file(path)  # the shipped FLUX.1-dev config is 3072 wide
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UnreadableCheckpointError, match="truncated"):
        load_transformer_file(truncated, config=folder)
    save_tiny_pipeline(tmp_path / "tiny-sd3", family="sd3")
    with pytest.raises(SingleFileError, match="flux transformer but the config.*SD3Transformer"):
        load_transformer_file(path, config=tmp_path / "tiny-sd3")
    state = load_file(path)
    del state["double_blocks.0.img_attn.qkv.weight"]
    save_file(state, tmp_path / "incomplete.safetensors")
    with pytest.raises(SingleFileError, match="incomplete.*img_attn.qkv"):
        load_transformer_file(tmp_path / "incomplete.safetensors", config=folder)


# --------------------------------------------------------------------------------------------
# LoRAs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_lora_merged_like_comfyui_equals_the_diffusers_lora(tmp_path, family):
    pipeline, diffusers_path, kohya_path = _lora_files(tmp_path, family)
    kohya = load_file(kohya_path)
    fused_prefix = {"flux": "lora_unet_double_blocks_0_img_attn_qkv",
                    "sd3": "lora_unet_joint_blocks_0_x_block_attn_qkv"}[family]
    assert kohya[f"{fused_prefix}.lora_down.weight"].shape[0] == 3 * 4
    assert kohya[f"{fused_prefix}.alpha"].item() == 3 * 8.0
    assert all(k.startswith("lora_unet_") and k.count(".") in (1, 2) for k in kohya)

    base = to_original({k: v.clone() for k, v in pipeline.transformer.state_dict().items()},
                       family)
    merged_original = _comfy_merge(base, kohya)
    expected = to_original(_fused(pipeline, diffusers_path), family)
    assert merged_original.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged_original[key], value, rtol=1e-5, atol=1e-6)
    changed = [key for key in expected if not torch.equal(base[key], expected[key])]
    assert len(changed) > 10  # the LoRA touched the fused layers, not nothing


def test_diffusers_reads_our_kohya_flux_lora_as_the_diffusers_lora(tmp_path):
    pipeline, diffusers_path, kohya_path = _lora_files(tmp_path, "flux")
    kohya = load_file(kohya_path)
    # diffusers' kohya reader assumes FLUX.1's widths for `single_blocks.*.linear1`, so at toy
    # width it reads all but those (checked at full width in the next test); it also returns
    # the LoRAs of the layers outside the blocks (final_layer ...) without their `transformer.`
    # prefix, so its loader drops them: the comparison leaves both out.
    outside = ("lora_unet_final_layer", "lora_unet_img_in", "lora_unet_txt_in")
    double_only = {k: v for k, v in kohya.items()
                   if "_linear1." not in k and not k.startswith(outside)}
    save_file(double_only, tmp_path / "kohya-double.safetensors")
    diffusers_state = load_file(diffusers_path)
    with safe_open(str(diffusers_path), "pt") as handle:
        metadata = handle.metadata()
    kept = {k: v for k, v in diffusers_state.items()
            if not re.search(r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)\.", k)
            and not k.startswith(("transformer.proj_out.", "transformer.norm_out."))}
    save_file(kept, tmp_path / "diffusers-double.safetensors", metadata=metadata)

    fused_diffusers = _fused(_tiny("flux"), tmp_path / "diffusers-double.safetensors")
    fused_kohya = _fused(_tiny("flux"), tmp_path / "kohya-double.safetensors")
    assert fused_diffusers.keys() == fused_kohya.keys()
    assert all(torch.equal(fused_diffusers[k], fused_kohya[k]) for k in fused_diffusers)
    base = _tiny("flux").transformer.state_dict()
    assert not torch.equal(base["transformer_blocks.0.attn.to_q.weight"],
                           fused_kohya["transformer_blocks.0.attn.to_q.weight"])


def test_diffusers_reads_fused_single_block_loras_at_flux1_width():
    """A rank-2 LoRA on every FLUX.1-dev-wide layer (2 + 2 blocks; LoRAs are small even at full
    width) -> kohya layout -> diffusers' kohya reader gives each diffusers module its LoRA
    back: A scaled by alpha / rank (diffusers folds the scale in), B unchanged, and zeros for
    the fused parts the LoRA did not adapt."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    generator = torch.Generator().manual_seed(0)
    state, rank = {}, 2
    for key, value in model.state_dict().items():
        module = key.removesuffix(".weight")
        if value.ndim != 2:  # every 2-D weight of the FLUX transformer is a Linear's
            continue
        if module == "single_transformer_blocks.0.proj_mlp":
            continue  # a fused part left out: its LoRA must come back as zeros
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, value.shape[1],
                                                                   generator=generator)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(value.shape[0], rank,
                                                                   generator=generator)
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 4,
                                                      "transformer.r": rank})}
    kohya = peft_to_kohya(state, metadata, family="flux")
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 4 * rank)
    read = FluxPipeline.lora_state_dict(dict(kohya))
    read = read[0] if isinstance(read, tuple) else read
    # diffusers gives the layers outside the blocks (img_in ... final_layer) no prefix.
    read = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in read.items()}
    assert {k for k in read if "proj_mlp" not in k} == {k for k in state if "proj_mlp" not in k}
    for key in state:
        if key.endswith("lora_A.weight"):
            # The deltas B A applied to a probe (the full products are large at this width).
            # Scaling by alpha / rank = 2 is exact, wherever a reader puts it.
            module = key.removesuffix(".lora_A.weight")
            probe = torch.randn(state[key].shape[1], 1, generator=generator)
            ours = 2 * (state[f"{module}.lora_B.weight"] @ (state[key] @ probe))
            theirs = read[f"{module}.lora_B.weight"] @ (read[key] @ probe)  # alpha = rank
            assert torch.equal(theirs, ours), module
    mlp = "transformer.single_transformer_blocks.0.proj_mlp"
    assert not read[f"{mlp}.lora_B.weight"].any() and not read[f"{mlp}.lora_A.weight"].any()


def test_lora_parts_of_different_rank_and_alpha_keep_their_delta():
    generator = torch.Generator().manual_seed(0)

    def lora(rank: int, alpha: float) -> ModuleLora:
        return ModuleLora(torch.randn(rank, 16, generator=generator),
                          torch.randn(16, rank, generator=generator), alpha)

    parts = {"transformer_blocks.0.attn.to_q": lora(2, 3.0),
             "transformer_blocks.0.attn.to_v": lora(4, 4.0)}
    fused = lora_to_original(parts, "sd3")["joint_blocks.0.x_block.attn.qkv"]
    delta = lora_delta(fused)
    torch.testing.assert_close(delta[:16], lora_delta(parts["transformer_blocks.0.attn.to_q"]))
    assert not delta[16:32].any()  # to_k had no LoRA
    torch.testing.assert_close(delta[32:], lora_delta(parts["transformer_blocks.0.attn.to_v"]))


def test_fused_loras_cut_back_into_parts_keep_their_delta():
    """lora_from_original inverts lora_to_original (block-diagonal: diagonal blocks back), and
    cuts a dense LoRA trained on the fused layer itself (kohya without split_qkv) by rows."""
    from dreambooth.formats.transformer_keys import lora_from_original

    model = build_tiny_pipeline(family="flux").transformer
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    parts = {f"single_transformer_blocks.0.{name}": ModuleLora(
                 torch.randn(2, 32, generator=generator),
                 torch.randn(shapes[f"single_transformer_blocks.0.{name}.weight"][0], 2,
                             generator=generator), 4.0)
             for name in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
    parts["norm_out.linear"] = ModuleLora(torch.randn(2, 32, generator=generator),
                                          torch.randn(64, 2, generator=generator), 2.0)
    back = lora_from_original(lora_to_original(parts, "flux"), "flux", shapes)
    assert back.keys() == parts.keys()
    for name, lora in parts.items():
        assert back[name].down.shape == lora.down.shape  # the diagonal blocks, not padded
        torch.testing.assert_close(lora_delta(back[name]), lora_delta(lora))
    dense = ModuleLora(torch.randn(3, 32, generator=generator),
                       torch.randn(3 * 32 + 128, 3, generator=generator), 6.0)
    cut = lora_from_original({"single_blocks.0.linear1": dense}, "flux", shapes)
    stacked = torch.cat([lora_delta(cut[f"single_transformer_blocks.0.{name}"])
                         for name in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
    torch.testing.assert_close(stacked, lora_delta(dense))
    with pytest.raises(ValueError, match="output rows"):
        lora_from_original({"single_blocks.0.linear1": ModuleLora(
            dense.down, dense.up[:100], 6.0)}, "flux", shapes)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_metadata_names_the_model(tmp_path, family):
    _, diffusers_path, kohya_path = _lora_files(tmp_path, family)
    for path in (diffusers_path, kohya_path):
        with safe_open(str(path), "pt") as handle:
            metadata, keys = handle.metadata(), list(handle.keys())
        assert lora_family(keys, metadata) == family
    assert lora_family(keys, {}) == family  # the kohya names alone tell it too
    expected = {"flux": ("flux-1-dev/lora", "flux1", "networks.lora_flux"),
                "sd3": ("stable-diffusion-v3-medium/lora", "medium", "networks.lora_sd3")}
    architecture, version, module = expected[family]
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["ss_base_model_version"] == version
    assert metadata["ss_network_module"] == module
    assert metadata["modelspec.trigger_phrase"] == "sks dog"
    assert "modelspec.prediction_type" not in metadata
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8.0"


def test_export_writes_the_kohya_layout_from_a_flux_diffusers_lora(tmp_path):
    _, diffusers_path, kohya_path = _lora_files(tmp_path, "flux")
    out = export_model(diffusers_path, "lora-kohya", tmp_path / "out.safetensors")
    ours, written = load_file(out), load_file(kohya_path)
    assert ours.keys() == written.keys()
    assert all(torch.equal(ours[k], written[k]) for k in ours)


def test_a_lora_of_the_other_family_gets_one_clear_error(tmp_path):
    _, flux_lora, flux_kohya = _lora_files(tmp_path, "flux")
    sd3 = _tiny("sd3")
    for path in (flux_lora, flux_kohya):
        with pytest.raises(LoraFileError, match="made for FLUX.*model is SD3"):
            merge_lora(sd3, path, "sd3")
    # Without metadata FLUX's single blocks give it away.
    state = load_file(flux_lora)
    save_file(state, tmp_path / "anonymous.safetensors")
    with pytest.raises(LoraFileError, match="made for FLUX"):
        merge_lora(sd3, tmp_path / "anonymous.safetensors", "sd3")
    # A LoRA for a wider model (say SD 3.5 large on SD3 medium) is refused by its widths.
    _, sd3_lora, _ = _lora_files(tmp_path / "sd3", "sd3")
    state = load_file(sd3_lora)
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    state[key] = torch.zeros(4, 48)
    save_file(state, tmp_path / "wider.safetensors")
    with pytest.raises(LoraFileError, match="does not fit this SD3 model.*48-wide"):
        merge_lora(sd3, tmp_path / "wider.safetensors", "sd3")
    # A kohya-layout FLUX LoRA stripped of its metadata names layers SD3 does not have.
    save_file(load_file(flux_kohya), tmp_path / "anonymous-kohya.safetensors")
    with pytest.raises(LoraFileError, match="made for FLUX|does not fit this SD3"):
        merge_lora(sd3, tmp_path / "anonymous-kohya.safetensors", "sd3")
    kohya = load_file(tmp_path / "sd3" / "sd3-lora" / "tiny.safetensors")
    kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"] = torch.zeros(12, 48)
    save_file(kohya, tmp_path / "wider-kohya.safetensors")
    with pytest.raises(LoraFileError, match="does not fit this SD3 model.*qkv.*48-wide"):
        merge_lora(sd3, tmp_path / "wider-kohya.safetensors", "sd3")
    dora = {**load_file(flux_lora), "transformer.proj_out.lora_magnitude_vector": torch.ones(64)}
    with pytest.raises(LoraFileError, match="DoRA.*diffusers file"):
        peft_to_kohya(dora, {}, family="flux")
    with pytest.raises(LoraFileError, match="not a layer of the SD3"):
        peft_to_kohya(load_file(flux_lora), {}, family="sd3")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(flux_lora.read_bytes()[:3000])
    with pytest.raises(ValueError, match="truncated"):
        merge_lora(_tiny("flux"), truncated, "flux")
    assert (tmp_path / "flux-lora" / DIFFUSERS_LORA_FILE).exists()


def test_single_files_become_pipeline_folders_with_their_base(tmp_path, sd3_folder):
    from dreambooth.formats.single_file import load_single_file

    flux_base = tmp_path / "tiny-flux"
    save_tiny_pipeline(flux_base, family="flux")
    for base in (sd3_folder, flux_base):
        path = export_model(base, "single-file", tmp_path / f"{base.name}.safetensors")
        with pytest.raises(SingleFileError, match="pass the diffusers folder"):
            load_single_file(path)
        folder = load_single_file(path, config=base)
        assert load_single_file(path, config=base) == folder  # cached
        original = FluxTransformer2DModel if base == flux_base else SD3Transformer2DModel
        ours = original.from_pretrained(base, subfolder="transformer").state_dict()
        theirs = original.from_pretrained(folder, subfolder="transformer").state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(SingleFileError, match="not a FLUX.1 pipeline folder"):
        load_single_file(tmp_path / "tiny-flux.safetensors", config=sd3_folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_file_from_a_lora_that_diffusers_wrote(tmp_path, family):
    """An SD3/FLUX run's LoRA written by the pipeline's own `save_lora_weights` (what training
    writes) gets the same kohya file as save_lora_files writes."""
    from peft.utils import get_peft_model_state_dict

    from dreambooth.formats.lora_files import write_kohya_lora
    from dreambooth.models import pipeline_class

    pipeline, _, ours = _lora_files(tmp_path, family)
    transformer = _with_random_lora(_tiny(family).transformer)
    config = {k: sorted(v) if isinstance(v, set) else v
              for k, v in SETTINGS.peft_config(TARGETS).to_dict().items()}
    pipeline_class(family).save_lora_weights(
        tmp_path / "diffusers-writer", weight_name=DIFFUSERS_LORA_FILE,
        transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name="default"),
        transformer_lora_adapter_metadata=config)
    kohya = write_kohya_lora(tmp_path / "diffusers-writer" / DIFFUSERS_LORA_FILE,
                             tmp_path / "kohya.safetensors", metadata=_metadata(family, pipeline),
                             family=family)
    theirs, expected = load_file(kohya), load_file(ours)
    assert theirs.keys() == expected.keys()
    assert all(torch.equal(theirs[k], expected[k]) for k in theirs)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_trained_lora_exports_to_the_kohya_layout_comfyui_merges(tmp_path, family,
                                                                   instance_dir):
    """A real SD3/FLUX LoRA run (transformer and CLIP adapted) -> `export --format lora-kohya`
    -> ComfyUI's merge of its `lora_unet_*` keys gives the weights diffusers' fused LoRA gives."""
    from conftest import tiny_config
    from dreambooth.models import load_pipeline
    from dreambooth.train.run import train

    base = tmp_path / f"tiny-{family}"
    save_tiny_pipeline(base, family=family)
    output = train(tiny_config(base, instance_dir, tmp_path / "run", use_lora=True, rank=2,
                               lora_alpha=4.0, train_text_encoder=True, max_train_steps=2,
                               learning_rate=5e-2, train_batch_size=1, max_sequence_length=16))
    out = export_model(output, "lora-kohya", tmp_path / "kohya.safetensors")
    kohya = load_file(out)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in kohya)
    unet = {k: v for k, v in kohya.items() if k.startswith("lora_unet_")}
    assert unet and all(torch.isfinite(v).all() for v in unet.values())

    pipeline = load_pipeline(base, device="cpu")
    original = to_original({k: v.clone() for k, v in pipeline.transformer.state_dict().items()},
                           family)
    merged = _comfy_merge(original, unet)
    expected = to_original(_fused(pipeline, output / DIFFUSERS_LORA_FILE), family)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
    assert sum(not torch.equal(original[k], expected[k]) for k in expected) >= 4


@pytest.mark.parametrize("family", FAMILIES)
def test_our_merge_of_a_kohya_lora_equals_the_diffusers_lora(tmp_path, family, instance_dir):
    """merge_lora reads kohya-layout SD3/FLUX LoRAs itself (diffusers reads none for SD3, and
    at FLUX.1's widths only): every layer, fused or not, text encoders included."""
    from conftest import tiny_config
    from dreambooth.models import load_pipeline
    from dreambooth.train.run import train

    base = tmp_path / f"tiny-{family}"
    save_tiny_pipeline(base, family=family)
    output = train(tiny_config(base, instance_dir, tmp_path / "run", use_lora=True, rank=2,
                               lora_alpha=4.0, train_text_encoder=True, max_train_steps=2,
                               learning_rate=5e-2, train_batch_size=1, max_sequence_length=16))
    kohya = export_model(output, "lora-kohya", tmp_path / "kohya.safetensors")
    _, full_diffusers, full_kohya = _lora_files(tmp_path, family)  # every TARGETS layer
    untouched = load_pipeline(base, device="cpu")
    untouched = {f"{name}.{k}": v for name in ("transformer", "text_encoder")
                 for k, v in getattr(untouched, name).state_dict().items()}
    for diffusers_file, kohya_file, adapted in ((output / DIFFUSERS_LORA_FILE, kohya,
                                                 ("transformer.", "text_encoder.")),
                                                (full_diffusers, full_kohya, ("transformer.",))):
        merged = []
        for path in (diffusers_file, kohya_file):
            pipeline = load_pipeline(base, device="cpu")
            merge_lora(pipeline, path, family, scale=0.5)
            merged.append({f"{name}.{k}": v for name in ("transformer", "text_encoder")
                           for k, v in getattr(pipeline, name).state_dict().items()})
        assert merged[0].keys() == merged[1].keys() == untouched.keys()
        for key, value in merged[0].items():
            torch.testing.assert_close(merged[1][key], value, rtol=1e-5, atol=1e-6)
        for prefix in adapted:  # the LoRA changed each part it adapts
            assert any(not torch.equal(untouched[k], v) for k, v in merged[1].items()
                       if k.startswith(prefix)), prefix


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_export_of_a_flow_model_loads_back_whole(tmp_path, family):
    """`export --format diffusers` (fp16) keeps every part; the T5 encoder's names stay T5's
    (the transformers-4 `text_model.` level is for CLIP only)."""
    from dreambooth.models import pipeline_class

    folder = tmp_path / f"tiny-{family}"
    save_tiny_pipeline(folder, family=family)
    out = export_model(folder, "diffusers", tmp_path / "out", dtype="fp16")
    info = json.loads((out / "export.json").read_text())
    assert info["family"] == family and info["prediction_type"] is None
    cls = pipeline_class(family)
    original, loaded = (cls.from_pretrained(path) for path in (folder, out))
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(original, name, None) is None:
            continue
        ours, theirs = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k].half(), theirs[k]) for k in ours), name


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_exports_a_single_file_with_a_kohya_lora_merged(tmp_path, family):
    """`dreambooth export --format single-file --merge_lora KOHYA.safetensors`: the file is the
    base file with ComfyUI's merge of that LoRA applied."""
    from dreambooth.cli import main

    _, _, kohya_path = _lora_files(tmp_path, family)
    folder = tmp_path / f"tiny-{family}"
    pipeline = _tiny(family)
    pipeline.save_pretrained(folder)
    base, merged = tmp_path / "base.safetensors", tmp_path / "merged.safetensors"
    assert main(["export", "--model", str(folder), "--format", "single-file",
                 "--output", str(base)]) == 0
    assert main(["export", "--model", str(folder), "--format", "single-file", "--merge_lora",
                 str(kohya_path), "--output", str(merged)]) == 0
    prefix = "model.diffusion_model." if family == "sd3" else ""
    base_state, merged_state = load_file(base), load_file(merged)
    transformer = {k.removeprefix(prefix): v for k, v in base_state.items()
                   if k.startswith(prefix) and not k.startswith(("first_stage_model.",
                                                                 "text_encoders."))}
    expected = _comfy_merge(transformer, load_file(kohya_path))
    for key, value in expected.items():
        torch.testing.assert_close(merged_state[prefix + key], value, rtol=1e-5, atol=1e-6)
    assert sum(not torch.equal(transformer[k], expected[k]) for k in expected) > 10
