"""LoRA adapters (Hu et al. 2021) on the UNet and text encoders, built with peft.

`add_lora_adapters` makes only the adapters trainable; `lora_state_dicts` reads them back in
peft layout, which formats/lora_files.py writes as the run's LoRA files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
