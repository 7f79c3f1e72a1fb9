"""The frozen base transformer quantized for LoRA training (`--quantize_base`), with torchao.

Every Linear layer of the transformer gets weight-only quantized weights before the LoRA layers
are put on it; peft's torchao LoRA layer then runs the quantized base and the full-precision
adapter side by side, and only the adapter is trained and saved (in full precision):

- int8: `Int8WeightOnlyConfig`, per-channel int8 weights (a quarter of fp32's memory);
- int4: `IntxWeightOnlyConfig(weight_dtype=torch.int4)`, groups of 32 input features sharing a
  scale. It is the int4 layout that runs on the CPU and that peft's LoRA layers take; torchao
  keeps its values unpacked in int8 storage, so it saves the memory of int8 only (packed int4
  kernels need CUDA and are not yet a base peft's LoRA accepts).
Both run on CPU and GPU. Linear weights are cast to `dtype` (the training's autocast dtype)
first, so on a GPU the quantized base computes in bf16 or fp16.
"""

from __future__ import annotations

import torch

QUANTIZE_CHOICES = ("int8", "int4")
INT4_GROUP_SIZE = 32


def quantize_base(model: torch.nn.Module, kind: str, dtype: torch.dtype) -> int:
    """Quantize `model`'s Linear weights in place; return how many layers were quantized."""
    if kind not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize_base={kind!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    try:
        from torchao.quantization import (
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            PerGroup,
            quantize_,
        )
    except ImportError as error:
        raise ImportError("quantize_base needs torchao: pip install 'dreambooth[quantize]' "
                          f"(import failed: {error})") from error
    layers = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    for layer in layers:
        layer.to(dtype=dtype)
    if kind == "int8":
        config = Int8WeightOnlyConfig()
    else:
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                      granularity=PerGroup(INT4_GROUP_SIZE))

    def divisible(module: torch.nn.Module, _name: str) -> bool:
        # int4 groups must tile the input features; a layer they do not tile stays as it is.
        return isinstance(module, torch.nn.Linear) and (
            kind == "int8" or module.in_features % INT4_GROUP_SIZE == 0)

    quantize_(model, config, filter_fn=divisible)
    model.requires_grad_(False)
    return sum(divisible(layer, "") for layer in layers)


def is_quantized(parameter: torch.Tensor) -> bool:
    """Whether a weight is a torchao quantized tensor (not a plain tensor)."""
    return type(parameter.data) is not torch.Tensor
