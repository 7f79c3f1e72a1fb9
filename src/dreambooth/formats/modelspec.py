"""ModelSpec metadata (github.com/Stability-AI/ModelSpec): what a checkpoint or LoRA file is for.

AUTOMATIC1111, ComfyUI and kohya's tools read these keys from a safetensors header to tell the
architecture, the prediction type and the resolution of a file.
"""

from __future__ import annotations

import datetime

# ModelSpec (github.com/Stability-AI/ModelSpec): architecture ids, and the code that implements
# each family's checkpoints; LoRA files name diffusers, whose layout they use.
MODELSPEC_ARCHITECTURE = {("sd1", "epsilon"): "stable-diffusion-v1",
                          ("sd1", "v_prediction"): "stable-diffusion-v1",
                          ("sd2", "epsilon"): "stable-diffusion-v2-512",
                          ("sd2", "v_prediction"): "stable-diffusion-v2-768-v",
                          ("sdxl", "epsilon"): "stable-diffusion-xl-v1-base",
                          ("sdxl", "v_prediction"): "stable-diffusion-xl-v1-base"}
IMPLEMENTATION = {"sd1": "https://github.com/CompVis/stable-diffusion",
                  "sd2": "https://github.com/Stability-AI/stablediffusion",
                  "sdxl": "https://github.com/Stability-AI/generative-models"}
# SD 3.x and FLUX.1, by released model (transformer_keys.transformer_variant). FLUX ids are
# kohya's (library/sai_model_spec.py); SD3 ids follow the spec's `stable-diffusion-v<N>` style
# that ComfyUI writes for SD3 medium ("stable-diffusion-v3-medium"); kohya writes the same
# models without the "v" ("stable-diffusion-3-medium", "stable-diffusion-3-5-large"), and
# lora_files.lora_family reads both.
VARIANT_ARCHITECTURE = {"flux-dev": "flux-1-dev", "flux-schnell": "flux-1-schnell",
                        "sd3-medium": "stable-diffusion-v3-medium",
                        "sd3.5-medium": "stable-diffusion-v3-5-medium",
                        "sd3.5-large": "stable-diffusion-v3-5-large"}
VARIANT_IMPLEMENTATION = {"flux": "https://github.com/black-forest-labs/flux",
                          "sd3": "https://github.com/Stability-AI/sd3.5"}
LORA_IMPLEMENTATION = "https://github.com/huggingface/diffusers"
MODELSPEC_VERSION = "1.0.1"  # the version kohya's sd-scripts write today


def modelspec(family: str, prediction_type: str | None, *, title: str, resolution: int,
              lora: bool = False, trigger_phrase: str | None = None,
              variant: str | None = None) -> dict[str, str]:
    """ModelSpec metadata (all values strings) of a checkpoint, or with `lora` of a LoRA for
    one; `prediction_type` is the scheduler's ('epsilon' or 'v_prediction'). SD3 and FLUX name
    their `variant` ('flux-dev', 'sd3.5-large' ...) and have no prediction type in the spec's
    sense (they learn a rectified-flow velocity), so none is written, as kohya writes none for
    FLUX."""
    if family in ("sd3", "flux"):
        if variant not in VARIANT_ARCHITECTURE or not variant.startswith(family):
            raise ValueError(f"a {family} ModelSpec needs its variant, one of "
                             f"{', '.join(v for v in VARIANT_ARCHITECTURE if v.startswith(family))}"
                             f"; got {variant!r}")
        architecture = VARIANT_ARCHITECTURE[variant]
        implementation = VARIANT_IMPLEMENTATION[family]
    else:
        architecture = MODELSPEC_ARCHITECTURE[(family, prediction_type)]
        implementation = IMPLEMENTATION[family]
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora" if lora else architecture,
        "modelspec.implementation": LORA_IMPLEMENTATION if lora else implementation,
        "modelspec.title": title,
    }
    if trigger_phrase is not None:
        spec["modelspec.trigger_phrase"] = trigger_phrase
    spec["modelspec.resolution"] = f"{resolution}x{resolution}"
    if family not in ("sd3", "flux"):
        spec["modelspec.prediction_type"] = "v" if prediction_type == "v_prediction" else "epsilon"
    spec["modelspec.date"] = datetime.date.today().isoformat()
    return spec
