"""Tiny Stable-Diffusion-architecture pipelines built from config, for tests and the quick start.

Nothing here downloads anything: the tokenizer vocabulary is made in-process (byte-level BPE
over the 256 byte symbols plus merges for a handful of words), and every model gets random
weights from a seeded generator, so two builds with the same seed are identical.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Words that get whole-word merges, so prompts in tests and the demo tokenize compactly.
_TINY_WORDS = (
    "a photo of sks dog cat toy star ball box ring red green blue on the in with background "
    "at beach painting xyz"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-symbol table: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def build_tiny_tokenizer():
    """A CLIPTokenizer with a made-up ~600-entry vocabulary (no files, no network)."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        # Merge left to right: ((a b) c) ... with "</w>" on the last symbol.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = (merged, piece)
            if rule not in merges:
                merges.append(rule)
            merged = merged + piece
            if merged not in vocab_list:
                vocab_list.append(merged)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_pipeline(
    *,
    seed: int = 0,
    prediction_type: str = "epsilon",
    sample_size: int = 32,
    block_channels: tuple[int, ...] = (32, 64),
):
    """A StableDiffusionPipeline with ~1M parameters: 2-block UNet, 2-block VAE, 2-layer CLIP.

    `sample_size` is the image size in pixels; latents are `sample_size // 4` with this VAE.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=block_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(block_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(block_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=sample_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler_kwargs = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, prediction_type=prediction_type,
    )
    # Training reads the scheduler config; PNDM is what SD 1.x checkpoints ship for sampling.
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1, **scheduler_kwargs)
    del DDPMScheduler
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_pipeline(path: str | Path, **kwargs) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder at `path`."""
    path = Path(path)
    build_tiny_pipeline(**kwargs).save_pretrained(path)
    return path
