"""The rectified-flow objective SD 3.x and FLUX.1 are trained with (Esser et al. 2024, sec. 2-3).

With x_0 the clean latents, eps ~ N(0, I) and sigma in (0, 1]:

    x_t = (1 - sigma) x_0 + sigma eps                 (straight path from data to noise)
    v   = eps - x_0                                   (its velocity, what the model predicts)
    L   = w(sigma) * mean_pixels (v_hat(x_t, sigma, c) - v)^2

`precondition_outputs` (diffusers' SD3 script) turns the prediction into a clean-latent estimate
and regresses that instead: x0_hat = x_t - sigma v_hat, L = w(sigma) mean (x0_hat - x_0)^2.

sigma is the training scheduler's sigmas[i] at index i = floor(u N) (N = 1000; SD3's schedule
is shifted, sigma' = 3 s / (1 + 2 s); FLUX.1's with dynamic shifting is not, as in diffusers'
scripts), u drawn from a density (`compute_density_for_timestep_sampling`): logit-normal
sigmoid(n), n ~ N(logit_mean, logit_std^2); `mode` 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u);
else uniform. w(sigma) (`compute_loss_weighting_for_sd3`): `sigma_sqrt` sigma^-2, `cosmap`
2 / (pi (1 - 2 sigma + 2 sigma^2)), else 1. Both functions are diffusers' own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


@dataclass(frozen=True)
class FlowSettings:
    """How sigmas are drawn and the loss weighted (the names of diffusers' flags)."""

    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False
    guidance_scale: float = 3.5  # FLUX.1-dev's guidance input during training
    max_sequence_length: int = 512


def training_sigmas(noise_scheduler) -> torch.Tensor:
    """The sigma table (N,) training draws from: a fresh scheduler's (set_timesteps, which
    sampling calls, would replace it with the inference schedule)."""
    fresh = type(noise_scheduler).from_config(noise_scheduler.config)
    return fresh.sigmas.clone().float()


def draw_noise_and_sigmas(seeds: torch.Tensor, shape: tuple[int, ...], sigma_table: torch.Tensor,
                          settings: FlowSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noise (B, C, h, w) and sigmas (B,), each a function of its sample's seed.

    Drawn on the CPU so a sample's draw is the same on any device and with any batching.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    noises, sigmas = [], []
    count = sigma_table.shape[0]
    for seed in seeds.tolist():
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noises.append(torch.randn(shape, generator=generator))
        u = compute_density_for_timestep_sampling(
            settings.weighting_scheme, 1, logit_mean=settings.logit_mean,
            logit_std=settings.logit_std, mode_scale=settings.mode_scale, generator=generator)
        # `mode` gives u = 1 at u' = 0 and a float32 sigmoid can round to 1: keep i < N
        # (diffusers' scripts would index past the table there).
        index = (u * count).long().clamp(0, count - 1)
        sigmas.append(sigma_table[index])
    return torch.stack(noises), torch.cat(sigmas)


def loss_weights(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """w(sigma) per sample (B,)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme, sigmas).float()


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
                  ) -> torch.Tensor:
    """x_t = (1 - sigma) x_0 + sigma eps, sigma broadcast over (C, h, w)."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise


def prediction_and_target(model_output: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                          noisy: torch.Tensor, sigmas: torch.Tensor, *,
                          precondition_outputs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(what is compared, what it is compared to): (v_hat, eps - x_0), or with
    `precondition_outputs` (x_t - sigma v_hat, x_0)."""
    if precondition_outputs:
        s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(model_output.dtype)
        return model_output * (-s) + noisy, latents
    return model_output, noise - latents
