"""Tiny pipelines of every family built from config, for tests and the quick start.

SD 1.x, 2.x and SDXL (UNets), SD 3.x and FLUX.1 (diffusion transformers with a T5 encoder).
Nothing here downloads anything: the CLIP tokenizer vocabulary is made in-process (byte-level
BPE over the 256 byte symbols plus merges for a handful of words), the T5 tokenizer is a
Unigram model over those words and single characters, and every model gets random weights
from a seeded generator, so two builds with the same seed are identical.
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


def build_tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer (sentencepiece-style Unigram) with a ~90-entry vocabulary: the words
    above as whole pieces, then single characters; anything else is <unk>."""
    from transformers import T5TokenizerFast

    characters = "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0) for word in _TINY_WORDS]
    vocab += [(c, -5.0) for c in characters] + [("\u2581" + c, -5.5) for c in characters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")


def _tiny_text_encoder(tokenizer, *, with_projection: bool = False, width: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def build_tiny_pipeline(
    *,
    family: str = "sd1",
    seed: int = 0,
    prediction_type: str = "epsilon",
    sample_size: int = 32,
    block_channels: tuple[int, ...] = (32, 64),
):
    """A pipeline of the given family with ~1M parameters.

    - sd1: UNet with conv projections in its transformer blocks, one CLIP text encoder.
    - sd2: linear projections (`use_linear_projection`, as SD 2.x), per-block head dims.
    - sdxl: two text encoders (the second with a projection giving pooled embeddings), the UNet
      conditioned on pooled text + size/crop "time ids" (`addition_embed_type="text_time"`).
    - sd3: SD3Transformer2DModel (2 joint blocks) on 16 latent channels, CLIP-L (32 wide,
      identity projection) and CLIP-G (48 wide) with projections and a T5 encoder (96 wide)
      (`_tiny_flow_pipeline`).
    - flux: FluxTransformer2DModel (1 double + 1 single block, guidance embedding as
      FLUX.1-dev) on 16 latent channels packed 2x2, CLIP-L (pooled) and T5.
    `sample_size` is the image size in pixels; latents are `sample_size // 4` with this VAE.
    `prediction_type` and `block_channels` apply to the UNet families only.
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {', '.join(FAMILIES)}")
    if family in ("sd3", "flux"):
        return _tiny_flow_pipeline(family, seed=seed, sample_size=sample_size)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    blocks = len(block_channels)
    unet_kwargs = dict(
        sample_size=sample_size // 4, in_channels=4, out_channels=4,
        block_out_channels=block_channels, layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (blocks - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (blocks - 1) + ("UpBlock2D",),
        cross_attention_dim=32, attention_head_dim=8,
    )
    if family == "sd2":
        unet_kwargs.update(use_linear_projection=True, attention_head_dim=(2, 4)[:blocks])
    if family == "sdxl":
        # pooled text (32) + 6 time ids x 8 = 80 inputs to the added embedding.
        unet_kwargs.update(use_linear_projection=True, attention_head_dim=(2, 4)[:blocks],
                           cross_attention_dim=64, addition_embed_type="text_time",
                           addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    unet = UNet2DConditionModel(**unet_kwargs)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4, norm_num_groups=16, sample_size=sample_size,
    )
    scheduler_kwargs = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, prediction_type=prediction_type, steps_offset=1,
    )
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=_tiny_text_encoder(tokenizer),
            text_encoder_2=_tiny_text_encoder(tokenizer, with_projection=True),
            tokenizer=tokenizer, tokenizer_2=build_tiny_tokenizer(), unet=unet,
            scheduler=EulerDiscreteScheduler(**scheduler_kwargs),
        )
    # PNDM is what SD 1.x/2.x checkpoints ship for sampling; training reads only its config.
    return StableDiffusionPipeline(
        vae=vae, text_encoder=_tiny_text_encoder(tokenizer), tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True, **scheduler_kwargs),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# Latent normalisation of the real models' VAEs: latents = (z - shift) * scale.
_FLOW_VAE_FACTORS = {"sd3": (0.0609, 1.5305), "flux": (0.1159, 0.3611)}


def _tiny_t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model,
        num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id))


def _tiny_flow_pipeline(family: str, *, seed: int, sample_size: int):
    """SD 3.x or FLUX.1 architecture at toy size (see build_tiny_pipeline)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    shift_factor, scaling_factor = _FLOW_VAE_FACTORS[family]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=16, norm_num_groups=16, sample_size=sample_size,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
        use_quant_conv=False, use_post_quant_conv=False)
    clip_tokenizer = build_tiny_tokenizer()
    if family == "sd3":
        # CLIP-G is wider than CLIP-L (48 / 32; SD3's are 1280 / 768) because diffusers'
        # single-file reader tells the two apart by width, as for SDXL. Joint text tokens:
        # CLIP-L + CLIP-G hidden states side by side (80), zero-padded to T5's width (96);
        # pooled: the two CLIP projections (32 + 48).
        transformer = SD3Transformer2DModel(
            sample_size=sample_size // 4, patch_size=2, in_channels=16, out_channels=16,
            num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=96,
            caption_projection_dim=32, pooled_projection_dim=32 + 48, pos_embed_max_size=32)
        t5_tokenizer = build_tiny_t5_tokenizer(model_max_length=256)
        clip_l = _tiny_text_encoder(clip_tokenizer, with_projection=True)
        with torch.no_grad():
            # SD3 pools CLIP-L unprojected: a single file has no CLIP-L projection and
            # diffusers' reader gives it an identity one, so the tiny model has one too.
            clip_l.text_projection.weight.copy_(torch.eye(32))
        clip_g = _tiny_text_encoder(clip_tokenizer, with_projection=True, width=48)
        return StableDiffusion3Pipeline(
            transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=clip_l, tokenizer=clip_tokenizer,
            text_encoder_2=clip_g, tokenizer_2=build_tiny_tokenizer(),
            text_encoder_3=_tiny_t5_encoder(t5_tokenizer, 96), tokenizer_3=t5_tokenizer)
    # FLUX.1: 16 latent channels packed 2x2 -> 64 per token; RoPE axes (4, 4, 8) sum to the
    # head dim 16; pooled from CLIP-L (32), text tokens from T5 (32).
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    t5_tokenizer = build_tiny_t5_tokenizer(model_max_length=512)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        transformer=transformer, vae=vae, scheduler=scheduler,
        text_encoder=_tiny_text_encoder(clip_tokenizer), tokenizer=clip_tokenizer,
        text_encoder_2=_tiny_t5_encoder(t5_tokenizer, 32), tokenizer_2=t5_tokenizer)


def save_tiny_pipeline(path: str | Path, **kwargs) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder at `path`."""
    path = Path(path)
    build_tiny_pipeline(**kwargs).save_pretrained(path)
    return path
