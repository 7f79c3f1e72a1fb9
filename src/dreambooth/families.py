"""Which model family a model is: the one detector, for folders and single files.

A diffusers pipeline folder and a single-file checkpoint (CompVis key names) are read into the
same facts (which parts the model has), and FAMILY_PARTS decides the family from them. The
flow-matching transformer families (SD 3.x, FLUX.1; their code is in dreambooth.flow) are told
apart by the pipeline class their model_index.json names, and in a single file by the original
transformer's block names (formats.transformer_keys.transformer_file_family).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

UNET_PREFIX = "model.diffusion_model."  # the UNet's weights in a single-file checkpoint


class UnknownArchitectureError(ValueError):
    """A model that is no supported family (SD 1.x, SD 2.x, SDXL base, SD 3.x, FLUX.1); the
    message says what it looks like instead."""


UNET_FAMILIES = ("sd1", "sd2", "sdxl")  # denoising UNets trained on noise (or v) prediction
# The diffusion transformers trained on the rectified-flow velocity, one module each in
# dreambooth.flow (dreambooth/flow/<family>.py): model_index.json's `_class_name` of the
# family's diffusers pipeline -> (family, the models it must name). SD 3.x has CLIP-L, CLIP-G
# (both with projection) and T5-XXL; FLUX.1 has CLIP-L (pooled only) and T5-XXL. Adding a
# family is its module and its line here.
FLOW_PIPELINES = {
    "StableDiffusion3Pipeline": ("sd3", ("transformer", "vae", "text_encoder", "text_encoder_2",
                                         "text_encoder_3")),
    "FluxPipeline": ("flux", ("transformer", "vae", "text_encoder", "text_encoder_2")),
}
FLOW_MATCHING_FAMILIES = tuple(family for family, _ in FLOW_PIPELINES.values())  # sd3, flux
FAMILIES = UNET_FAMILIES + FLOW_MATCHING_FAMILIES
# diffusers pipeline class of each family.
PIPELINE_CLASSES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                    "sdxl": "StableDiffusionXLPipeline",
                    **{family: name for name, (family, _) in FLOW_PIPELINES.items()}}


def pipeline_class(family: str):
    """The diffusers text-to-image pipeline class of a family (PIPELINE_CLASSES)."""
    import diffusers

    if family not in PIPELINE_CLASSES:
        raise ValueError(f"family={family!r} is not one of {', '.join(PIPELINE_CLASSES)}")
    return getattr(diffusers, PIPELINE_CLASSES[family])


def flow_subfolders(family: str) -> tuple[str, ...]:
    """The subfolders a flow-matching family's pipeline folder has: its models, a tokenizer
    per text encoder, the scheduler."""
    models = next(parts for name, (f, parts) in FLOW_PIPELINES.items() if f == family)
    tokenizers = tuple(part.replace("text_encoder", "tokenizer") for part in models
                       if part.startswith("text_encoder"))
    return models + tokenizers + ("scheduler",)


# What sets each family apart, tried in this order: SDXL adds a second text encoder (OpenCLIP
# ViT-bigG/14) to CLIP ViT-L/14; SD 2.x replaced CLIP with OpenCLIP ViT-H/14 (and its UNet
# takes linear projections in the transformer blocks); SD 1.x has CLIP ViT-L/14 alone.
FAMILY_PARTS = (("sdxl", {"unet", "text_encoder", "text_encoder_2"}),
                ("sd2", {"unet", "text_encoder", "open_clip"}),
                ("sd1", {"unet", "text_encoder"}))
# The same parts in a single file's CompVis key names . SDXL refiners
# keep only the second, OpenCLIP, embedder, and keep it first.
_KEY_PARTS = {
    "unet": ("model.diffusion_model.input_blocks.",),
    "text_encoder": ("cond_stage_model.transformer.", "cond_stage_model.model.",
                     "conditioner.embedders.0.transformer."),
    "text_encoder_2": ("conditioner.embedders.1.model.", "conditioner.embedders.0.model."),
    "open_clip": ("cond_stage_model.model.", "conditioner.embedders.1.model.",
                  "conditioner.embedders.0.model."),
}


def is_flow_matching(family: str) -> bool:
    """Whether a family trains on the rectified-flow objective (SD 3.x, FLUX.1)."""
    return family in FLOW_MATCHING_FAMILIES


def detect_family(model: str | Path | Iterable[str]) -> str:
    """'sd1', 'sd2' or 'sdxl' (FAMILY_PARTS), 'sd3' or 'flux' (FLOW_PIPELINES) for a diffusers
    pipeline folder; the same for the key names of a single-file checkpoint: CompVis names for
    the UNet families, the original transformer's names (Stability's `joint_blocks.*`, Black
    Forest Labs' `double_blocks.*`, with or without `model.diffusion_model.`) for SD3 and FLUX
    (formats.transformer_keys.transformer_file_family).

    A folder or keys of no supported model raise UnknownArchitectureError (for keys, with a
    description of what they look like).
    """
    if isinstance(model, (str, Path)):
        folder = Path(model)
        flow = _flow_family(folder)
        if flow is not None:
            return flow
        parts = _folder_parts(folder)
    else:
        from dreambooth.formats.transformer_keys import transformer_file_family

        folder, keys = None, list(model)
        flow = None if _looks_like_lora(keys) else transformer_file_family(keys)
        if flow is not None:
            return flow
        parts = {part for part, prefixes in _KEY_PARTS.items()
                 if any(key.startswith(prefixes) for key in keys)}
    for family, needed in FAMILY_PARTS:
        if needed <= parts:
            return family
    if folder is not None:
        if "unet" not in parts:
            raise UnknownArchitectureError(
                f"'{folder}' has no UNet (its model_index.json names none)")
        if "text_encoder_2" in parts:
            raise UnknownArchitectureError(
                f"'{folder}' has only an OpenCLIP text encoder (an SDXL refiner?); only SDXL "
                "base pipelines are supported")
        raise UnknownArchitectureError(
            f"'{folder}' has no text encoder (its model_index.json names none)")
    if "unet" not in parts:
        reason = f"not a Stable Diffusion checkpoint: no UNet under '{_KEY_PARTS['unet'][0]}*'"
    elif "text_encoder_2" in parts:
        reason = ("an SDXL refiner checkpoint (one OpenCLIP embedder, "
                  "'conditioner.embedders.0.model.*'), which this tool does not train")
    else:
        reason = ("a UNet without a text encoder this tool knows (no 'cond_stage_model.*' or "
                  "'conditioner.embedders.*')")
    raise UnknownArchitectureError(
        f"{reason}; {describe_keys(keys)}. Supported are Stable Diffusion 1.x, 2.x and SDXL "
        "base checkpoints with CompVis key names, and SD 3.x / FLUX.1 files with the original "
        "transformer's names.")


def _model_index(folder: Path) -> dict:
    path = folder / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise UnknownArchitectureError(f"'{folder}' is not a diffusers pipeline folder: it has "
                                       "no model_index.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnknownArchitectureError(f"cannot read '{path}': {error}") from None
    if not isinstance(index, dict):
        raise UnknownArchitectureError(f"'{path}' must hold a JSON object")
    return index


def _flow_family(folder: Path) -> str | None:
    """'sd3' or 'flux' when model_index.json names that pipeline, None for any other class."""
    index = _model_index(folder)
    known = FLOW_PIPELINES.get(index.get("_class_name"))
    if known is None:
        if "transformer" in index and "unet" not in index:
            raise UnknownArchitectureError(
                f"'{folder}' is a {index.get('_class_name')} (a diffusion transformer), which "
                f"this tool does not train; supported transformers are "
                f"{', '.join(FLOW_PIPELINES)}")
        return None
    family, needed = known
    missing = [name for name in needed if not (index.get(name) or [None])[0]]
    if missing:
        raise UnknownArchitectureError(
            f"'{folder}' is a {index['_class_name']} without {', '.join(missing)} (its "
            "model_index.json names none); pass the complete pipeline folder")
    return family


def _folder_parts(folder: Path) -> set[str]:
    index = _model_index(folder)
    parts = {name for name in ("unet", "text_encoder", "text_encoder_2")
             if (index.get(name) or [None])[0]}
    if "unet" in parts:
        # A folder does not say which CLIP its text encoder is; the UNet of an OpenCLIP model
        # takes linear projections (SD 2.x and SDXL do, SD 1.x does not).
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
        if unet_config.get("use_linear_projection"):
            parts.add("open_clip")
    return parts


def _key_group(key: str) -> str:
    head = key.split(".", 1)[0]
    if head.startswith("lora_"):  # kohya LoRA keys: lora_unet_down_blocks_0_...
        return "_".join(head.split("_")[:2]) + "_*"
    parts = key.split(".")
    depth = 3 if parts[0] in ("model", "conditioner", "cond_stage_model") else 2
    return ".".join(parts[:depth]) + ".*" if len(parts) > depth else key


def describe_keys(keys: Iterable[str], limit: int = 6) -> str:
    """A short description of what a set of state-dict keys looks like, for error messages."""
    keys = list(keys)
    if not keys:
        return "it holds no tensors at all"
    groups = Counter(_key_group(key) for key in keys)
    shown = ", ".join(f"'{group}' ({count})" for group, count in groups.most_common(limit))
    more = f" and {len(groups) - limit} more groups" if len(groups) > limit else ""
    text = f"its {len(keys)} tensors are named like {shown}{more}"
    hints = []
    if _looks_like_lora(keys):
        hints.append("this looks like a LoRA, not a full checkpoint: load it on top of a base "
                     "model instead")
    elif any(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in keys):
        hints.append("this looks like one diffusers component (a UNet's weights), not a whole "
                     "pipeline: pass the diffusers folder that holds it")
    elif any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.")) for k in keys):
        hints.append("this looks like a standalone VAE")
    elif any(k.startswith(("transformer_blocks.", "single_transformer_blocks."))
             for k in keys):
        hints.append("this looks like a diffusers SD3/FLUX transformer's weights, not a single "
                     "file: pass the diffusers folder that holds it")
    return text + ("; " + "; ".join(hints) if hints else "")


def _looks_like_lora(keys: list[str]) -> bool:
    return any(".lora_" in k or k.startswith("lora_") or ".lora." in k for k in keys)
