"""FLUX.1 (Black Forest Labs, 2024): a rectified-flow transformer conditioned on CLIP-L and T5.

CLIP-L gives only the pooled embedding (768), T5 the text tokens (L x 4096; zero 3-d text ids).
Latents (B, 16, h, w) are packed 2x2 into a sequence of h/2 x w/2 tokens of 64 channels with
(0, row, column) image ids for the rotary embedding. FLUX.1-dev is guidance-distilled: its
transformer takes the guidance scale as an input (`guidance_embeds`), which training sets to
`guidance_scale` (diffusers' script: 3.5 by default, 1.0 in its README); schnell has none.
The transformer takes timesteps t = sigma (it multiplies by 1000 itself).
"""

from __future__ import annotations

import torch

PIPELINE = "FluxPipeline"
CLIP_ENCODERS = (("tokenizer", "text_encoder"),)
T5 = ("tokenizer_2", "text_encoder_2")
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # diffusers' train_dreambooth_lora_flux.py (dev)
LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
LORA_BLOCKS = "transformer_blocks"
WEIGHTING_SCHEME = "none"  # diffusers' train_dreambooth_lora_flux.py defaults
PRECONDITION_OUTPUTS = False
GUIDANCE_SCALE = 3.5  # FluxPipeline's default guidance input (dev; schnell ignores it)


def max_resolution(transformer, vae_scale_factor: int) -> None:
    """None: rotary position embeddings put no limit of their own on the image size."""
    return None


def encode_clip(tokenizers: list, encoders: list, prompts: list[str]
                ) -> tuple[None, torch.Tensor]:
    """(None, (N, P)): FLUX.1 uses only CLIP-L's pooled output."""
    (tokenizer,), (encoder,) = tokenizers, encoders
    ids = tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    return None, encoder(ids.to(encoder.device), output_hidden_states=False).pooler_output


def join(clip_tokens: None, t5_tokens: torch.Tensor) -> torch.Tensor:
    return t5_tokens


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch one token, channels first."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of pack_latents: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3): (0, row, column) of each packed token, for the rotary embedding."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def predict(transformer, noisy_latents: torch.Tensor, sigmas: torch.Tensor,
            text_tokens: torch.Tensor, pooled: torch.Tensor, guidance_scale: float
            ) -> torch.Tensor:
    """The velocity for latents x_t (B, 16, h, w) at sigmas (B,), unpacked to (B, 16, h, w)."""
    b, _, h, w = noisy_latents.shape
    dtype = noisy_latents.dtype
    guidance = (torch.full((b,), guidance_scale, device=noisy_latents.device, dtype=dtype)
                if transformer.config.guidance_embeds else None)
    tokens = transformer(
        hidden_states=pack_latents(noisy_latents), timestep=sigmas.to(dtype), guidance=guidance,
        pooled_projections=pooled, encoder_hidden_states=text_tokens,
        txt_ids=torch.zeros(text_tokens.shape[1], 3, device=noisy_latents.device, dtype=dtype),
        img_ids=image_ids(h, w, noisy_latents.device, dtype), return_dict=False)[0]
    return unpack_latents(tokens, h, w)
