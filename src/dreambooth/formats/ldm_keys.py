"""diffusers <-> CompVis (LDM) key names of Stable Diffusion weights.

Single-file checkpoints (what AUTOMATIC1111 and ComfyUI load) keep the names of the original
CompVis code: `model.diffusion_model.*` for the UNet, `first_stage_model.*` for the VAE and the
text encoder prefixes of formats/single_file.py. diffusers reads such files (`from_single_file`,
`diffusers/loaders/single_file_utils.py`) but writes none; the maps below invert its reader, and
formats/export.py checks every export against that reader.
"""

from __future__ import annotations

import re

import torch

from dreambooth.families import UNET_PREFIX
from dreambooth.formats import ExportError
from dreambooth.formats.checkpoint_files import VAE_PREFIX

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
