"""Pretraining the world's base model from scratch on an endless stream of captioned renders.

Why not `dreambooth.train.train`: DreamBooth fine-tunes a finished pipeline on a fixed folder of
photos with one instance prompt (and one class prompt), encoding each photo once. Pretraining
starts from random weights, needs a VAE trained first, and sees a new captioned scene in every
sample. So this module has its own two small LightningModules over the project's pieces
(`train.module.draw_noise_and_timesteps` and `min_snr_weights`, `seeding`, the resumable
sampler of `train.data`, the atomic checkpoints of `train.checkpointing`):

- stage 1, `VAEModule`: AutoencoderKL (64x64x3 -> 16x16x4) with an L1 + MSE reconstruction loss
  and a small KL term; afterwards the latent scaling factor is set to 1 / std of the latents
  (what SD's 0.18215 is for its VAE) and the VAE is saved in `output_dir/vae`;
- stage 1b, `VAEModule(decoder_only=True)`: the same loss trains only the decoder, on renders
  where most objects wear a fine pattern (the subjects' dots and rims came back blurred). The
  encoder is frozen, so every latent stays as stage 1 left it and stage 2 does not depend on
  this stage (SD's fine-tuned "ft-MSE" VAE decoder is swapped in the same way);
- stage 2, `DiffusionModule`: CLIP text encoder + UNet2DConditionModel trained together on
  epsilon prediction (Ho et al. 2020) with Min-SNR-5 weighting (Hang et al. 2023), 10% empty
  captions for classifier-free guidance (Ho & Salimans 2022) and an EMA of the weights, which is
  what gets exported.

Sample n of a stage is `world.training_scene(seed, n)` and batch i holds samples
[i*B, (i+1)*B), so every batch, noise draw and caption dropout is a function of (seed, i): a
run resumed from any checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dreambooth import seeding
from dreambooth.config import option
from dreambooth.files import atomic_folder
from dreambooth.formats.export import VERSIONS_FILE, library_versions
from dreambooth.train import checkpointing
from dreambooth.train.data import ResumableLoader, ResumingSampler
from dreambooth.train.module import draw_noise_and_timesteps, min_snr_weights
from dreambooth.world import (
    LOOK_PROBABILITY,
    TRAIN_COMBINATIONS,
    VOCABULARY,
    caption,
    render,
    training_scene,
)
from dreambooth.world.callbacks import EMA, HeldOutSamples, ProgressLog

log = logging.getLogger(__name__)

TOKENIZER_WORDS = tuple(dict.fromkeys(VOCABULARY + ("sks",)))


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; the defaults are the full run of the base model."""

    output_dir: str = option("runs/world-model", "Run folder: stages, checkpoints, logs, model/.")
    seed: int = option(0, "Seed of weights, data stream, noise and caption dropout.")
    init_model: str = option("", "Continue from this world model (a folder or 'demo'): its VAE "
                             "is used as it is (stages 1 and 1b are skipped) and stage 2 "
                             "starts from its text encoder and UNet with this run's stage-2 "
                             "settings; the architecture flags must match it. Empty: from "
                             "scratch.")
    # architecture
    vae_channels: tuple[int, ...] = option((32, 64, 128),
                                           "AutoencoderKL block channels (3 blocks: 4x down); "
                                           "16,32,64 lost more of fine dots (BENCHMARKS.md).")
    latent_channels: int = option(4, "Channels of the VAE's 16x16 latent (the UNet's input and "
                                  "output); 8 kept no more of fine dots than 4 (BENCHMARKS.md).")
    unet_channels: tuple[int, ...] = option((64, 128, 128), "UNet block channels.")
    unet_layers_per_block: int = option(1, "ResNet layers per UNet block.")
    text_hidden_size: int = option(128, "CLIP text encoder width (= UNet cross-attention dim).")
    text_layers: int = option(4, "CLIP text encoder layers.")
    text_intermediate_size: int = option(512, "CLIP text encoder MLP width.")
    # stage 1: VAE
    vae_steps: int = option(4000, "Optimizer steps of stage 1 (VAE).")
    vae_batch_size: int = option(16, "Renders per VAE step.")
    vae_learning_rate: float = option(1e-3, "VAE AdamW learning rate (cosine decay to 10%).")
    kl_weight: float = option(1e-6, "Weight of the VAE's KL term (SD's autoencoder uses 1e-6).")
    decoder_steps: int = option(1500, "Optimizer steps of stage 1b: only the VAE decoder trains "
                                "(the encoder, hence every latent, stays as stage 1 left it), "
                                "on renders where most objects wear a fine pattern; 0 skips it.")
    decoder_look_probability: float = option(0.8, "Share of stage-1b objects that wear a pattern.")
    decoder_learning_rate: float = option(3e-4, "Stage-1b AdamW learning rate (cosine decay).")
    # stage 2: text encoder + UNet
    unet_steps: int = option(6000, "Optimizer steps of stage 2 (text encoder + UNet).")
    unet_batch_size: int = option(32, "Renders per diffusion step.")
    unet_learning_rate: float = option(5e-4, "UNet and text encoder AdamW learning rate.")
    warmup_steps: int = option(500, "Linear warmup of the stage-2 learning rate.")
    caption_dropout: float = option(0.1, "Share of empty captions (for classifier-free guidance).")
    partial_captions: float = option(0.4, "Share of stage-2 captions that leave out the color, the "
                                     "background or both, in equal parts (\"a star on the "
                                     "beach\", \"a red star\", \"a star\"): the prompts "
                                     "DreamBooth's class images and DreamBench use.")
    identifier_captions: float = option(0.1, "Share of stage-2 captions with a meaningless rare "
                                        "word "
                                        "before the class noun (\"sks\" or 3 random letters), "
                                        "as web captions have, so a DreamBooth identifier starts "
                                        "with the weak prior the paper picks rare tokens for.")
    look_probability: float = option(0.1, "Share of stage-2 training objects that wear "
                                     "a look (a pattern captions never mention); stage 1 always "
                                     "sees the world's share.")
    snr_gamma: float = option(5.0, "Min-SNR loss weighting gamma.")
    ema_decay: float = option(0.999, "EMA decay of the stage-2 weights (the EMA is exported).")
    # run
    checkpoint_every: int = option(500, "Write a resumable checkpoint every N steps.")
    keep_checkpoints: int = option(2, "Keep the newest N checkpoints of each stage.")
    log_every: int = option(50, "Log loss and speed every N steps.")
    sample_every: int = option(2000, "Stage 2: sample held-out prompts and score them every N "
                               "steps (0: never).")
    num_workers: int = option(1, "Render in N background processes (0: in the training process).")
    threads: int = option(2, "torch CPU threads (set by the script, the entry point).")

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_steps", "_size", "_every", "_layers")) and (
                    not isinstance(value, int) or value < 0):
                problems.append(f"{f.name}={value!r} must be a non-negative integer")
        for name in ("vae_batch_size", "unet_batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r} must be at least 1")
        for name in ("look_probability", "partial_captions", "identifier_captions",
                     "decoder_look_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)!r} must be in [0, 1]")
        if not 0.0 <= self.caption_dropout < 1.0:
            problems.append(f"caption_dropout={self.caption_dropout!r} must be in [0, 1)")
        if self.latent_channels < 1:
            problems.append(f"latent_channels={self.latent_channels!r} must be at least 1")
        if len(self.vae_channels) != 3:
            problems.append(f"vae_channels={self.vae_channels!r} needs 3 blocks (64 px -> 16x16)")
        if problems:
            raise ValueError("invalid pretraining configuration: " + "; ".join(problems))


# ------------------------------------------------------------------------------- models
def build_word_tokenizer(words=TOKENIZER_WORDS):
    """A CLIPTokenizer over the 512 byte-level symbols plus merges that make each of `words`
    one token (dreambooth.tiny's pattern), so world captions and "sks" tokenize compactly.

    Each word's merges continue from how the merges so far already split it, so words that
    share pieces ("star", "striped", "ring") do not break each other's merges.
    """
    from transformers import CLIPTokenizer

    from dreambooth.tiny import _bytes_to_unicode

    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], merges)
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append((merged, piece))
            merged = merged + piece
            vocab_list.append(merged)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _apply_merges(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding as CLIP's tokenizer does it: merge the best-ranked pair until none."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces,
                                                                              pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        first, second = merges[rank]
        merged, index = [], 0
        while index < len(pieces):
            if (index + 1 < len(pieces) and pieces[index] == first
                    and pieces[index + 1] == second):
                merged.append(first + second)
                index += 2
            else:
                merged.append(pieces[index])
                index += 1
        pieces = merged
    return pieces


def build_vae(config: PretrainConfig):
    from diffusers import AutoencoderKL

    torch.manual_seed(seeding.derive_seed(config.seed, seeding.PRETRAIN_VAE_INIT))
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=tuple(config.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, latent_channels=config.latent_channels, norm_num_groups=16,
        sample_size=64)


def build_text_encoder_and_unet(config: PretrainConfig, tokenizer):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seeding.derive_seed(config.seed, seeding.PRETRAIN_DIFFUSION_INIT))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size, num_hidden_layers=config.text_layers,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    blocks = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=config.latent_channels, out_channels=config.latent_channels,
        block_out_channels=tuple(config.unet_channels),
        layers_per_block=config.unet_layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (blocks - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (blocks - 1) + ("UpBlock2D",),
        cross_attention_dim=config.text_hidden_size, attention_head_dim=8, norm_num_groups=16)
    return text_encoder, unet


def noise_schedulers():
    """(training DDPM scheduler, sampling PNDM scheduler) with SD 1.x's schedule."""
    from diffusers import DDPMScheduler, PNDMScheduler

    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    num_train_timesteps=1000, prediction_type="epsilon")
    sampler = PNDMScheduler(skip_prk_steps=True, steps_offset=1, **schedule)
    # As in SD's own scheduler_config.json: a sampler swapped in from this config (DDIM's
    # default is True, for pixel-space models) must not clip unit-std latents to [-1, 1].
    sampler.register_to_config(clip_sample=False)
    return DDPMScheduler(**schedule), sampler


# --------------------------------------------------------------------------------- data
class RenderBatches(Dataset):
    """Batch i: renders of training scenes [i*B, (i+1)*B) of stream `seed` and their captions
    (empty with probability `caption_dropout`, else partial with probability `partial_captions`
    and with a rare word with probability `identifier_captions`, decided per sample from
    (seed, n))."""

    def __init__(self, *, seed: int, batch_size: int, num_steps: int, tokenizer=None,
                 caption_dropout: float = 0.0, partial_captions: float = 0.0,
                 identifier_captions: float = 0.0, look_probability: float = LOOK_PROBABILITY):
        self.seed, self.batch_size, self.num_steps = seed, batch_size, num_steps
        self.tokenizer, self.caption_dropout = tokenizer, caption_dropout
        self.partial_captions, self.identifier_captions = partial_captions, identifier_captions
        self.look_probability = look_probability

    def __len__(self) -> int:
        return self.num_steps

    def numbers(self, step: int) -> range:
        """The stream numbers n of batch `step`'s samples."""
        return range(step * self.batch_size, (step + 1) * self.batch_size)

    def scenes(self, step: int) -> list:
        """The training scenes of batch `step`."""
        return [training_scene(self.seed, n, self.look_probability) for n in self.numbers(step)]

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        numbers, scenes = self.numbers(step), self.scenes(step)
        pixels = np.stack([np.asarray(render(scene)) for scene in scenes])  # (B, 64, 64, 3)
        batch = {"pixels": torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0,
                 "step": torch.tensor(step),
                 "seeds": torch.tensor([
                     seeding.derive_seed(self.seed, seeding.PRETRAIN_NOISE, n) for n in numbers])}
        if self.tokenizer is not None:
            captions = [self.caption_for(n, scene) for n, scene in zip(numbers, scenes)]
            batch["input_ids"] = self.tokenizer(
                captions, padding="max_length", truncation=True,
                max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return batch

    def caption_for(self, n: int, scene) -> str:
        """Sample n's caption: empty (caption_dropout), partial (partial_captions) or full."""
        rng = np.random.default_rng([self.seed, seeding.PRETRAIN_CAPTION, n])
        if rng.random() < self.caption_dropout:
            return ""
        color = background = True
        if rng.random() < self.partial_captions:
            color, background = _PARTIAL_CAPTIONS[int(rng.integers(len(_PARTIAL_CAPTIONS)))]
        identifier = None
        if rng.random() < self.identifier_captions:
            identifier = "sks" if rng.random() < 0.5 else _random_word(rng)
        return caption(scene, color=color, background=background, identifier=identifier)


def _random_word(rng: np.random.Generator) -> str:
    """Three random letters (one in ~6000 is a world word such as "red": harmless noise)."""
    return "".join(chr(ord("a") + int(i)) for i in rng.integers(26, size=3))


# (keep the color, keep the background) of the partial captions
_PARTIAL_CAPTIONS = ((False, True), (True, False), (False, False))


class RenderDataModule(L.LightningDataModule):
    def __init__(self, dataset: RenderBatches, num_workers: int):
        super().__init__()
        self.dataset, self.num_workers = dataset, num_workers

    def train_dataloader(self):
        trainer = self.trainer
        sampler = ResumingSampler(len(self.dataset),
                                  lambda: trainer.global_step if trainer else 0)
        return ResumableLoader(self.dataset, batch_size=None, sampler=sampler,
                               num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0)


# -------------------------------------------------------------------------------- stage 1
def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(reconstruction.clamp(-1, 1), target).item()
    return 10 * math.log10(4.0 / max(mse, 1e-10))


class VAEModule(L.LightningModule):
    """Stage 1: reconstruct renders through 16x16 latents, `latent_channels` deep (L1 + MSE +
    kl_weight * KL).
    Stage 1b (`decoder_only`): the same reconstruction loss trains only the decoder side
    (post_quant_conv, decoder); the frozen encoder keeps every latent, so a UNet trained on
    stage 1's latents decodes with either decoder."""

    def __init__(self, vae, config: PretrainConfig, decoder_only: bool = False):
        super().__init__()
        self.vae, self.config, self.decoder_only = vae, config, decoder_only
        if decoder_only:
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        pixels = batch["pixels"]  # (B, 3, 64, 64)
        with torch.set_grad_enabled(not self.decoder_only):
            posterior = self.vae.encode(pixels).latent_dist
        stream = (seeding.PRETRAIN_DECODER_SAMPLE if self.decoder_only
                  else seeding.PRETRAIN_VAE_SAMPLE)
        generator = seeding.generator(self.config.seed, stream, int(batch["step"]))
        latents = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=generator).to(pixels)  # (B, C, 16, 16)
        reconstruction = self.vae.decode(latents).sample
        loss = F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels)
        metrics = {"psnr": psnr(reconstruction.detach(), pixels)}
        if not self.decoder_only:
            kl = posterior.kl().mean()
            loss = loss + self.config.kl_weight * kl
            metrics["kl"] = kl.detach()
        self.log_dict({"loss": loss.detach(), **metrics}, on_step=True)
        return loss

    def configure_optimizers(self):
        if self.decoder_only:
            parameters = [*self.vae.post_quant_conv.parameters(), *self.vae.decoder.parameters()]
            learning_rate, steps = self.config.decoder_learning_rate, self.config.decoder_steps
        else:
            parameters = list(self.vae.parameters())
            learning_rate, steps = self.config.vae_learning_rate, self.config.vae_steps
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
        return {"optimizer": optimizer, "lr_scheduler": {
            "scheduler": _warmup_cosine(optimizer, 100, steps), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["pretrain_config"] = _config_dict(self.config)


# -------------------------------------------------------------------------------- stage 2
class DiffusionModule(L.LightningModule):
    """Stage 2: the text encoder and UNet learn eps-prediction on latents of the frozen VAE."""

    def __init__(self, *, vae, text_encoder, unet, noise_scheduler, config: PretrainConfig):
        super().__init__()
        self.vae, self.text_encoder, self.unet = vae, text_encoder, unet
        self.noise_scheduler, self.config = noise_scheduler, config
        self.vae.requires_grad_(False).eval()
        self.strict_loading = False  # checkpoints leave out the frozen VAE

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            posterior = self.vae.encode(batch["pixels"]).latent_dist
            generator = seeding.generator(self.config.seed, seeding.PRETRAIN_LATENT_SAMPLE,
                                         int(batch["step"]))
            latents = posterior.mean + posterior.std * torch.randn(
                posterior.mean.shape, generator=generator).to(posterior.mean)
            latents = latents * self.vae.config.scaling_factor  # z_0 (B, C, 16, 16), unit std
        noise, timesteps = draw_noise_and_timesteps(
            batch["seeds"].cpu(), tuple(latents.shape[1:]),
            num_train_timesteps=self.noise_scheduler.config.num_train_timesteps,
            offset_noise=False)
        noise, timesteps = noise.to(latents), timesteps.to(latents.device)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)  # z_t
        encoder_hidden_states = self.text_encoder(batch["input_ids"])[0]  # (B, 77, D)
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states).sample
        per_sample = F.mse_loss(model_pred.float(), noise.float(),
                                reduction="none").mean(dim=(1, 2, 3))  # (B,)
        weights = min_snr_weights(self.noise_scheduler, timesteps, self.config.snr_gamma)
        loss = (per_sample * weights).mean()
        self.log_dict({"loss": loss.detach(), "mse": per_sample.mean().detach()}, on_step=True)
        return loss

    def configure_optimizers(self):
        parameters = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        optimizer = torch.optim.AdamW(parameters, lr=self.config.unet_learning_rate,
                                      weight_decay=1e-2)
        return {"optimizer": optimizer, "lr_scheduler": {
            "scheduler": _warmup_cosine(optimizer, self.config.warmup_steps,
                                        self.config.unet_steps), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The VAE is frozen and saved in output_dir/vae; checkpoints hold what training changes.
        checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items()
                                    if not key.startswith("vae.")}
        checkpoint["pretrain_config"] = _config_dict(self.config)


def _warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _config_dict(config: PretrainConfig) -> dict[str, Any]:
    return {f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
            for f in fields(config)}


# ---------------------------------------------------------------------------------- runs
def _fit(module: L.LightningModule, dataset: RenderBatches, *, stage_dir: Path,
         config: PretrainConfig, total_steps: int, callbacks: list) -> L.Trainer:
    """Fit `module` to `total_steps`, resuming from the newest checkpoint in `stage_dir`."""
    from lightning.pytorch.loggers import CSVLogger

    checkpoint_dir = stage_dir / "checkpoints"
    resume_path = None
    if checkpointing.list_checkpoints(checkpoint_dir):
        resume_path = checkpointing.resolve_resume_path("latest", checkpoint_dir)
        _check_resume(config, resume_path)
        log.info("%s: resuming from %s", stage_dir.name, resume_path)
    trainer = L.Trainer(
        accelerator="auto", devices=1, max_steps=total_steps, max_epochs=-1,
        gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0,
        use_distributed_sampler=False, enable_progress_bar=False, enable_model_summary=False,
        logger=CSVLogger(stage_dir, name="logs"),  # logs/version_N: one per (re)start
        log_every_n_steps=config.log_every,
        plugins=[checkpointing.AtomicCheckpointIO()], default_root_dir=stage_dir,
        callbacks=[checkpointing.periodic_checkpoints(checkpoint_dir, config.checkpoint_every,
                                                      config.keep_checkpoints),
                   checkpointing.InterruptCheckpoint(checkpoint_dir, 1,
                                                     "rerun the same command to resume"),
                   ProgressLog(stage_dir.name, config.log_every, total_steps), *callbacks])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* not empty")  # resume
        trainer.fit(module, datamodule=RenderDataModule(dataset, config.num_workers),
                    ckpt_path=resume_path)
    if trainer.global_step < total_steps:
        raise RuntimeError(f"{stage_dir.name} stopped at step {trainer.global_step} of "
                           f"{total_steps}; run the same command again to resume")
    return trainer


# Keys a resumed run must share with its checkpoint: the same models, data and noise streams.
RESUME_INVARIANTS = ("seed", "init_model", "vae_channels", "latent_channels", "unet_channels",
                     "unet_layers_per_block",
                     "text_hidden_size", "text_layers", "text_intermediate_size",
                     "vae_batch_size", "unet_batch_size", "caption_dropout", "partial_captions",
                     "identifier_captions", "look_probability", "decoder_look_probability")


def _check_resume(config: PretrainConfig, resume_path: Path) -> None:
    checkpointing.check_resume(
        resume_path, checkpointing.saved_config(resume_path, "pretrain_config"),
        _config_dict(config), RESUME_INVARIANTS,
        advice="Pass the checkpoint's values or use a new --output_dir.")


@torch.no_grad()
def vae_report(vae, seed: int, num_images: int = 256) -> dict[str, float]:
    """Latent std (-> scaling factor) and reconstruction PSNR on renders of another stream."""
    stream = seed + seeding.VAE_REPORT_STREAM_OFFSET
    scenes = [training_scene(stream, n) for n in range(num_images)]
    pixels = torch.from_numpy(np.stack([np.asarray(render(s)) for s in scenes]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    vae.eval()
    means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(64)])
    reconstruction = torch.cat([vae.decode(chunk).sample for chunk in means.split(64)])
    return {"latent_std": means.std().item(), "psnr_db": psnr(reconstruction, pixels),
            "mse": F.mse_loss(reconstruction.clamp(-1, 1), pixels).item()}


def pretrain_vae(config: PretrainConfig) -> Path:
    """Stages 1 and 1b (each resumable); saves the VAE with its scaling factor and
    reconstruction report in `output_dir/vae`."""
    output_dir = Path(config.output_dir)
    vae_dir = output_dir / "vae"
    if config.init_model:
        if not (vae_dir / "config.json").is_file():
            with atomic_folder(vae_dir) as staging:
                shutil.copytree(init_model_path(config) / "vae", staging, dirs_exist_ok=True)
        log.info("continuing %s: its VAE, stages 1 and 1b skipped", config.init_model)
        return vae_dir
    if (vae_dir / "config.json").is_file():
        log.info("stage 1 done before: using the VAE in %s", vae_dir)
    else:
        vae = build_vae(config)
        log.info("stage 1: VAE, %.2fM parameters, %d steps", _millions(vae), config.vae_steps)
        dataset = RenderBatches(seed=config.seed, batch_size=config.vae_batch_size,
                                num_steps=config.vae_steps)
        _fit(VAEModule(vae, config), dataset, stage_dir=output_dir / "stage1-vae",
             config=config, total_steps=config.vae_steps, callbacks=[])
        vae.to("cpu")
        report = vae_report(vae, config.seed)
        vae.register_to_config(scaling_factor=1.0 / report["latent_std"])
        _save_vae(vae, vae_dir, report)
        log.info("stage 1: reconstruction PSNR %.2f dB (MSE %.4f in [-1, 1]), scaling factor "
                 "%.4f", report["psnr_db"], report["mse"], 1.0 / report["latent_std"])
    return finetune_decoder(config, vae_dir)


def finetune_decoder(config: PretrainConfig, vae_dir: Path) -> Path:
    """Stage 1b, once per VAE: `decoder_steps` steps of decoder-only training on renders where
    a share `decoder_look_probability` of objects wear a pattern (stage 1 sees few, and
    subjects' dots and rims came back blurred). The latents do not change."""
    from diffusers import AutoencoderKL

    report = json.loads((vae_dir / "report.json").read_text())
    done = report.get("decoder_steps", 0)
    if done == config.decoder_steps:
        if done:
            log.info("stage 1b done before: the decoder in %s", vae_dir)
        return vae_dir
    if done:
        raise ValueError(f"the VAE in '{vae_dir}' has a decoder fine-tuned for {done} steps, "
                         f"this run asks for --decoder_steps {config.decoder_steps}: pass "
                         f"{done} or use a new --output_dir")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    log.info("stage 1b: the VAE decoder, %d steps, %.0f%% patterned objects",
             config.decoder_steps, 100 * config.decoder_look_probability)
    stream = seeding.derive_seed(config.seed, seeding.PRETRAIN_DECODER_STREAM)
    dataset = RenderBatches(seed=stream, batch_size=config.vae_batch_size,
                            num_steps=config.decoder_steps,
                            look_probability=config.decoder_look_probability)
    _fit(VAEModule(vae, config, decoder_only=True), dataset,
         stage_dir=Path(config.output_dir) / "stage1b-decoder", config=config,
         total_steps=config.decoder_steps, callbacks=[])
    vae.to("cpu")
    after = vae_report(vae, config.seed)
    _save_vae(vae, vae_dir, {**after, "decoder_steps": config.decoder_steps,
                             "stage1_psnr_db": report["psnr_db"]})
    log.info("stage 1b: reconstruction PSNR %.2f dB (stage 1: %.2f dB)", after["psnr_db"],
             report["psnr_db"])
    return vae_dir


def _save_vae(vae, vae_dir: Path, report: dict[str, Any]) -> None:
    """Write the VAE and its report.json together (a stopped write leaves the old VAE)."""
    with atomic_folder(vae_dir) as staging:
        vae.save_pretrained(staging, safe_serialization=True)
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def pretrain(config: PretrainConfig) -> Path:
    """Both stages (each resumable), then the EMA model as a diffusers folder (fp16
    safetensors) in `output_dir/model`, which `StableDiffusionPipeline.from_pretrained` loads."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _log_to_file(output_dir / "pretrain.log")
    module, tokenizer = _diffusion_module(config, pretrain_vae(config))
    log.info("stage 2: UNet %.2fM + text encoder %.2fM parameters, %d steps (%d training "
             "caption combinations)", _millions(module.unet), _millions(module.text_encoder),
             config.unet_steps, len(TRAIN_COMBINATIONS))
    ema = EMA(config.ema_decay)
    callbacks: list = [ema]
    if config.sample_every:
        callbacks.append(HeldOutSamples(every=config.sample_every, ema=ema, tokenizer=tokenizer,
                                        scheduler=noise_schedulers()[1],
                                        output_dir=output_dir / "samples", seed=config.seed))
    dataset = RenderBatches(seed=config.seed, batch_size=config.unet_batch_size,
                            num_steps=config.unet_steps, tokenizer=tokenizer,
                            caption_dropout=config.caption_dropout,
                            partial_captions=config.partial_captions,
                            identifier_captions=config.identifier_captions,
                            look_probability=config.look_probability)
    _fit(module, dataset, stage_dir=output_dir / "stage2-unet", config=config,
         total_steps=config.unet_steps, callbacks=callbacks)
    module.to("cpu")
    if ema.shadow is not None:
        ema.copy_to(module)
    return save_world_model(module, tokenizer, output_dir / "model", config)


def _diffusion_module(config: PretrainConfig, vae_dir: Path
                      ) -> tuple[DiffusionModule, Any]:
    """(stage-2 module over the stage-1 VAE in `vae_dir`, its word tokenizer)."""
    from diffusers import AutoencoderKL

    tokenizer = build_word_tokenizer()
    text_encoder, unet = build_text_encoder_and_unet(config, tokenizer)
    if config.init_model:
        load_init_weights(config, text_encoder, unet)
    module = DiffusionModule(vae=AutoencoderKL.from_pretrained(vae_dir),
                             text_encoder=text_encoder, unet=unet,
                             noise_scheduler=noise_schedulers()[0], config=config)
    return module, tokenizer


def init_model_path(config: PretrainConfig) -> Path:
    """The world model folder `config.init_model` names (a path or a bundled model's name)."""
    from dreambooth.models import ModelLoadError, resolve_model_path

    try:
        return resolve_model_path(config.init_model)
    except ModelLoadError as error:
        raise ValueError(f"--init_model: {error}") from error


def load_init_weights(config: PretrainConfig, text_encoder, unet) -> None:
    """Copy the text encoder and UNet weights of `config.init_model` (fp16 files) into the
    freshly built fp32 modules; a model of another architecture is refused by name."""
    from safetensors.torch import load_file

    folder = init_model_path(config)
    for module, file in ((text_encoder, folder / "text_encoder" / "model.safetensors"),
                         (unet, folder / "unet" / "diffusion_pytorch_model.safetensors")):
        if not file.is_file():
            raise ValueError(f"--init_model '{config.init_model}': no {file.parent.name} "
                             f"weights at '{file}'; pass a world model folder")
        weights = {key: value.float() for key, value in load_file(file).items()}
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError as error:
            first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
            raise ValueError(
                f"--init_model '{config.init_model}': its {file.parent.name} does not fit "
                f"this run's architecture ({first[:200]}); pass the architecture flags of its "
                f"pretrain_config.json") from error


def export_checkpoint(config: PretrainConfig, checkpoint: str = "latest",
                      path: Path | None = None) -> Path:
    """Export the EMA weights of a stage-2 checkpoint ('latest', 'checkpoint-N' or a path) as a
    base model, e.g. to try a run before it ends; `path` defaults to `output_dir/model-step-N`."""
    output_dir = Path(config.output_dir)
    checkpoint_dir = output_dir / "stage2-unet" / "checkpoints"
    try:
        checkpoint_path = checkpointing.resolve_resume_path(checkpoint, checkpoint_dir)
    except FileNotFoundError as error:
        raise ValueError(f"--export_checkpoint {checkpoint!r}: {error}") from error
    if checkpoint_path is None:
        raise ValueError(f"no stage-2 checkpoint in '{checkpoint_dir}' to export")
    _check_resume(config, checkpoint_path)
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    module, tokenizer = _diffusion_module(config, output_dir / "vae")
    module.load_state_dict(state["state_dict"], strict=False)
    ema = EMA(config.ema_decay)
    ema_state = state.get("callbacks", {}).get(ema.state_key)
    if ema_state is not None:
        ema.load_state_dict(ema_state)
        ema.copy_to(module)
    step = state["global_step"]
    log.info("exporting %s (step %d, %s weights)", checkpoint_path, step,
             "EMA" if ema_state is not None else "raw")
    return save_world_model(module, tokenizer, path or output_dir / f"model-step-{step}",
                            config)


def save_world_model(module: DiffusionModule, tokenizer, path: Path,
                     config: PretrainConfig) -> Path:
    """Write the world model as a diffusers pipeline folder at `path` (replacing one there):
    fp16 weights (safetensors), its pretraining config and library versions."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=module.vae, text_encoder=module.text_encoder, tokenizer=tokenizer, unet=module.unet,
        scheduler=noise_schedulers()[1], safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    with atomic_folder(path) as staging:
        pipeline.to(torch.float16)
        pipeline.save_pretrained(staging, safe_serialization=True)
        pipeline.to(torch.float32)
        # transformers 5 loads a model in the dtype its config names ("auto"), while diffusers
        # loads fp32 unless asked: name fp32 so every loader (and DreamBooth's text-encoder
        # training on a CPU) gets the same fp32 model by default; the files stay fp16 to be small.
        text_config = staging / "text_encoder" / "config.json"
        values = json.loads(text_config.read_text())
        values.update({key: "float32" for key in ("dtype", "torch_dtype") if key in values})
        text_config.write_text(json.dumps(values, indent=2) + "\n")
        (staging / "pretrain_config.json").write_text(
            json.dumps(_config_dict(config), indent=2) + "\n")
        vae_report_path = Path(config.output_dir) / "vae" / "report.json"  # stage 1's PSNR
        if vae_report_path.is_file():
            shutil.copyfile(vae_report_path, staging / "vae" / "report.json")
        (staging / VERSIONS_FILE).write_text(json.dumps(library_versions(), indent=2) + "\n")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    log.info("saved the base model in %s (%.1f MB)", path, size)
    return path


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def _log_to_file(path: Path) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve()
               for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
