"""Side jobs of the world-model pretraining run (`dreambooth.world.pretrain`): an EMA of the
weights, progress lines for a run in the background, and samples of held-out prompts scored by
the world evaluator."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from dreambooth import seeding
from dreambooth.models import WORLD_MODEL_GUIDANCE_SCALE
from dreambooth.world import held_out_captions

log = logging.getLogger(__name__)


class EMA(L.Callback):
    """Exponential moving average of the trainable weights (Polyak averaging), with the usual
    warmup min(decay, (1 + step) / (10 + step)); its state travels in checkpoints."""

    def __init__(self, decay: float):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] | None = None

    def _trainable(self, pl_module) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.shadow is None:
            self.shadow = {name: p.detach().clone()
                           for name, p in self._trainable(pl_module).items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, parameter in self._trainable(pl_module).items():
            self.shadow[name].lerp_(parameter.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, pl_module) -> None:
        for name, parameter in self._trainable(pl_module).items():
            parameter.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = state_dict["shadow"]


class ProgressLog(L.Callback):
    """One log line every N steps: stage, step, losses, speed and time left."""

    def __init__(self, stage: str, every: int, total_steps: int):
        self.stage, self.every, self.total_steps = stage, every, total_steps
        self._started: tuple[float, int] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._started is None:
            self._started = (time.perf_counter(), step - 1)
        if step % self.every and step != self.total_steps:
            return
        elapsed = time.perf_counter() - self._started[0]
        rate = (step - self._started[1]) / max(elapsed, 1e-9)
        metrics = " ".join(f"{k} {v.item():.4g}" for k, v in trainer.callback_metrics.items())
        log.info("%s step %d/%d  %s  %.2f steps/s  ~%.0f min left", self.stage, step,
                 self.total_steps, metrics, rate, (self.total_steps - step) / rate / 60)


class HeldOutSamples(L.Callback):
    """Every N steps: sample held-out caption combinations with the EMA weights, save a grid
    (`output_dir/samples/step-N.png`) and log the world evaluator's prompt fidelity on them."""

    def __init__(self, *, every: int, ema: EMA, tokenizer, scheduler, output_dir: Path,
                 seed: int):
        self.every, self.ema, self.tokenizer, self.scheduler = every, ema, tokenizer, scheduler
        self.output_dir, self.seed = output_dir, seed
        self.prompts = held_out_captions()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every and step % self.every == 0:
            fidelity = sample_and_score(pl_module, self.ema, self.tokenizer, self.scheduler,
                                        self.prompts, self.output_dir / f"step-{step}.png",
                                        self.seed)
            log.info("step %d: prompt fidelity on %d held-out prompts %.3f", step,
                     len(self.prompts), fidelity)


@torch.no_grad()
def sample_and_score(module: L.LightningModule, ema: EMA | None, tokenizer, scheduler,
                     prompts: list[str], grid_path: Path, seed: int,
                     num_inference_steps: int = 25,
                     guidance_scale: float = WORLD_MODEL_GUIDANCE_SCALE) -> float:
    """Generate one image per prompt (EMA weights if given), save a grid, return prompt
    fidelity as judged by the shipped world evaluator (nan if it is not there)."""
    from diffusers import StableDiffusionPipeline

    from dreambooth.images import make_grid, save_png
    from dreambooth.world.evaluator import load_evaluator
    from dreambooth.world.metrics import prompt_fidelity

    trainable = {name: p.detach().clone() for name, p in module.named_parameters()
                 if p.requires_grad}
    if ema is not None:
        ema.copy_to(module)
    was_training = module.training
    module.eval()
    try:
        pipeline = StableDiffusionPipeline(
            vae=module.vae, text_encoder=module.text_encoder, tokenizer=tokenizer,
            unet=module.unet, scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        generators = [seeding.generator(seed, seeding.HELD_OUT_SAMPLES, index)
                      for index in range(len(prompts))]
        images = pipeline(prompts, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, generator=generators, height=64,
                          width=64).images
    finally:
        for name, parameter in module.named_parameters():
            if name in trainable:
                parameter.copy_(trainable[name])
        module.train(was_training)
    save_png(make_grid(images, columns=8), grid_path, text={"prompts": "; ".join(prompts)})
    try:
        return prompt_fidelity(images, prompts, load_evaluator())
    except FileNotFoundError:
        return float("nan")
