"""LoRA adapters (Hu et al. 2021) on the UNet and text encoder, built with peft, and their files.

Two files come out of a LoRA run, both safetensors with string metadata:
- `pytorch_lora_weights.safetensors`: diffusers/peft layout (`unet.<module>.lora_A.weight` ...),
  with each adapter's LoraConfig in the metadata so `pipe.load_lora_weights(dir)` restores the
  scale alpha / rank exactly;
- `pytorch_lora_weights_kohya.safetensors`: kohya layout (`lora_unet_<module_path>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; `lora_te_` for the text encoder) that AUTOMATIC1111 and ComfyUI
  load, with kohya `ss_*` and ModelSpec metadata.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from dreambooth.files import atomic_path
from dreambooth.models import FAMILY_NAMES

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_LORA_FILE = "pytorch_lora_weights_kohya.safetensors"
ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    use_dora: bool
    unet_target_modules: tuple[str, ...]
    text_encoder_target_modules: tuple[str, ...]

    def peft_config(self, target_modules: tuple[str, ...]):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          use_dora=self.use_dora, init_lora_weights="gaussian",
                          target_modules=list(target_modules))


def _check_rank(model: torch.nn.Module, target_modules: tuple[str, ...], rank: int,
                model_name: str) -> None:
    """A rank above a layer's smaller dimension cannot be a low-rank update: refuse it."""
    matched = False
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in target_modules):
            continue
        if not isinstance(module, torch.nn.Linear):
            continue
        matched = True
        limit = min(module.in_features, module.out_features)
        if rank > limit:
            raise ValueError(f"rank={rank} is larger than layer '{model_name}.{name}' allows "
                             f"({module.in_features}x{module.out_features}): use rank <= {limit}")
    if not matched:
        raise ValueError(f"no Linear layer of the {model_name} matches the LoRA target modules "
                         f"{', '.join(target_modules)}")


def _text_encoder_prefixes(text_encoders: list) -> list[str]:
    return ["text_encoder", "text_encoder_2"][:len(text_encoders)]


def add_lora_adapters(unet, text_encoders: list, settings: LoraSettings, *,
                      train_text_encoder: bool) -> None:
    """Freeze the base weights and inject trainable LoRA layers (peft) into UNet attention and,
    optionally, the text encoders' attention projections."""
    from peft import inject_adapter_in_model

    unet.requires_grad_(False)
    _check_rank(unet, settings.unet_target_modules, settings.rank, "unet")
    unet.add_adapter(settings.peft_config(settings.unet_target_modules), adapter_name=ADAPTER_NAME)
    for prefix, encoder in zip(_text_encoder_prefixes(text_encoders), text_encoders):
        encoder.requires_grad_(False)
        if train_text_encoder:
            _check_rank(encoder, settings.text_encoder_target_modules, settings.rank, prefix)
            # peft directly: transformers' add_adapter insists on a newer peft than may exist.
            inject_adapter_in_model(settings.peft_config(settings.text_encoder_target_modules),
                                    encoder, adapter_name=ADAPTER_NAME)
    for model in (unet, *text_encoders):
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)


def lora_state_dicts(unet, text_encoders: list) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet": ..., "text_encoder": ..., "text_encoder_2": ...} in peft layout
    (`<module>.lora_A.weight`), fp32 on the CPU; only models that carry adapters."""
    from peft.utils import get_peft_model_state_dict

    result = {}
    models = [("unet", unet), *zip(_text_encoder_prefixes(text_encoders), text_encoders)]
    for prefix, model in models:
        if any("lora_" in name for name, _ in model.named_parameters()):
            state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
            result[prefix] = {k: v.detach().to("cpu", torch.float32).contiguous()
                              for k, v in state.items()}
    return result


KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_PREFIXES_SDXL = {"unet": "lora_unet_", "text_encoder": "lora_te1_",
                       "text_encoder_2": "lora_te2_"}


def to_kohya(states: dict[str, dict[str, torch.Tensor]], alpha: float, *, family: str = "sd1",
             ) -> dict[str, torch.Tensor]:
    """peft layout -> kohya layout (`lora_unet_*`, `lora_te_*` or SDXL's `lora_te1_*`/`lora_te2_*`,
    with `.lora_down.weight`, `.lora_up.weight` and `.alpha` per module)."""
    heads = KOHYA_PREFIXES_SDXL if family == "sdxl" else KOHYA_PREFIXES
    kohya: dict[str, torch.Tensor] = {}
    for prefix, state in states.items():
        for key, tensor in state.items():
            module, kind = key.rsplit(".lora_", 1)  # "a.b.to_q", "A.weight"
            if prefix != "unet" and not module.startswith("text_model."):
                module = "text_model." + module  # transformers 5 dropped the prefix in names
            name = heads[prefix] + module.replace(".", "_")
            direction = "lora_down" if kind.startswith("A") else "lora_up"
            kohya[f"{name}.{direction}.weight"] = tensor
            if direction == "lora_down":
                kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    return kohya


def lora_metadata(*, settings: LoraSettings, base_model: str, trigger_phrase: str,
                  resolution: int, prediction_type: str, training_steps: int,
                  train_text_encoder: bool, family: str = "sd1") -> dict[str, str]:
    """kohya `ss_*` and ModelSpec keys (all values strings, as safetensors requires)."""
    version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
    architecture = FAMILY_NAMES[family]
    return {
        "ss_base_model_version": version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(settings.rank),
        "ss_network_alpha": str(settings.alpha),
        "ss_network_dropout": str(settings.dropout),
        "ss_output_name": Path(trigger_phrase).name.replace(" ", "_") or "dreambooth",
        "ss_sd_model_name": base_model,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_max_train_steps": str(training_steps),
        "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_text_encoder_lr": "trained" if train_text_encoder else "0",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": f"DreamBooth LoRA: {trigger_phrase}",
        "modelspec.trigger_phrase": trigger_phrase,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": prediction_type,
        "modelspec.date": datetime.date.today().isoformat(),
        "training_steps": str(training_steps),
    }


def save_lora_files(output_dir: str | Path, unet, text_encoders: list, *,
                    settings: LoraSettings, metadata: dict[str, str],
                    family: str = "sd1") -> tuple[Path, Path]:
    """Write the diffusers and the kohya LoRA files atomically; return their paths."""
    output_dir = Path(output_dir)
    states = lora_state_dicts(unet, text_encoders)
    diffusers_state = {f"{prefix}.{key}": value for prefix, state in states.items()
                       for key, value in state.items()}
    # diffusers reads each adapter's LoraConfig from these keys (alpha / rank scale).
    text_config = settings.peft_config(settings.text_encoder_target_modules)
    configs = {"unet": settings.peft_config(settings.unet_target_modules),
               "text_encoder": text_config, "text_encoder_2": text_config}
    adapter_metadata = {}
    for prefix in states:
        for key, value in configs[prefix].to_dict().items():
            adapter_metadata[f"{prefix}.{key}"] = sorted(value) if isinstance(value, set) else value
    diffusers_metadata = {"format": "pt", **metadata, "lora_adapter_metadata": json.dumps(
        adapter_metadata, indent=2, sort_keys=True, default=str)}
    diffusers_path = output_dir / DIFFUSERS_LORA_FILE
    kohya_path = output_dir / KOHYA_LORA_FILE
    with atomic_path(diffusers_path) as tmp:
        save_file(diffusers_state, str(tmp), metadata=diffusers_metadata)
    with atomic_path(kohya_path) as tmp:
        save_file(to_kohya(states, settings.alpha, family=family), str(tmp), metadata=metadata)
    return diffusers_path, kohya_path
