"""The DreamBooth LightningModule: what is trained, the loss, the optimizer.

Loss (Ruiz et al. 2023, eq. 2), with instance and class samples in one UNet forward:
    L = E w_concept * mean_pixels(m * ||eps - eps_hat(z_t^inst, t, c_inst)||^2)
        + lambda * E ||eps - eps_hat(z_t^cls, t, c_cls)||^2
where the target is the noise eps for epsilon-prediction models and the velocity
v = alpha_t * eps - sigma_t * z_0 for v-prediction models (SD 2.x 768 px); c is each sample's
own caption (or class prompt); m is the sample's mask weight per latent pixel (1 without a
mask, masks.py) and w_concept its concept's `loss_weight` (1 for a single concept).

The flow-matching families (SD 3.x, FLUX.1) train the same sum on the rectified-flow velocity
instead: train/flow_matching.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from dreambooth import cpu, seeding
from dreambooth.config import OptimizationConfig
from dreambooth.models import DiffusionComponents
from dreambooth.train.lora import LoraSettings, add_lora_adapters

log = logging.getLogger(__name__)

PROMPT_CHUNK = 64  # prompts per text-encoder call when the table is computed
OFFSET_NOISE_SCALE = 0.1  # as in diffusers' --offset_noise (Guttenberg, 2023)


def draw_noise_and_timesteps(seeds: torch.Tensor, shape: tuple[int, ...], *,
                             num_train_timesteps: int, offset_noise: bool
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noise (B, C, h, w) and timesteps (B,), each a function of its sample's seed.

    Drawn on the CPU so a sample's noise is the same on any device and with any batching.
    """
    noises, timesteps = [], []
    for seed in seeds.tolist():
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(shape, generator=generator)
        if offset_noise:
            noise = noise + OFFSET_NOISE_SCALE * torch.randn(shape[0], 1, 1, generator=generator)
        noises.append(noise)
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=generator))
    return torch.stack(noises), torch.cat(timesteps)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for
    v-prediction."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def enable_gradient_checkpointing(denoiser, text_encoders) -> None:
    """Gradient checkpointing on the UNet or transformer and on the (trained) text encoders."""
    denoiser.enable_gradient_checkpointing()
    for encoder in text_encoders:
        # transformers 5 renamed it; 4.x only has the old name.
        enable = getattr(encoder, "activation_checkpointing_enable", None)
        (enable or encoder.gradient_checkpointing_enable)()


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or weight; the message names the step."""


class DreamBoothModule(L.LightningModule):
    """Trains the UNet (and optionally the text encoder(s)) of a Stable Diffusion model.

    The VAE is frozen. For SDXL the UNet is also conditioned on the pooled embedding of the
    second text encoder and on each image's size/crop "time ids".
    """

    def __init__(self, components: DiffusionComponents, *, prompts: Sequence[str],
                 prior_loss_weight: float, optim: OptimizationConfig,
                 max_train_steps: int, pre_compute_text_embeddings: bool = False,
                 lora: LoraSettings | None = None):
        super().__init__()
        self.family = components.family
        self.unet = components.unet
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2  # None outside SDXL
        self.vae = components.vae
        self.noise_scheduler = components.noise_scheduler
        # Every caption and class prompt the data holds (before dropout and shuffle): with
        # frozen text encoders their embeddings are computed once, in `on_fit_start`.
        self.prompts = list(dict.fromkeys(prompts))
        self.prior_loss_weight = prior_loss_weight
        self.optim = optim
        self.max_train_steps = max_train_steps
        self.pre_compute_text_embeddings = pre_compute_text_embeddings
        # Checkpoints hold only what training changes; the frozen rest comes from the base model.
        self.strict_loading = False

        # Train and run in fp32 whatever dtype the folder stores (transformers 5 loads a fp16
        # text encoder as fp16, diffusers the UNet as fp32): mixed precision on CUDA halves the
        # frozen modules in `on_fit_start`; a trained fp16 weight would lose its updates.
        for model in (self.unet, self.vae, *self.text_encoders):
            if model.dtype != torch.float32:  # (diffusers warns on every cast, needed or not)
                model.to(dtype=torch.float32)
        self.vae.requires_grad_(False).eval()
        if lora is not None:
            add_lora_adapters(self.unet, self.text_encoders, lora,
                              train_text_encoder=optim.train_text_encoder)
        else:
            for encoder in self.text_encoders:
                encoder.requires_grad_(optim.train_text_encoder)
            self.unet.requires_grad_(True)
        if optim.gradient_checkpointing:
            enable_gradient_checkpointing(self.unet, self.text_encoders if
                                          optim.train_text_encoder else [])
        self.tokenizers = [components.tokenizer, components.tokenizer_2][:len(self.text_encoders)]
        # prompt -> row of `prompt_embeds`: (N, 77, D) and, for SDXL, (N, P) pooled; filled
        # once in `on_fit_start` when the encoders are frozen.
        self.prompt_rows: dict[str, int] = {}
        self.prompt_embeds: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network the loss trains: here the UNet."""
        return self.unet

    # ----------------------------------------------------------------------- setup
    def on_fit_start(self) -> None:
        mixed = self.trainer.precision in ("16-mixed", "bf16-mixed")
        if mixed and self.device.type == "cuda":
            # Frozen modules only run forward: keep them in half precision to save memory
            # (not a VAE that overflows in fp16, such as SDXL's: `force_upcast`).
            half = torch.float16 if self.trainer.precision == "16-mixed" else torch.bfloat16
            if not (half == torch.float16 and self.vae.config.get("force_upcast", False)):
                self.vae.to(dtype=half)
            if not self.optim.train_text_encoder:
                for encoder in self.text_encoders:
                    encoder.to(dtype=half)
        if not self.optim.train_text_encoder:
            embeds, pooled = [], []
            with torch.no_grad():  # in fixed chunks: the same floats on every run and resume
                for start in range(0, len(self.prompts), PROMPT_CHUNK):
                    chunk = self.encode_prompts(self.prompts[start:start + PROMPT_CHUNK])
                    embeds.append(chunk[0].float())
                    pooled.append(None if chunk[1] is None else chunk[1].float())
            self.prompt_rows = {prompt: row for row, prompt in enumerate(self.prompts)}
            self.prompt_embeds = (torch.cat(embeds),
                                  None if pooled[0] is None else torch.cat(pooled))
            if self.pre_compute_text_embeddings:
                for encoder in self.text_encoders:
                    encoder.to("cpu")
                log.info("text embeddings precomputed; text encoders moved off %s", self.device)

    # ------------------------------------------------------------------------ loss
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings of `prompts`, one text-encoder call: (N, 77, D) and SDXL's pooled (N, P).

        SD 1.x/2.x: the text encoder's last hidden state. SDXL: both encoders' penultimate
        hidden states, concatenated on the feature axis, and the second one's projection.
        Prompts longer than the tokenizer's limit are cut there (captions.warn_truncated).
        """
        ids = [tokenizer(list(prompts), padding="max_length", truncation=True,
                         max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
               for tokenizer in self.tokenizers]  # (N, 77) each
        if self.family != "sdxl":
            embeds = self.text_encoder(ids[0].to(self.text_encoder.device))[0]
            return embeds.to(self.device), None
        first = self.text_encoder(ids[0].to(self.text_encoder.device), output_hidden_states=True)
        second = self.text_encoder_2(ids[1].to(self.text_encoder_2.device),
                                     output_hidden_states=True)
        embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return embeds.to(self.device), second.text_embeds.to(self.device)

    def prompt_embeddings(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 77, D) and SDXL's pooled (B, P) for a batch's prompts.

        Trained encoders: one call on the batch's distinct prompts. Frozen ones: rows of the
        table computed at the start; prompts it lacks (shuffled tags) in one call, not kept, so
        a step's floats never depend on the steps before it (exact resume).
        """
        distinct = list(dict.fromkeys(prompts))
        if self.prompt_embeds is None:
            embeds, pooled = self.encode_prompts(distinct)
            rows = torch.tensor([distinct.index(p) for p in prompts], device=embeds.device)
            return embeds[rows], None if pooled is None else pooled[rows]
        table, table_pooled = self.prompt_embeds
        missing = [p for p in distinct if p not in self.prompt_rows]
        rows_of = dict(self.prompt_rows)
        if missing:
            with torch.no_grad():
                extra, extra_pooled = self.encode_prompts(missing)
            table = torch.cat([table, extra.float()])
            if table_pooled is not None:
                table_pooled = torch.cat([table_pooled, extra_pooled.float()])
            rows_of.update({p: len(self.prompts) + i for i, p in enumerate(missing)})
        rows = torch.tensor([rows_of[p] for p in prompts], device=table.device)
        return table[rows], None if table_pooled is None else table_pooled[rows]

    def unet_conditioning(self, prompts: Sequence[str], time_ids: torch.Tensor) -> dict:
        """Keyword arguments of the UNet call for a batch: each sample's own prompt."""
        embeds, pooled = self.prompt_embeddings(prompts)
        conditioning = {"encoder_hidden_states": embeds}  # (B, 77, D)
        if self.family == "sdxl":
            conditioning["added_cond_kwargs"] = {"text_embeds": pooled,  # (B, P)
                                                 "time_ids": time_ids.to(embeds.dtype)}  # (B, 6)
        return conditioning

    def diffusion_target(self, latents: torch.Tensor, noise: torch.Tensor,
                         timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet regresses: the noise eps, or v = alpha_t * eps - sigma_t * z_0."""
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # The backend of this step's convolutions, forward and backward (Lightning runs both
        # between this hook and the next).
        latents = batch["latents"]
        self._mkldnn_was = torch.backends.mkldnn.enabled
        if cpu.use_native_conv(latents.shape[0] * latents.shape[2] * latents.shape[3],
                               latents.device, self.denoiser.dtype):
            torch.backends.mkldnn.enabled = False

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        torch.backends.mkldnn.enabled = self._mkldnn_was

    def teardown(self, stage: str) -> None:  # also after a failed step
        torch.backends.mkldnn.enabled = getattr(self, "_mkldnn_was", torch.backends.mkldnn.enabled)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        latents = batch["latents"]  # (B, 4, H/8, W/8), instance samples then class samples
        noise, timesteps = draw_noise_and_timesteps(
            batch["seeds"].cpu(), tuple(latents.shape[1:]),
            num_train_timesteps=self.noise_scheduler.config.num_train_timesteps,
            offset_noise=self.optim.offset_noise)
        noise, timesteps = noise.to(latents), timesteps.to(latents.device)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)  # z_t
        model_pred = self.unet(noisy_latents, timesteps,
                               **self.unet_conditioning(batch["prompts"], batch["time_ids"])).sample
        target = self.diffusion_target(latents, noise, timesteps)
        per_pixel = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        per_pixel = per_pixel * batch["weights"].float()  # masks: (B, 1, h, w), 1 without one
        per_sample = per_pixel.mean(dim=(1, 2, 3))  # (B,)
        if self.optim.snr_gamma is not None:
            per_sample = per_sample * min_snr_weights(self.noise_scheduler, timesteps,
                                                      self.optim.snr_gamma)
        return self.dreambooth_loss(per_sample, batch)

    def dreambooth_loss(self, per_sample: torch.Tensor, batch: dict[str, torch.Tensor]
                        ) -> torch.Tensor:
        """Eq. 2 from per-sample losses (B + P,): the instance mean plus lambda times the prior
        mean, each sample weighted by its concept's loss_weight; logged, checked finite."""
        is_prior = batch["is_prior"]
        per_sample = per_sample * batch["loss_weights"].float()  # concepts' loss_weight
        instance_loss = per_sample[~is_prior].mean()
        loss = instance_loss
        self.log("instance_loss", instance_loss.detach(), on_step=True)
        if is_prior.any():
            prior_loss = per_sample[is_prior].mean()
            loss = instance_loss + self.prior_loss_weight * prior_loss
            self.log("prior_loss", prior_loss.detach(), on_step=True)
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"training stopped at step {self.global_step}: the loss is {loss.item()} (instance "
                f"loss {instance_loss.item()}); nothing was saved. Lower learning_rate, or use "
                "mixed_precision bf16 instead of fp16")
        self.log("loss", loss.detach(), on_step=True, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, prog_bar=True)
        return loss

    # ------------------------------------------------------------------- optimizer
    def learning_rates(self) -> tuple[float, float]:
        """(UNet lr, text encoder lr), scaled by the global batch with `scale_lr`."""
        unet_lr = self.optim.learning_rate
        text_lr = self.optim.text_encoder_lr or unet_lr
        if self.optim.scale_lr:
            scale = (self.optim.gradient_accumulation_steps * self.optim.train_batch_size
                     * self.trainer.world_size)
            unet_lr, text_lr = unet_lr * scale, text_lr * scale
        return unet_lr, text_lr

    def configure_optimizers(self) -> dict[str, Any]:
        from diffusers.optimization import get_scheduler

        unet_lr, text_lr = self.learning_rates()
        decay = self.optim.adam_weight_decay
        text_decay = self.optim.adam_weight_decay_text_encoder
        groups = [{"params": [p for p in self.denoiser.parameters() if p.requires_grad],
                   "lr": unet_lr, "weight_decay": decay}]
        if self.optim.train_text_encoder:
            groups.append({"params": [p for encoder in self.text_encoders
                                      for p in encoder.parameters() if p.requires_grad],
                           "lr": text_lr,
                           "weight_decay": decay if text_decay is None else text_decay})
        cls = optimizer_class(self.optim)
        options = {}
        # One kernel over all tensors instead of ~10 small ops per tensor: on the CPU this cut
        # AdamW from 27 to 8 ms a step for a 7M-parameter UNet + text encoder. Not under fp16's
        # gradient scaler: a fused AdamW unscales inside its step, after gradient clipping.
        if (cls is torch.optim.AdamW and self.trainer.precision != "16-mixed"
                and can_fuse(p for group in groups for p in group["params"])):
            options["fused"] = True
        if self.optim.optimizer == "prodigy":
            options.update(beta3=self.optim.prodigy_beta3, decouple=self.optim.prodigy_decouple,
                           use_bias_correction=self.optim.prodigy_use_bias_correction,
                           safeguard_warmup=self.optim.prodigy_safeguard_warmup)
        optimizer = cls(groups, betas=(self.optim.adam_beta1, self.optim.adam_beta2),
                        weight_decay=decay, eps=self.optim.adam_epsilon, **options)
        scheduler = get_scheduler(self.optim.lr_scheduler, optimizer,
                                  num_warmup_steps=self.optim.lr_warmup_steps,
                                  num_training_steps=self.max_train_steps,
                                  num_cycles=self.optim.lr_num_cycles, power=self.optim.lr_power)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision

        plain = type(self.trainer.precision_plugin) in (Precision, MixedPrecision)
        if not gradient_clip_val or gradient_clip_algorithm != "norm" or not plain:
            super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                gradient_clip_algorithm)
            return
        # Lightning's own call lets torch pick a per-tensor loop on the CPU; the foreach
        # kernels take the norms and the scaling in one pass each (same result).
        parameters = [p for group in optimizer.param_groups for p in group["params"]
                      if p.grad is not None]
        if getattr(self, "_clip_foreach", None) is None:  # once: the parameters do not move
            self._clip_foreach = can_fuse(parameters)
        torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val,
                                       foreach=self._clip_foreach)

    def check_finite_weights(self) -> None:
        """Raise NonFiniteError if a trained weight is NaN or infinite (never export those)."""
        for name, parameter in self.named_parameters():
            if parameter.requires_grad and not torch.isfinite(parameter).all():
                raise NonFiniteError(
                    f"training stopped after step {self.global_step}: weight '{name}' holds NaN "
                    "or infinite values; nothing was saved. Lower learning_rate, or use "
                    "mixed_precision bf16 instead of fp16")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite_weights()  # a checkpoint of NaN weights would resume into NaN
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items()
                                    if key in trainable}
        checkpoint["rng_states"] = seeding.capture_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            seeding.restore_rng_state(checkpoint["rng_states"])


def can_fuse(parameters) -> bool:
    """Whether torch's fused/foreach kernels take these tensors: all floating point, all on
    one CPU or CUDA device."""
    devices = set()
    for parameter in parameters:
        if not parameter.is_floating_point() or parameter.device.type not in ("cpu", "cuda"):
            return False
        devices.add(parameter.device)
    return len(devices) == 1


def optimizer_class(optim: OptimizationConfig):
    """torch's AdamW, bitsandbytes' 8-bit AdamW or Prodigy, with a clear error where the
    chosen one cannot run."""
    if optim.optimizer == "prodigy":
        if optim.use_8bit_adam:
            raise ValueError("use_8bit_adam applies to optimizer=adamw, not prodigy")
        try:
            from prodigyopt import Prodigy
        except ImportError as error:
            raise ImportError("optimizer=prodigy needs the prodigyopt package: "
                              "pip install 'dreambooth[prodigy]' (or --optimizer adamw)"
                              ) from error
        return Prodigy
    if not optim.use_8bit_adam:
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ImportError(
            "use_8bit_adam needs bitsandbytes: pip install 'dreambooth[bnb]' "
            f"(import failed: {error})") from error
    if not torch.cuda.is_available():
        raise RuntimeError("use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit AdamW has no CPU "
                           "kernels here); drop --use_8bit_adam to train on this machine")
    return bnb.optim.AdamW8bit
