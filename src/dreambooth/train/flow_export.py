"""What an SD 3.x or FLUX.1 run writes: the diffusers pipeline folder, or the two LoRA files.

- full fine-tune: base pipeline + trained transformer (and CLIP encoders) as a diffusers folder,
  `StableDiffusion3Pipeline` / `FluxPipeline.from_pretrained(output_dir)` loads it;
- LoRA: `pytorch_lora_weights.safetensors`, written by the pipeline class's own
  `save_lora_weights` (keys `transformer.<module>.lora_A.weight`, `text_encoder.…`, the adapter
  configs in its metadata), which `pipe.load_lora_weights(output_dir)` restores; and
  `{output_name}.safetensors` in the kohya layout on the original layers (fused qkv:
  `lora_unet_double_blocks_0_img_attn_qkv.*`, `lora_unet_joint_blocks_0_x_block_attn_qkv.*`),
  which ComfyUI and kohya's tools load (formats.lora_files.write_kohya_lora). Both carry the
  run's kohya `ss_*` and ModelSpec metadata, as the UNet families' LoRA files do.
All beside `training_config.yaml` and `versions.json`; each file is renamed into place only
once complete, and weights that are not finite in `dtype` are never written. Trained weights
are saved in `dtype` (fp32 with upcast_before_saving).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dreambooth.files import atomic_folder, atomic_path
from dreambooth.formats import ExportError
from dreambooth.formats.export import write_run_files
from dreambooth.formats.lora_files import DIFFUSERS_LORA_FILE, LoraFileError, write_kohya_lora
from dreambooth.models import DiffusionComponents, pipeline_class
from dreambooth.train.lora import ADAPTER_NAME, LoraSettings
from dreambooth.train.module import NonFiniteError

log = logging.getLogger(__name__)


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
                   settings: LoraSettings, dtype: torch.dtype, text_encoder_names: list[str],
                   metadata: dict[str, str], output_name: str) -> tuple[Path, ...]:
    """Write `pytorch_lora_weights.safetensors` (diffusers' writer) and the kohya-layout
    `{output_name}.safetensors` into `output_dir`, both with `metadata` (lora_files.
    lora_metadata's ss_* and ModelSpec keys); return the paths written. `text_encoder_names`
    are the pipeline's names of `text_encoders` (CLIP only). Raises NonFiniteError, writing
    nothing, when a weight is NaN or infinite in `dtype` (an fp16 cast can overflow). A LoRA
    the kohya layout cannot hold (DoRA on the fused q/k/v, a layer the original model does
    not name) gets the diffusers file only, with a warning that says why."""
    from peft.utils import get_peft_model_state_dict

    def state(name: str, model) -> dict[str, torch.Tensor]:
        weights = {key: value.detach().to("cpu", dtype).contiguous() for key, value
                   in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}
        for key, value in weights.items():
            if not torch.isfinite(value).all():
                raise NonFiniteError(f"LoRA weight '{name}.{key}' is NaN or infinite in "
                                     f"{str(dtype).removeprefix('torch.')}; nothing was saved. "
                                     "Save in fp32 (upcast_before_saving) or lower learning_rate")
        return weights

    layers = {"transformer_lora_layers": state("transformer", transformer),
              "transformer_lora_adapter_metadata": _adapter_metadata(
                  settings.peft_config(settings.unet_target_modules))}
    text_config = _adapter_metadata(settings.peft_config(settings.text_encoder_target_modules))
    for name, encoder in zip(text_encoder_names, text_encoders):
        if any("lora_" in key for key, _ in encoder.named_parameters()):
            layers[f"{name}_lora_layers"] = state(name, encoder)
            layers[f"{name}_lora_adapter_metadata"] = text_config
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / DIFFUSERS_LORA_FILE
    staging = Path(tempfile.mkdtemp(prefix=".lora-", dir=output_dir))
    try:
        written = staging / DIFFUSERS_LORA_FILE
        pipeline_class(family).save_lora_weights(staging, weight_name=DIFFUSERS_LORA_FILE,
                                                 **layers)
        # diffusers' writer takes no metadata of ours: the file is written again with its own
        # (format, lora_adapter_metadata) and the run's.
        with safe_open(str(written), framework="pt") as handle:
            own = handle.metadata() or {}
            weights = {key: handle.get_tensor(key) for key in handle.keys()}
        with atomic_path(target) as tmp:
            save_file(weights, str(tmp), metadata={**metadata, **own})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        kohya = write_kohya_lora(target, output_dir / f"{output_name}.safetensors",
                                 metadata=metadata, family=family)
    except (LoraFileError, ExportError) as error:
        log.warning("no kohya-layout file written (%s); %s holds the LoRA", error, target)
        return (target,)
    return target, kohya
