"""What an SD 3.x or FLUX.1 run writes: the diffusers pipeline folder, or the diffusers LoRA file.

- full fine-tune: base pipeline + trained transformer (and CLIP encoders) as a diffusers folder,
  `StableDiffusion3Pipeline` / `FluxPipeline.from_pretrained(output_dir)` loads it;
- LoRA: `pytorch_lora_weights.safetensors`, written by the pipeline class's own
  `save_lora_weights` (keys `transformer.<module>.lora_A.weight`, `text_encoder.…`, the adapter
  configs in its metadata), which `pipe.load_lora_weights(output_dir)` restores.
Both beside `training_config.yaml` and `versions.json`; each file is renamed into place only
once complete. Trained weights are saved in `dtype` (fp32 with upcast_before_saving).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from dreambooth.files import atomic_folder
from dreambooth.formats.export import write_run_files
from dreambooth.models import DiffusionComponents, pipeline_class
from dreambooth.train.lora import ADAPTER_NAME, LoraSettings

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def save_flow_pipeline(components: DiffusionComponents, trained: dict[str, torch.nn.Module],
                       output_dir: str | Path, *, config_yaml: str, dtype: torch.dtype) -> Path:
    """The base pipeline with the `trained` modules ({"transformer": ..., "text_encoder": ...})
    swapped in, saved as a diffusers folder; the frozen parts (T5, VAE ...) come from disk."""
    from diffusers import DiffusionPipeline

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for module in trained.values():
        module.to("cpu")
        if module.dtype != dtype:  # (diffusers warns on every cast, needed or not)
            module.to(dtype=dtype)
    pipeline = DiffusionPipeline.from_pretrained(components.path, **trained,
                                                 local_files_only=True)
    with atomic_folder(output_dir, existing="merge") as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        write_run_files(staging, config_yaml)
    return output_dir


def _adapter_metadata(config) -> dict:
    return {key: sorted(value) if isinstance(value, set) else value
            for key, value in config.to_dict().items()}


def save_flow_lora(output_dir: str | Path, family: str, transformer, text_encoders: list, *,
                   settings: LoraSettings, dtype: torch.dtype,
                   text_encoder_names: list[str]) -> Path:
    """Write `pytorch_lora_weights.safetensors` into `output_dir` with diffusers' writer;
    `text_encoder_names` are the pipeline's names of `text_encoders` (CLIP only)."""
    from peft.utils import get_peft_model_state_dict

    def state(model) -> dict[str, torch.Tensor]:
        return {key: value.detach().to("cpu", dtype).contiguous() for key, value
                in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}

    layers = {"transformer_lora_layers": state(transformer),
              "transformer_lora_adapter_metadata": _adapter_metadata(
                  settings.peft_config(settings.unet_target_modules))}
    text_config = _adapter_metadata(settings.peft_config(settings.text_encoder_target_modules))
    for name, encoder in zip(text_encoder_names, text_encoders):
        if any("lora_" in key for key, _ in encoder.named_parameters()):
            layers[f"{name}_lora_layers"] = state(encoder)
            layers[f"{name}_lora_adapter_metadata"] = text_config
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / DIFFUSERS_LORA_FILE
    staging = Path(tempfile.mkdtemp(prefix=".lora-", dir=output_dir))
    try:
        pipeline_class(family).save_lora_weights(staging, weight_name=DIFFUSERS_LORA_FILE,
                                                 **layers)
        (staging / DIFFUSERS_LORA_FILE).replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
