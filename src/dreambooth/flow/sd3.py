"""Stable Diffusion 3.x (Esser et al. 2024): MMDiT conditioned on CLIP-L, CLIP-G and T5-XXL.

Text tokens: the two CLIPs' penultimate hidden states side by side (77 x (768 + 1280)),
zero-padded to T5's width (4096) and followed by T5's tokens along the sequence; pooled: the
two CLIPs' projected embeddings side by side (768 + 1280). The transformer takes timesteps
t = 1000 sigma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PIPELINE = "StableDiffusion3Pipeline"
CLIP_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
T5 = ("tokenizer_3", "text_encoder_3")
DEFAULT_MAX_SEQUENCE_LENGTH = 77  # diffusers' train_dreambooth_lora_sd3.py
LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
LORA_BLOCKS = "transformer_blocks"
WEIGHTING_SCHEME = "logit_normal"  # diffusers' train_dreambooth_lora_sd3.py defaults
PRECONDITION_OUTPUTS = True
GUIDANCE_SCALE = 7.0  # StableDiffusion3Pipeline's classifier-free guidance default


def max_resolution(transformer, vae_scale_factor: int) -> int:
    """The side its learned position embedding spans (1536 px for SD 3.x's 96 x 2 x 8)."""
    config = transformer.config
    return config.pos_embed_max_size * config.patch_size * vae_scale_factor


def encode_clip(tokenizers: list, encoders: list, prompts: list[str]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 77, D_L + D_G) penultimate hidden states and (N, P_L + P_G) pooled projections."""
    tokens, pooled = [], []
    for tokenizer, encoder in zip(tokenizers, encoders):
        ids = tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        output = encoder(ids.to(encoder.device), output_hidden_states=True)
        tokens.append(output.hidden_states[-2])
        pooled.append(output.text_embeds)
    return torch.cat(tokens, dim=-1), torch.cat(pooled, dim=-1)


def join(clip_tokens: torch.Tensor, t5_tokens: torch.Tensor) -> torch.Tensor:
    """(N, 77 + L, D_T5): CLIP tokens zero-padded to T5's width, then T5's tokens."""
    clip_tokens = F.pad(clip_tokens, (0, t5_tokens.shape[-1] - clip_tokens.shape[-1]))
    return torch.cat([clip_tokens, t5_tokens.to(clip_tokens.device, clip_tokens.dtype)], dim=-2)


def predict(transformer, noisy_latents: torch.Tensor, sigmas: torch.Tensor,
            text_tokens: torch.Tensor, pooled: torch.Tensor, guidance_scale: float
            ) -> torch.Tensor:
    """The velocity the transformer predicts for latents x_t (B, 16, h, w) at sigmas (B,)."""
    return transformer(hidden_states=noisy_latents, timestep=sigmas * 1000,
                       encoder_hidden_states=text_tokens, pooled_projections=pooled,
                       return_dict=False)[0]
