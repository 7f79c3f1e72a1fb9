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
LORA_IMPLEMENTATION = "https://github.com/huggingface/diffusers"
MODELSPEC_VERSION = "1.0.1"  # the version kohya's sd-scripts write today


def modelspec(family: str, prediction_type: str, *, title: str, resolution: int,
              lora: bool = False, trigger_phrase: str | None = None) -> dict[str, str]:
    """ModelSpec metadata (all values strings) of a checkpoint, or with `lora` of a LoRA for
    one; `prediction_type` is the scheduler's ('epsilon' or 'v_prediction')."""
    architecture = MODELSPEC_ARCHITECTURE[(family, prediction_type)]
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora" if lora else architecture,
        "modelspec.implementation": LORA_IMPLEMENTATION if lora else IMPLEMENTATION[family],
        "modelspec.title": title,
    }
    if trigger_phrase is not None:
        spec["modelspec.trigger_phrase"] = trigger_phrase
    spec.update({
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": datetime.date.today().isoformat(),
    })
    return spec
