"""The DreamBooth LightningModule of the flow-matching families (SD 3.x, FLUX.1).

Loss (Ruiz et al. 2023, eq. 2, on the rectified-flow objective of flow/objective.py), with
instance and class samples in one transformer forward:
    L = E w_concept * w(sigma) * mean_pixels(m * (v_hat(x_t^inst, sigma, c_inst) - v)^2)
        + lambda * E w(sigma) * mean_pixels((v_hat(x_t^cls, sigma, c_cls) - v)^2)
    x_t = (1 - sigma) x_0 + sigma eps,  v = eps - x_0
(with `precondition_outputs`: x_t - sigma v_hat compared to x_0 instead). eps and sigma are a
function of each sample's seed (`draw_noise_and_sigmas`), so a resumed run repeats the floats
of an uninterrupted one. w(sigma) is each sample's own weight (diffusers' scripts broadcast the
whole batch's weights over each half of it when prior preservation is on).

The text conditioning is the family's (flow/sd3.py, flow/flux.py). T5 is never trained: its
embeddings of every prompt the run can see are computed once at the start, after which T5 is
dropped (unless captions are shuffled, which makes prompts no table holds). Frozen CLIP
encoders are tabled the same way; trained ones (`train_text_encoder`) run on every batch.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence

import lightning as L
import torch

from dreambooth.config import OptimizationConfig
from dreambooth.flow import encode_t5, family_module
from dreambooth.flow.objective import (
    FlowSettings,
    draw_noise_and_sigmas,
    loss_weights,
    noisy_latents,
    prediction_and_target,
    training_sigmas,
)
from dreambooth.models import DiffusionComponents
from dreambooth.train.lora import LoraSettings, add_lora_adapters
from dreambooth.train.module import PROMPT_CHUNK, DreamBoothModule, enable_gradient_checkpointing
from dreambooth.train.quantize import is_quantized, quantize_base

log = logging.getLogger(__name__)


class FlowMatchingModule(DreamBoothModule):
    """Trains the transformer (and optionally the CLIP text encoders) of an SD 3.x or FLUX.1
    model; the VAE and T5 are frozen. Optimizer, gradient clipping and checkpoint hooks are
    DreamBoothModule's."""

    def __init__(self, components: DiffusionComponents, *, prompts: Sequence[str],
                 prior_loss_weight: float, optim: OptimizationConfig, max_train_steps: int,
                 flow: FlowSettings, pre_compute_text_embeddings: bool = False,
                 lora: LoraSettings | None = None, closed_prompts: bool = True,
                 quantize: str | None = None, base_dtype: torch.dtype = torch.float32):
        L.LightningModule.__init__(self)
        self.family = components.family
        self.spec = family_module(components.family)
        self.flow = flow
        self.transformer = components.transformer
        self.vae = components.vae
        self.noise_scheduler = components.noise_scheduler
        self.sigma_table = training_sigmas(components.noise_scheduler)  # (1000,)
        self.prompts = list(dict.fromkeys(prompts))
        self.prior_loss_weight = prior_loss_weight
        self.optim = optim
        self.max_train_steps = max_train_steps
        self.pre_compute_text_embeddings = pre_compute_text_embeddings
        self.closed_prompts = closed_prompts
        self.strict_loading = False
        # CLIP encoders are submodules (trainable); T5 is kept out of the module tree so that
        # Lightning never moves its billions of frozen weights to the device by itself.
        self.clip_tokenizers = [getattr(components, t) for t, _ in self.spec.CLIP_ENCODERS]
        self.clip_names = [e for _, e in self.spec.CLIP_ENCODERS]
        for name in self.clip_names:
            setattr(self, name, getattr(components, name))
        self._t5 = [getattr(components, self.spec.T5[0]), getattr(components, self.spec.T5[1])]
        self._components = components

        # fp32 master weights for what is trained; a quantized base goes straight to its dtype.
        for model in (self.vae, *self.text_encoders,
                      *([self.transformer] if quantize is None else [])):
            if model.dtype != torch.float32:
                model.to(dtype=torch.float32)
        self.vae.requires_grad_(False).eval()
        self._t5[1].requires_grad_(False).eval()
        if quantize is not None:
            if lora is None:
                raise ValueError("quantize_base needs use_lora: a quantized base cannot be "
                                 "fine-tuned in full; add --use_lora")
            count = quantize_base(self.transformer, quantize, base_dtype)
            log.info("base transformer quantized to %s (%d Linear layers)", quantize, count)
        if lora is not None:
            add_lora_adapters(self.transformer, self.text_encoders, lora,
                              train_text_encoder=optim.train_text_encoder)
            for parameter in self.parameters():  # adapters on a bf16 base start in bf16
                if parameter.requires_grad and parameter.dtype != torch.float32:
                    parameter.data = parameter.data.float()
        else:
            for encoder in self.text_encoders:
                encoder.requires_grad_(optim.train_text_encoder)
            self.transformer.requires_grad_(True)
        if base_dtype != torch.float32:
            # Frozen weights only run forward: in the autocast dtype from the start (as
            # diffusers' scripts), so neither host nor device ever holds them in fp32.
            for model in (self.transformer, *self.text_encoders):
                for parameter in model.parameters():
                    if not parameter.requires_grad and not is_quantized(parameter):
                        parameter.data = parameter.data.to(base_dtype)
        if optim.gradient_checkpointing:
            enable_gradient_checkpointing(self.transformer, self.text_encoders if
                                          optim.train_text_encoder else [])
        # prompt -> row of the tables filled in `on_fit_start`: T5 tokens (N, L, D) always;
        # CLIP tokens (N, 77, D') (SD3 only) and pooled (N, P) while CLIP is frozen.
        self.prompt_rows: dict[str, int] = {}
        self.t5_table: torch.Tensor | None = None
        self.clip_table: tuple[torch.Tensor | None, torch.Tensor] | None = None

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The CLIP encoders (T5 is not one of the module's parts)."""
        return [getattr(self, name) for name in self.clip_names]

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    # ----------------------------------------------------------------------- setup
    def on_fit_start(self) -> None:
        mixed = self.trainer.precision in ("16-mixed", "bf16-mixed")
        half = torch.float16 if self.trainer.precision == "16-mixed" else torch.bfloat16
        if mixed and self.device.type == "cuda":
            # Frozen weights only run forward: half precision (as diffusers' scripts); the
            # trained ones (and LoRA layers) stay fp32 master weights.
            if not (half == torch.float16 and self.vae.config.get("force_upcast", False)):
                self.vae.to(dtype=half)
            for model in (self.transformer, *self.text_encoders):
                for parameter in model.parameters():
                    if not parameter.requires_grad and not is_quantized(parameter):
                        parameter.data = parameter.data.to(half)
        self.table_prompts(half if mixed and self.device.type == "cuda" else None)

    def table_prompts(self, dtype: torch.dtype | None = None) -> None:
        """Encode every prompt of the run once: T5 (in `dtype`, if given) and frozen CLIPs;
        then release T5 when no other prompt can come (else keep it, on the CPU with
        pre_compute_text_embeddings)."""
        t5 = self._t5[1]
        if t5 is not None:
            t5.to(self.device, dtype=dtype or t5.dtype)
        with torch.no_grad():  # in fixed chunks: the same floats on every run and resume
            chunks = [self.prompts[i:i + PROMPT_CHUNK]
                      for i in range(0, len(self.prompts), PROMPT_CHUNK)]
            self.t5_table = torch.cat([self._encode_t5(chunk).float() for chunk in chunks])
            if not self.optim.train_text_encoder:
                parts = [self._encode_clip(chunk) for chunk in chunks]
                tokens = None if parts[0][0] is None else torch.cat(
                    [p[0].float() for p in parts])
                self.clip_table = (tokens, torch.cat([p[1].float() for p in parts]))
        self.prompt_rows = {prompt: row for row, prompt in enumerate(self.prompts)}
        if self.closed_prompts:
            self.release_t5()
        elif self.pre_compute_text_embeddings:
            t5.to("cpu")
        if self.clip_table is not None and self.pre_compute_text_embeddings:
            for encoder in self.text_encoders:
                encoder.to("cpu")

    def release_t5(self) -> None:
        """Drop T5 (every prompt's embedding is in the table): its memory is freed."""
        if self._t5[1] is None:
            return
        self._t5[1] = None
        setattr(self._components, self.spec.T5[1], None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("T5 embeddings of %d prompt(s) computed; T5 released", len(self.prompts))

    # -------------------------------------------------------------------- text
    def _encode_t5(self, prompts: Sequence[str]) -> torch.Tensor:
        tokenizer, encoder = self._t5
        if encoder is None:
            raise RuntimeError(f"no T5 embedding of {list(prompts)!r}: T5 was released")
        return encode_t5(tokenizer, encoder, list(prompts),
                         self.flow.max_sequence_length).to(self.device)

    def _encode_clip(self, prompts: Sequence[str]):
        tokens, pooled = self.spec.encode_clip(self.clip_tokenizers, self.text_encoders,
                                               list(prompts))
        return (None if tokens is None else tokens.to(self.device)), pooled.to(self.device)

    def text_conditioning(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, D) text tokens and (B, P) pooled embeddings for a batch's prompts: rows of the
        tables, prompts they lack encoded in one call (not kept: a step's floats never
        depend on the steps before it), trained CLIP encoders run on the distinct prompts."""
        distinct = list(dict.fromkeys(prompts))
        missing = [p for p in distinct if p not in self.prompt_rows]
        rows_of = dict(self.prompt_rows)
        rows_of.update({p: len(self.prompt_rows) + i for i, p in enumerate(missing)})
        t5_table = self.t5_table
        if missing:
            with torch.no_grad():
                t5_table = torch.cat([t5_table, self._encode_t5(missing).float()])
        rows = torch.tensor([rows_of[p] for p in prompts], device=t5_table.device)
        t5_tokens = t5_table[rows]
        if self.clip_table is None:  # trained (or not yet tabled) CLIP: on distinct prompts
            tokens, pooled = self._encode_clip(distinct)
            index = torch.tensor([distinct.index(p) for p in prompts], device=pooled.device)
            tokens = None if tokens is None else tokens[index]
            pooled = pooled[index]
        else:
            tokens, pooled = self.clip_table
            if missing:
                with torch.no_grad():
                    extra_tokens, extra_pooled = self._encode_clip(missing)
                pooled = torch.cat([pooled, extra_pooled.float()])
                if tokens is not None:
                    tokens = torch.cat([tokens, extra_tokens.float()])
            clip_rows = rows.to(pooled.device)
            tokens = None if tokens is None else tokens[clip_rows]
            pooled = pooled[clip_rows]
        return self.spec.join(tokens, t5_tokens), pooled

    # ------------------------------------------------------------------------ loss
    def velocity(self, noisy: torch.Tensor, sigmas: torch.Tensor,
                 prompts: Sequence[str]) -> torch.Tensor:
        """v_hat(x_t, sigma, c): the transformer's prediction (B, C, h, w)."""
        text_tokens, pooled = self.text_conditioning(prompts)
        return self.spec.predict(self.transformer, noisy, sigmas, text_tokens, pooled,
                                 self.flow.guidance_scale)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        latents = batch["latents"]  # (B, 16, h, w): instance samples, then class samples
        noise, sigmas = draw_noise_and_sigmas(batch["seeds"].cpu(), tuple(latents.shape[1:]),
                                              self.sigma_table, self.flow)
        noise, sigmas = noise.to(latents), sigmas.to(latents.device)
        noisy = noisy_latents(latents, noise, sigmas)  # x_t
        model_output = self.velocity(noisy, sigmas, batch["prompts"])
        prediction, target = prediction_and_target(
            model_output, latents, noise, noisy, sigmas,
            precondition_outputs=self.flow.precondition_outputs)
        per_pixel = (prediction.float() - target.float()) ** 2
        per_pixel = per_pixel * batch["weights"].float()  # masks: (B, 1, h, w), 1 without one
        per_sample = per_pixel.mean(dim=(1, 2, 3)) * loss_weights(  # (B,)
            self.flow.weighting_scheme, sigmas)
        return self.dreambooth_loss(per_sample, batch)
