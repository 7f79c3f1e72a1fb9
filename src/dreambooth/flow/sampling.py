"""Sampling an SD 3.x or FLUX.1 pipeline during training: class images and validation samples.

One CPU generator per image (its initial latents come from its own seed, whatever the batch).
`conditioning`, when given, supplies the text embeddings (the training module's tables, once
T5 is released) instead of the pipeline's own encoders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Conditioning = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]


def uses_true_guidance(pipeline) -> bool:
    """SD 3.x samples with classifier-free guidance; FLUX.1 takes the scale as an input."""
    return type(pipeline).__name__ == "StableDiffusion3Pipeline"


def sample_images(pipeline, prompt: str, *, seeds: list[int], num_inference_steps: int,
                  guidance_scale: float, height: int, width: int, max_sequence_length: int,
                  conditioning: Conditioning | None = None) -> list:
    """One PIL image per seed of `prompt`."""
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    inputs = {}
    if conditioning is None:
        inputs["prompt"] = [prompt] * len(seeds)
    else:
        tokens, pooled = conditioning([prompt] * len(seeds))
        inputs.update(prompt_embeds=tokens, pooled_prompt_embeds=pooled)
        if uses_true_guidance(pipeline) and guidance_scale > 1:
            tokens, pooled = conditioning([""] * len(seeds))  # diffusers' negative prompt ""
            inputs.update(negative_prompt_embeds=tokens, negative_pooled_prompt_embeds=pooled)
    with torch.inference_mode():
        return pipeline(**inputs, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, height=height, width=width,
                        max_sequence_length=max_sequence_length, generator=generators,
                        output_type="pil").images
