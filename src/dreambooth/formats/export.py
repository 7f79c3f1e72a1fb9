"""Exporting a model in the formats the ecosystem loads (`dreambooth export`).

- `diffusers`: a pipeline folder (`save_pretrained`, safetensors) in the chosen dtype.
- `single-file`: one `.safetensors` with CompVis key names, what AUTOMATIC1111 and ComfyUI call a
  checkpoint. diffusers reads such files (`from_single_file`) but writes none, so the key maps
  below invert diffusers' reader (`diffusers/loaders/single_file_utils.py`), and every export is
  checked against that reader before it is written: each tensor must come back under its name
  with its shape.
- `lora-diffusers` / `lora-kohya`: the LoRA files of a LoRA training run (see lora.py), in the
  chosen dtype; kohya keys are derived from the diffusers file when a run has only that one.

`merge_lora` fuses a LoRA into the base weights first (diffusers `load_lora_weights` +
`fuse_lora` + `unload_lora_weights`): W <- W + scale * (alpha / rank) * B A.
Every output is written beside its target and renamed into place, so a failed export leaves
nothing half-written and an existing file untouched.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import torch

from dreambooth.formats.run_files import library_versions
from dreambooth.files import atomic_path
from dreambooth.train.lora import DIFFUSERS_LORA_FILE, KOHYA_LORA_FILE
from dreambooth.models import TRAINING_CONFIG_FILE
from dreambooth.formats.single_file import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, TEXT_ENCODER_PREFIXES,
                          UNET_PREFIX, V_PRED_KEY, VAE_PREFIX, compare_with_models, diffusers_view,
                          load_single_file, quiet_dtype_deprecation, read_header)

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "single-file", "lora-kohya", "lora-diffusers")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXPORT_INFO_FILE = "export.json"  # what was exported from where, written beside the weights

# ModelSpec architecture ids (github.com/Stability-AI/ModelSpec) and the single files' home repos.
MODELSPEC_ARCHITECTURE = {("sd1", "epsilon"): "stable-diffusion-v1",
                          ("sd1", "v_prediction"): "stable-diffusion-v1",
                          ("sd2", "epsilon"): "stable-diffusion-v2-512",
                          ("sd2", "v_prediction"): "stable-diffusion-v2-768-v",
                          ("sdxl", "epsilon"): "stable-diffusion-xl-v1-base",
                          ("sdxl", "v_prediction"): "stable-diffusion-xl-v1-base"}
IMPLEMENTATION = {"sd1": "https://github.com/CompVis/stable-diffusion",
                  "sd2": "https://github.com/Stability-AI/stablediffusion",
                  "sdxl": "https://github.com/Stability-AI/generative-models"}


class ExportError(ValueError):
    """An export that cannot be done as asked; the message names the input and what to do."""


# --------------------------------------------------------------------------------------------
# diffusers -> CompVis key names (the inverse of diffusers' single-file reader)
# --------------------------------------------------------------------------------------------

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}


def _rename_first(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state -> `model.diffusion_model.*` (SD1/SD2/SDXL layout).

    LDM numbers the blocks flat: input block n = 1 + i * (L + 1) + j for resnet/attention j of
    down block i (L = layers_per_block), with the downsampler last; the up path has L + 1 layers
    per block and puts the upsampler after the attention when the block has one.
    """
    per_block = config["layers_per_block"] + 1
    up_has_attention = ["CrossAttn" in name for name in config["up_block_types"]]
    result = {}
    for key, tensor in state.items():
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            n = 1 + i * per_block + j
            new = (f"input_blocks.{n}.0.{_rename_first(rest, _UNET_RESNET)}" if kind == "resnets"
                   else f"input_blocks.{n}.1.{rest}")
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_rename_first(m[2], _UNET_RESNET)}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            n = i * per_block + j
            new = (f"output_blocks.{n}.0.{_rename_first(rest, _UNET_RESNET)}" if kind == "resnets"
                   else f"output_blocks.{n}.1.{rest}")
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            i = int(m[1])
            n, slot = i * per_block + per_block - 1, 2 if up_has_attention[i] else 1
            new = f"output_blocks.{n}.{slot}.conv.{m[2]}"
        elif (module := key.rsplit(".", 1)[0]) in _UNET_FIXED:
            new = _UNET_FIXED[module] + key[len(module):]
        else:
            raise ExportError(f"unet weight '{key}' has no single-file name: this UNet "
                              "(class embeddings? a ControlNet?) is not a Stable Diffusion UNet")
        result[UNET_PREFIX + new] = tensor
    return result


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state -> `first_stage_model.*`. LDM numbers the decoder's up
    blocks from the bottom (up.{n-1-i}) and keeps attention projections as 1x1 convolutions."""
    blocks = len(config["down_block_types"])
    result = {}
    for key, tensor in state.items():
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_rename_first(m[3], _VAE_RESNET)}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = (f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}."
                   f"{_rename_first(m[3], _VAE_RESNET)}")
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_first(m[3], _VAE_RESNET)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            rest = _rename_first(m[2], _VAE_ATTENTION)
            new = f"{m[1]}.mid.attn_1.{rest}"
            if rest.split(".")[0] in ("q", "k", "v", "proj_out") and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # (C, C) linear -> (C, C, 1, 1) conv
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif re.fullmatch(r"((encoder|decoder)\.conv_(in|out)|(post_)?quant_conv)\.[a-z]+", key):
            new = key
        else:
            raise ExportError(f"vae weight '{key}' has no single-file name: not an SD "
                              "AutoencoderKL")
        result[VAE_PREFIX + new] = tensor
    return result


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP (transformers CLIPTextModel) -> `<prefix>` + transformers names.

    transformers 5 dropped the `text_model.` level from CLIPTextModel's state dict; SD1/SDXL
    single files keep it, so `prefix` ends in `text_model.` and any old-style prefix is removed.
    """
    return {prefix + key.removeprefix("text_model."): tensor for key, tensor in state.items()
            if not key.endswith("position_ids")}


_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1",
                    "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text model -> OpenCLIP names under `prefix` (SD2, SDXL's second encoder).

    OpenCLIP runs attention with nn.MultiheadAttention: q, k and v projections are one
    (3D, D) `in_proj_weight` (and (3D,) bias), stacked in that order.
    """
    result: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        if key == "embeddings.token_embedding.weight":
            result[prefix + "token_embedding.weight"] = tensor
        elif key == "embeddings.position_embedding.weight":
            result[prefix + "positional_embedding"] = tensor
        elif key.startswith("final_layer_norm."):
            result[prefix + "ln_final." + key.split(".", 1)[1]] = tensor
        elif key == "text_projection.weight":  # nn.Linear (out, in) -> OpenCLIP matrix (in, out)
            result[prefix + "text_projection"] = tensor.T.contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(\w+)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = tensor
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            name = _rename_first(m[2], _OPEN_CLIP_LAYER)
            result[f"{prefix}transformer.resblocks.{m[1]}.{name}"] = tensor
        else:
            raise ExportError(f"text encoder weight '{key}' has no OpenCLIP name")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ExportError(f"text encoder layer {layer} lacks one of q/k/v_proj.{kind}")
        result[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return result


def single_file_state_dict(pipeline, family: str) -> dict[str, torch.Tensor]:
    """A live SD/SDXL pipeline's weights under CompVis names, checked against diffusers' reader:
    raises ExportError unless `from_single_file` would give back every tensor unchanged in name
    and shape."""
    components = {"unet": pipeline.unet, "vae": pipeline.vae, "text_encoder": pipeline.text_encoder}
    if family == "sdxl":
        components["text_encoder_2"] = pipeline.text_encoder_2
    state = {**unet_to_ldm(pipeline.unet.state_dict(), pipeline.unet.config),
             **vae_to_ldm(pipeline.vae.state_dict(), pipeline.vae.config)}
    for name, prefix in TEXT_ENCODER_PREFIXES[family].items():
        convert = clip_to_ldm if prefix.endswith("text_model.") else open_clip_to_ldm
        state.update(convert(components[name].state_dict(), prefix))
    meta = {key: torch.empty(value.shape, dtype=value.dtype, device="meta")
            for key, value in state.items()}
    problems = compare_with_models(diffusers_view(meta, family, components), components)
    if problems:
        raise ExportError(f"the {family.upper()} single-file export would not load back intact "
                          "with diffusers' from_single_file: "
                          + "; ".join(p.describe() for p in problems))
    return state


# --------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------

def pipeline_family(folder: str | Path) -> str:
    """'sd1', 'sd2' or 'sdxl' for a diffusers pipeline folder, as training decides it
    (models.detect_family); SDXL refiners (no first text encoder) are refused."""
    from dreambooth.models import detect_family

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    if "text_encoder_2" in index and not (index.get("text_encoder") or [None])[0]:
        raise ExportError(f"'{folder}' has only an OpenCLIP text encoder (an SDXL refiner?); "
                          "only SDXL base pipelines are supported")
    return detect_family(folder)


def _is_single_file(path: Path) -> bool:
    return path.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES and not path.is_dir()


def resolve_pipeline_folder(model: str | Path, prediction_type: str | None = None) -> Path:
    """A diffusers pipeline folder for a folder, a cached hub id or a single-file checkpoint."""
    from dreambooth.models import resolve_model_path

    path = Path(model).expanduser()
    if _is_single_file(path):
        return load_single_file(path, prediction_type=prediction_type)
    if path.is_dir() and not (path / "model_index.json").exists() and (
            (path / DIFFUSERS_LORA_FILE).exists() or (path / KOHYA_LORA_FILE).exists()):
        raise ExportError(
            f"'{path}' is the output of a LoRA run (it has {DIFFUSERS_LORA_FILE}), not a whole "
            "model: export it with --format lora-diffusers or lora-kohya, or fuse it into its "
            f"base with --model BASE --merge_lora {path / DIFFUSERS_LORA_FILE}")
    return resolve_model_path(model)


def _stored_dtype(folder: Path) -> torch.dtype:
    """dtype of the UNet's weights on disk (float32 when it cannot be told)."""
    for file in sorted((folder / "unet").glob("*.safetensors")):
        header = read_header(file)
        for tensor in header.tensors.values():
            if tensor.is_floating_point():
                return tensor.dtype
    return torch.float32


def _load_pipeline(folder: Path, family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    with quiet_dtype_deprecation():
        if family == "sdxl":
            return StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32,
                                                             local_files_only=True)
        return StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32,
                                                       local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------

def _lora_file(path: Path, name: str = DIFFUSERS_LORA_FILE) -> Path:
    if path.is_dir():
        if not (path / name).is_file():
            raise ExportError(f"'{path}' has no {name}: pass a LoRA training output folder or "
                              "a LoRA .safetensors file")
        return path / name
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise ExportError(f"LoRA '{path}' is not a .safetensors file or a LoRA output folder")
    return path


def lora_family(keys: list[str], metadata: dict[str, str]) -> str | None:
    """The family a LoRA was made for, from its metadata or SDXL-only key names; None if silent."""
    architecture = metadata.get("modelspec.architecture", "")
    version = metadata.get("ss_base_model_version", "")
    if "-xl-" in architecture or version.startswith("sdxl"):
        return "sdxl"
    if architecture.startswith("stable-diffusion-v2") or version.startswith("sd_v2") \
            or metadata.get("ss_v2") == "True":
        return "sd2"
    if architecture.startswith("stable-diffusion-v1") or version.startswith("sd_v1"):
        return "sd1"
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    return None


_FAMILY_WIDTH = {768: "SD1", 1024: "SD2", 2048: "SDXL"}


def check_lora_fits(lora_path: Path, pipeline, family: str) -> None:
    """Refuse a LoRA made for another family: by its metadata, by SDXL-only keys, and by the
    width of the cross-attention keys it adapts (768 SD1, 1024 SD2, 2048 SDXL)."""
    header = read_header(lora_path)
    keys = header.keys
    made_for = lora_family(keys, header.metadata)
    if made_for is not None and made_for != family:
        raise ExportError(f"LoRA '{lora_path}' was made for {made_for.upper()} (its metadata / "
                          f"keys say so) but the model is {family.upper()}: use a LoRA trained "
                          "on this model's family")
    width = pipeline.unet.config.cross_attention_dim
    for key, tensor in header.tensors.items():
        is_down = key.endswith(("lora_A.weight", "lora_down.weight", "lora.down.weight"))
        if is_down and re.search(r"attn2[._]to_[kv]", key) and "unet" in key:
            if tensor.shape[-1] != width:
                guess = _FAMILY_WIDTH.get(tensor.shape[-1], "another model")
                raise ExportError(
                    f"LoRA '{lora_path}' does not fit this {family.upper()} model: its "
                    f"cross-attention weights take {tensor.shape[-1]}-wide text features "
                    f"({guess}), the model's take {width} ('{key}')")
            break


def merge_lora(pipeline, lora_path: str | Path, family: str, scale: float = 1.0) -> None:
    """Fuse a LoRA into the pipeline's weights in place: W <- W + scale * (alpha / r) * B A."""
    lora_path = _lora_file(Path(lora_path))
    check_lora_fits(lora_path, pipeline, family)
    try:
        pipeline.load_lora_weights(str(lora_path), adapter_name="merged")
        pipeline.fuse_lora(lora_scale=scale, adapter_names=["merged"])
        pipeline.unload_lora_weights()
    except (ValueError, RuntimeError, KeyError) as error:
        raise ExportError(f"LoRA '{lora_path}' could not be merged into this {family.upper()} "
                          f"model ({type(error).__name__}: {str(error)[:300]}); is it made for "
                          "this base model?") from error


def _adapter_alphas(metadata: dict[str, str]) -> dict[str, dict]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    config = json.loads(raw)
    result: dict[str, dict] = {}
    for key, value in config.items():
        component, field_name = key.split(".", 1)
        result.setdefault(component, {})[field_name] = value
    return result


def peft_to_kohya(state: dict[str, torch.Tensor], metadata: dict[str, str], *,
                  sdxl: bool) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA (`unet.<module>.lora_A.weight`) -> kohya (`lora_unet_<module>.lora_down
    .weight`, `.lora_up.weight`, `.alpha`). Alpha comes from the file's LoraConfig metadata
    (lora_alpha, alpha_pattern); without it diffusers uses alpha = rank, and so does this."""
    heads = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
             "text_encoder_2": "lora_te2_"}
    configs = _adapter_alphas(metadata)
    result: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise ExportError(f"LoRA key '{key}' is not in the diffusers/peft layout "
                              "(<component>.<module>.lora_A/B.weight); DoRA and other adapters "
                              "cannot be written in the kohya layout")
        component, module, direction = m[1], m[2], m[3]
        if component != "unet" and not module.startswith("text_model."):
            module = "text_model." + module  # transformers 5 dropped this level from names
        name = heads[component] + module.replace(".", "_")
        if direction == "A":
            result[f"{name}.lora_down.weight"] = tensor
            config = configs.get(component, {})
            alpha = config.get("lora_alpha", tensor.shape[0])
            for pattern, value in (config.get("alpha_pattern") or {}).items():
                if re.search(rf"(^|\.){pattern}$", m[2]):
                    alpha = value
            result[f"{name}.alpha"] = torch.tensor(float(alpha))
        else:
            result[f"{name}.lora_up.weight"] = tensor
    return result


def _export_lora(source: Path, fmt: str, output: Path, dtype: torch.dtype | None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    want_kohya = fmt == "lora-kohya"
    if source.is_dir():
        kohya = source / KOHYA_LORA_FILE
        path = kohya if want_kohya and kohya.is_file() else _lora_file(source)
    else:
        path = _lora_file(source)
    header = read_header(path)  # clear errors for truncated / corrupted files
    with safe_open(str(path), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    metadata = dict(header.metadata)
    is_kohya = all(key.startswith("lora_") for key in state)
    if want_kohya and not is_kohya:
        state = peft_to_kohya(state, metadata,
                              sdxl=lora_family(list(state), metadata) == "sdxl")
        metadata.pop("lora_adapter_metadata", None)
    elif not want_kohya and is_kohya:
        raise ExportError(f"'{path}' is a kohya-layout LoRA; writing the diffusers layout needs "
                          f"the run's {DIFFUSERS_LORA_FILE} (a LoRA training output folder has "
                          "both)")
    if dtype is not None:
        state = {key: value.to(dtype) if value.is_floating_point() else value
                 for key, value in state.items()}
    output = _single_output_path(output)
    with atomic_path(output) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    return output


# --------------------------------------------------------------------------------------------
# export_model
# --------------------------------------------------------------------------------------------

def _single_output_path(output: Path) -> Path:
    if output.is_dir():
        raise ExportError(f"output '{output}' is a folder; name the .safetensors file to write")
    if output.suffix.lower() != ".safetensors":
        raise ExportError(f"output '{output}' must end in .safetensors (this tool writes no "
                          "pickles)")
    return output


def _modelspec(family: str, prediction: str, pipeline, title: str) -> dict[str, str]:
    vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    resolution = pipeline.unet.config.sample_size * vae_scale
    return {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[(family, prediction)],
        "modelspec.implementation": IMPLEMENTATION[family],
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "modelspec.date": datetime.date.today().isoformat(),
    }


def export_model(model: str | Path, fmt: str, output: str | Path, *, dtype: str | None = None,
                 merge_lora_path: str | Path | None = None, lora_scale: float = 1.0,
                 prediction_type: str | None = None) -> Path:
    """Write `model` in format `fmt` to `output`; return the path written.

    - `model`: a diffusers folder (a training output_dir), a cached hub id or a single-file
      checkpoint; for the LoRA formats, a LoRA training output folder or LoRA .safetensors file.
    - `fmt`: one of FORMATS. `output`: a folder for 'diffusers' (must not exist or be empty),
      a `.safetensors` path otherwise (replaced only once the new file is complete).
    - `dtype`: 'fp32', 'fp16' or 'bf16'; None keeps the dtype the model is stored in.
    - `merge_lora_path` / `lora_scale`: fuse this LoRA into the model first (not for LoRA formats).
    - `prediction_type`: for a single-file SD 2.x input whose type cannot be told (see
      single_file.resolve_prediction_type).

    Args:
        model: A diffusers folder (training output_dir), a cached hub id, a .safetensors/.ckpt
            single file, or for lora-* formats a LoRA run's output_dir or LoRA .safetensors.
        fmt: diffusers folder, single-file checkpoint (A1111/ComfyUI), or LoRA in the kohya or
            diffusers layout.
        output: Folder for diffusers, .safetensors file otherwise; written atomically, an
            existing diffusers folder must be empty.
        dtype: Weight dtype written (default: as the model is stored).
        merge_lora_path: Fuse this LoRA (.safetensors or LoRA output_dir) into the model before
            exporting.
        lora_scale: Strength of the merged LoRA (W + scale * alpha/r * BA).
        prediction_type: For a single-file SD 2.x model whose type the file does not tell
            (768-v models use v_prediction).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}': choose one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype] if dtype else None
    output = Path(output).expanduser()
    if fmt.startswith("lora-"):
        if merge_lora_path is not None:
            raise ExportError("--merge_lora fuses a LoRA into a full model; it does not apply "
                              f"to --format {fmt}")
        return _export_lora(Path(model).expanduser(), fmt, output, torch_dtype)
    if fmt == "single-file":
        _single_output_path(output)
    elif output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ExportError(f"output '{output}' already exists and is not an empty folder; "
                          "choose a new path (nothing was written)")

    folder = resolve_pipeline_folder(model, prediction_type)
    family = pipeline_family(folder)
    torch_dtype = torch_dtype or _stored_dtype(folder)
    pipeline = _load_pipeline(folder, family)
    if merge_lora_path is not None:
        merge_lora(pipeline, merge_lora_path, family, lora_scale)
    prediction = pipeline.scheduler.config.get("prediction_type", "epsilon")
    provenance = {"source": str(model), "format": fmt, "family": family,
                  "dtype": str(torch_dtype).removeprefix("torch."), "prediction_type": prediction,
                  "merged_lora": str(merge_lora_path) if merge_lora_path is not None else None,
                  "lora_scale": lora_scale if merge_lora_path is not None else None,
                  "versions": library_versions()}
    if fmt == "single-file":
        state = single_file_state_dict(pipeline, family)
        state = {key: value.to(torch_dtype).contiguous() if value.is_floating_point() else value
                 for key, value in state.items()}
        if prediction == "v_prediction":
            state[V_PRED_KEY] = torch.tensor([])  # ComfyUI's marker; readers ignore it
        source = Path(str(model))
        title = source.stem if _is_single_file(source) else source.name
        metadata = {**_modelspec(family, prediction, pipeline, title),
                    "dreambooth.formats.run_files": json.dumps(provenance, sort_keys=True)}
        from safetensors.torch import save_file

        with atomic_path(output) as tmp:
            save_file(state, str(tmp), metadata=metadata)
        log.info("wrote %s single file %s (%s)", family.upper(), output, torch_dtype)
        return output

    pipeline.to(dtype=torch_dtype)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / EXPORT_INFO_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if (folder / TRAINING_CONFIG_FILE).is_file():  # the run that made it, when there is one
            shutil.copyfile(folder / TRAINING_CONFIG_FILE, staging / TRAINING_CONFIG_FILE)
        if output.exists():
            output.rmdir()  # empty, checked above
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
