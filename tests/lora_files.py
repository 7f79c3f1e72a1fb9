"""LoRA files for the tiny pipeline, written by hand in diffusers/peft and kohya key formats.

Both formats hold the same random weights for the same seed, so loading either must give the
same images. Scale = alpha / rank = 1 in both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 4
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _targets(module: torch.nn.Module, names: tuple[str, ...]) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers named `*.{one of names}`, also once peft has wrapped them."""
    targets = []
    for name, layer in module.named_modules():
        name = name.removesuffix(".base_layer")  # peft keeps the original Linear there
        if type(layer) is torch.nn.Linear and name.endswith(names):
            targets.append((name, layer))
    return targets


def write_lora(pipeline, path: str | Path, *, seed: int = 0, kohya: bool = False,
               text_encoder: bool = False, std: float = 0.5) -> Path:
    """Write a LoRA for `pipeline`'s UNet (and text encoder) attention layers to `path`."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    parts = [("unet", "lora_unet", pipeline.unet, UNET_TARGETS)]
    if text_encoder:
        parts.append(("text_encoder", "lora_te", pipeline.text_encoder, TEXT_TARGETS))
    for prefix, kohya_prefix, module, names in parts:
        for name, layer in _targets(module, names):
            if prefix == "text_encoder" and not name.startswith("text_model."):
                # transformers 5 flattened CLIPTextModel; LoRA files in the wild keep the
                # `text_model.` level of transformers 4, which diffusers maps either way.
                name = f"text_model.{name}"
            down = torch.randn(RANK, layer.in_features, generator=generator) * std
            up = torch.randn(layer.out_features, RANK, generator=generator) * std
            if kohya:
                key = f"{kohya_prefix}_{name.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = down
                tensors[f"{key}.lora_up.weight"] = up
                tensors[f"{key}.alpha"] = torch.tensor(float(RANK))
            else:
                tensors[f"{prefix}.{name}.lora_A.weight"] = down
                tensors[f"{prefix}.{name}.lora_B.weight"] = up
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
