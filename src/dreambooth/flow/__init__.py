"""The flow-matching families: SD 3.x (`sd3`) and FLUX.1 (`flux`), one module each.

A family module says how its text encoders turn prompts into the transformer's conditioning
and how its transformer is called on latents; the objective they share is in `objective`.
Adding a family (FLUX.2, Qwen-Image ...) is one new module here with the same names, named
like the family, and its pipeline's line in `dreambooth.families.FLOW_PIPELINES`:

- `PIPELINE`: the diffusers pipeline class name.
- `WEIGHTING_SCHEME`, `PRECONDITION_OUTPUTS`: the defaults of diffusers' training script;
  `GUIDANCE_SCALE`: the pipeline's sampling default.
- `max_resolution(transformer, vae_scale_factor)`: the largest side its transformer takes
  (None: no limit of its own).
- `CLIP_ENCODERS`: the (tokenizer, text encoder) attribute pairs of the CLIP encoders, the only
  text encoders training may fine-tune (as diffusers' scripts); `T5`: T5's pair, always frozen.
- `DEFAULT_MAX_SEQUENCE_LENGTH`: T5 tokens per prompt, as diffusers' training script.
- `LORA_TARGETS`: the transformer modules diffusers' script puts LoRA layers on; `LORA_BLOCKS`
  the name of the blocks `--lora_blocks` picks from.
- `encode_clip(tokenizers, encoders, prompts)` -> (tokens or None, pooled);
  `join(clip_tokens, t5_tokens)` -> the transformer's text tokens.
- `predict(transformer, noisy_latents, sigmas, text_tokens, pooled, guidance_scale)` -> the
  predicted velocity, (B, C, h, w) like the latents.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


def family_module(family: str) -> ModuleType:
    """The module of a flow-matching family: dreambooth.flow.<family>."""
    from dreambooth.families import FLOW_MATCHING_FAMILIES

    if family not in FLOW_MATCHING_FAMILIES:
        raise ValueError(f"family={family!r} is not a flow-matching family "
                         f"({', '.join(FLOW_MATCHING_FAMILIES)})")
    return importlib.import_module(f"{__name__}.{family}")


def encode_t5(tokenizer, encoder, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    """T5's last hidden state for each prompt, padded to `max_sequence_length`: (N, L, D)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_sequence_length,
                    truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
    return encoder(ids.to(encoder.device))[0]
