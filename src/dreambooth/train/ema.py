"""An exponential moving average (EMA) of the trained weights, kept by a Lightning callback.

After every optimizer step t = 1, 2, ... (not every micro-batch under gradient accumulation):
    theta_ema <- d_t * theta_ema + (1 - d_t) * theta_t
over exactly the trained parameters: the UNet (with `use_lora`, its LoRA layers only) and the
text encoder(s) when trained. The decay follows diffusers' `EMAModel.get_decay`:
    d_t = min(ema_decay, (1 + s) / (10 + s)),  s = t - 1  (d_1 = 0)       with ema_warmup
    d_t = ema_decay                                                      without
so with the warmup the average starts at the weights after step 1 instead of the base model's.

Why ema_decay = 0.999 and the warmup by default: a DreamBooth run is short (a few hundred to a
few thousand steps). The warmup's d_t gives step s of a T-step run a weight that grows like
s^8, so the average sits on about the last tenth of the run, whatever its length, until
d_t reaches ema_decay (after ~9,000 steps at 0.999; diffusers' 0.9999 is tuned for runs of
10^5+ steps). Without the warmup a constant 0.999 keeps 0.999^800 = 45% of the base model after
800 steps: lower ema_decay (e.g. 0.99) then.

We keep our own small class rather than diffusers' `EMAModel`: it holds its tensors by
parameter name (a checkpoint says which weight each one is, and a resume checks they match),
and with `ema_on_cpu` the average stays in CPU memory and the device weights are copied to it
for the update (EMAModel updates in place on its tensors' device, so offloading it means
moving the whole average to the accelerator every step).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from dreambooth.train.module import NonFiniteError, can_fuse

log = logging.getLogger(__name__)


def ema_decay_at(update: int, *, decay: float, warmup: bool) -> float:
    """d_t of the `update`-th update (t >= 1): see the module docstring."""
    if not warmup:
        return decay
    step = update - 1
    if step <= 0:
        return 0.0
    return min(decay, (1 + step) / (10 + step))


class ExponentialMovingAverage:
    """Shadow copies of named tensors: `update` after each optimizer step, `swap` to sample
    with them, `copy_to` to export them; `state_dict` round-trips them bit for bit."""

    def __init__(self, parameters: Mapping[str, torch.Tensor], *, decay: float, warmup: bool,
                 device: torch.device | str | None = None):
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay={decay} must be between 0 and 1 (exclusive)")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow = {name: p.detach().to(device=device or p.device, copy=True)
                       for name, p in parameters.items()}

    @torch.no_grad()
    def update(self, parameters: Mapping[str, torch.Tensor]) -> float:
        """One EMA step toward `parameters`; returns the decay d_t it used."""
        self.num_updates += 1
        decay = ema_decay_at(self.num_updates, decay=self.decay, warmup=self.warmup)
        shadows = list(self.shadow.values())
        # Weights on the accelerator are copied to the average's device (CPU with ema_on_cpu).
        current = [parameters[name].detach().to(shadow.device)
                   for name, shadow in self.shadow.items()]
        # lerp: theta_ema + (1 - d) * (theta - theta_ema) = d * theta_ema + (1 - d) * theta
        if can_fuse(shadows):  # one kernel over all tensors
            torch._foreach_lerp_(shadows, current, 1.0 - decay)
        else:
            for shadow, value in zip(shadows, current):
                shadow.lerp_(value, 1.0 - decay)
        return decay

    @torch.no_grad()
    def swap(self, parameters: Mapping[str, torch.Tensor]) -> None:
        """Exchange the averaged and the live values, tensor by tensor (twice: as before)."""
        for name, shadow in self.shadow.items():
            parameter = parameters[name]
            live = parameter.detach().clone()
            parameter.copy_(shadow)
            shadow.copy_(live)

    @torch.no_grad()
    def copy_to(self, parameters: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the live values with the averaged ones."""
        for name, shadow in self.shadow.items():
            parameters[name].copy_(shadow)

    def non_finite(self) -> list[str]:
        """Names of averaged tensors that hold NaN or infinite values."""
        return [name for name, shadow in self.shadow.items() if not torch.isfinite(shadow).all()]

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup,
                "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["shadow"]
        if saved.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - saved.keys())[:3]
            extra = sorted(saved.keys() - self.shadow.keys())[:3]
            raise ValueError("the checkpoint's EMA weights are not those of the trained "
                             f"parameters (missing: {missing}, unexpected: {extra})")
        for name, shadow in self.shadow.items():
            shadow.copy_(saved[name])  # onto this average's device, bit for bit
        self.num_updates = int(state["num_updates"])


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of what the optimizer trains (requires_grad), in module order."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


class EMAWeights(Callback):
    """Keeps an ExponentialMovingAverage of the module's trained parameters during `fit`.

    Its state (the average and its update count) is part of every checkpoint, so a resumed
    run continues the same average. Every DDP rank holds the same average: the weights it
    follows are the same on every rank after each step.
    """

    def __init__(self, *, decay: float, warmup: bool, on_cpu: bool):
        self.decay, self.warmup, self.on_cpu = decay, warmup, on_cpu
        self.ema: ExponentialMovingAverage | None = None
        self.parameters: dict[str, torch.nn.Parameter] = {}
        self._loaded: Mapping[str, Any] | None = None  # restored before the average exists

    def on_fit_start(self, trainer, pl_module) -> None:
        # Here the module is on its device; the checkpoint (if any) was read before (DDP) or
        # is read after (strategies that restore after setup): load_state_dict handles both.
        self.parameters = trainable_parameters(pl_module)
        self.ema = ExponentialMovingAverage(self.parameters, decay=self.decay,
                                            warmup=self.warmup,
                                            device="cpu" if self.on_cpu else None)
        if self._loaded is not None:
            self.ema.load_state_dict(self._loaded)
            self._loaded = None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 and self.ema.num_updates == 0:
            log.warning("the checkpoint resumed holds no EMA weights: the average starts from "
                        "its weights at step %d", trainer.global_step)
            self.ema.num_updates = trainer.global_step
        # An interrupt between an optimizer step and its EMA update leaves a checkpoint one
        # update behind: its weights are the step's, so the update is made now, as it would
        # have been.
        self._catch_up(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._catch_up(trainer)

    def _catch_up(self, trainer) -> None:
        # global_step counts optimizer steps: it moves once per accumulation window.
        if trainer.global_step > self.ema.num_updates:
            self.ema.update(self.parameters)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """The module holds the EMA weights inside the block, its own ones again after it
        (bit for bit, also when the block raises)."""
        if self.ema is None:
            yield
            return
        self.ema.swap(self.parameters)
        try:
            yield
        finally:
            self.ema.swap(self.parameters)

    def copy_to_module(self) -> None:
        """Put the EMA weights into the module for good (the export at the end of a run)."""
        self.ema.copy_to(self.parameters)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        bad = self.ema.non_finite() if self.ema is not None else []
        if bad:  # never write an average that would resume into NaN
            raise NonFiniteError(
                f"training stopped after step {trainer.global_step}: the EMA of weight "
                f"'{bad[0]}' holds NaN or infinite values; nothing was saved. Lower "
                "learning_rate, or use mixed_precision bf16 instead of fp16")

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.ema is None:
            self._loaded = state_dict
        else:
            self.ema.load_state_dict(state_dict)


@contextlib.contextmanager
def ema_weights(trainer) -> Iterator[None]:
    """The run's EMA weights in the module inside the block, when it keeps an EMA (see
    EMAWeights.averaged); the trained weights otherwise."""
    keeper = next((c for c in trainer.callbacks if isinstance(c, EMAWeights)), None)
    with keeper.averaged() if keeper is not None else contextlib.nullcontext():
        yield
