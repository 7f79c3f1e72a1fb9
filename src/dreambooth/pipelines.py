"""What each family's pipeline takes when sampling: schedulers by name, defaults, size and guidance.

Two kinds of denoiser sample differently. The UNet families (SD 1.x, 2.x, SDXL) predict noise
(or v) on a discrete DDPM schedule and run any of SCHEDULERS. The flow-matching families
(SD 3.x, FLUX.1: diffusion transformers) predict the velocity v = noise - x0 of a straight path
x_t = (1 - t) x0 + t noise and integrate it from t = 1 to 0 (Esser et al. 2024, "Scaling
Rectified Flow Transformers"); only samplers written for that ODE apply (FLOW_SCHEDULERS).

FLUX.1 differs once more: FLUX.1-dev is guidance-distilled, so its `guidance_scale` is an input
of the transformer (the guidance embedding), one forward pass per step and no negative prompt;
FLUX.1-schnell is also timestep-distilled (4 steps) and has no guidance input at all
(`guidance_embeds` false in its transformer config). SD 3.x runs classifier-free guidance as
SD does. `traits(pipeline)` says which of these a loaded pipeline is.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)

from dreambooth.models import default_guidance_scale, read_training_config


class GenerationError(ValueError):
    """A generation argument that cannot be used; the message names the argument and its value.

    `param` is the argument's name (the HTTP server reports it as the request field at fault).
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


# Our name -> (diffusers scheduler class, AUTOMATIC1111 sampler name), for UNet families.
SCHEDULERS: dict[str, tuple[type, str]] = {
    "ddim": (DDIMScheduler, "DDIM"),
    "pndm": (PNDMScheduler, "PLMS"),
    "euler": (EulerDiscreteScheduler, "Euler"),
    "euler_a": (EulerAncestralDiscreteScheduler, "Euler a"),
    "dpm++": (DPMSolverMultistepScheduler, "DPM++ 2M"),
}
# "pndm" is A1111's PLMS: linear multistep from the first step (crowsonkb's PLMS), without
# PNDM's Runge-Kutta warm-up, which costs 3 extra UNet calls per step and cannot run fewer than
# 4 steps; SD's own scheduler configs say skip_prk_steps true.
_SCHEDULER_EXTRA: dict[str, dict] = {"dpm++": {"algorithm_type": "dpmsolver++"},
                                     "pndm": {"skip_prk_steps": True}}
# The samplers of the flow-matching ODE, by the same names: Euler is what SD 3.x and FLUX.1
# ship; DPM++ 2M runs on the flow sigmas (`use_flow_sigmas`, the model's shift as `flow_shift`,
# its dynamic shifting kept). Ancestral Euler is left out: diffusers' flow pipelines draw its
# per-step noise from the global RNG, not the image's generator.
FLOW_SCHEDULERS: dict[str, tuple[type, str]] = {
    "euler": (FlowMatchEulerDiscreteScheduler, "Euler"),
    "dpm++": (DPMSolverMultistepScheduler, "DPM++ 2M"),
}

# Per family: default steps (diffusers' for SD 3.x and FLUX.1-dev; BFL's 4 for schnell), the
# text tokens T5 reads when sampling (diffusers' pipeline defaults; schnell was trained with
# 256; training's own defaults are the dreambooth.flow modules'), the label errors use. Their
# guidance defaults are the flow modules' GUIDANCE_SCALE (SD 3's 7, FLUX.1-dev's 3.5).
UNET_STEPS = 30
FLOW_DEFAULTS = {
    # family: (steps, max_sequence_length, label)
    "sd3": (28, 256, "SD 3"),
    "flux": (28, 512, "FLUX.1"),
    "flux-schnell": (4, 256, "FLUX.1-schnell"),
}


@dataclass(frozen=True)
class Traits:
    """What a loaded pipeline's family means for sampling it."""

    family: str  # "sd" (1.x/2.x), "sdxl", "sd3", "flux" or "flux-schnell" (no guidance input)
    label: str  # for messages: "SD 1.x/2.x", "SDXL", "SD 3", "FLUX.1", "FLUX.1-schnell"
    default_steps: int
    size_multiple: int  # image sides are multiples of this many pixels
    native_size: int  # the image side the model was made for
    max_sequence_length: int | None  # T5 tokens per prompt; None: no T5 (UNet families)
    text_tokens: int  # tokens the denoiser attends to beside the image's (0 for UNets)
    patch_pixels: int  # pixels per side of one image token of a transformer; 0 for UNets
    guidance: str  # "cfg" (classifier-free), "distilled" (FLUX.1-dev's input) or "none"

    @property
    def flow_matching(self) -> bool:
        return self.patch_pixels > 0

    @property
    def negative_prompt(self) -> bool:
        """Whether the model takes a negative prompt (classifier-free guidance's other half)."""
        return self.guidance == "cfg"

    def denoiser_calls(self, guidance_scale: float) -> int:
        """Denoiser forward passes per step: both CFG halves with guidance above 1."""
        return 2 if self.guidance == "cfg" and guidance_scale > 1 else 1


def denoiser(pipeline):
    """The network that denoises: a UNet, or the flow families' transformer."""
    transformer = getattr(pipeline, "transformer", None)
    return transformer if transformer is not None else pipeline.unet


def is_flow_matching(pipeline) -> bool:
    """Whether `pipeline` (any object with the pipeline's modules) is of SD 3.x or FLUX.1."""
    return getattr(pipeline, "transformer", None) is not None


def traits(pipeline) -> Traits:
    """The sampling traits of `pipeline` (any pipeline over a family's modules: text-to-image,
    img2img or inpainting), read from its modules' configs."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    vae_scale = pipeline.vae_scale_factor
    network = denoiser(pipeline)
    if isinstance(network, (SD3Transformer2DModel, FluxTransformer2DModel)):
        if isinstance(network, SD3Transformer2DModel):
            family, tokenizer = "sd3", pipeline.tokenizer_3
            patch = network.config.patch_size
            native = network.config.sample_size * vae_scale
            guidance = "cfg"
        else:
            # FLUX packs 2x2 latent pixels into one token; diffusers' default size is 1024 px.
            has_guidance = bool(network.config.guidance_embeds)
            family = "flux" if has_guidance else "flux-schnell"
            tokenizer, patch = pipeline.tokenizer_2, 2
            native = pipeline.default_sample_size * vae_scale
            guidance = "distilled" if has_guidance else "none"
        steps, sequence, label = FLOW_DEFAULTS[family]
        # A model trained by this tool samples with the T5 length it was trained with (FLUX
        # attends to the padding tokens too, so the length changes the image).
        recorded = read_training_config(getattr(pipeline, "name_or_path", None) or None).get(
            "max_sequence_length")
        if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
            sequence = recorded
        sequence = min(sequence, tokenizer.model_max_length)
        # SD 3 attends to CLIP's 77 tokens beside T5's.
        text = sequence + (pipeline.tokenizer_max_length if family == "sd3" else 0)
        return Traits(family=family, label=label, default_steps=steps,
                      size_multiple=vae_scale * patch, native_size=native,
                      max_sequence_length=sequence, text_tokens=text,
                      patch_pixels=vae_scale * patch, guidance=guidance)
    sdxl = hasattr(pipeline, "text_encoder_2")
    return Traits(family="sdxl" if sdxl else "sd", label="SDXL" if sdxl else "SD 1.x/2.x",
                  default_steps=UNET_STEPS, size_multiple=8,
                  native_size=network.config.sample_size * vae_scale, max_sequence_length=None,
                  text_tokens=0, patch_pixels=0, guidance="cfg")


def default_guidance(pipeline) -> float:
    """The guidance scale to sample `pipeline` with when none is given.

    UNet families: `models.default_guidance_scale` (the bundled world model's 3, a recorded
    validation scale, else SD's 7.5). SD 3.x and FLUX.1-dev: the validation scale a model
    trained by this tool recorded, else the family's own (`GUIDANCE_SCALE` of its
    dreambooth.flow module: 7 and 3.5), also for a pipeline not loaded from a folder.
    FLUX.1-schnell: 0 (it has no guidance input).
    """
    model_traits = traits(pipeline)
    if not model_traits.flow_matching:
        return default_guidance_scale(pipeline)
    if model_traits.guidance == "none":
        return 0.0
    recorded = read_training_config(pipeline.name_or_path or None).get(
        "validation_guidance_scale")
    if isinstance(recorded, (int, float)) and not isinstance(recorded, bool) and recorded >= 0:
        return float(recorded)
    from dreambooth.flow import family_module

    return float(family_module(model_traits.family).GUIDANCE_SCALE)


def schedulers_for(pipeline) -> dict[str, tuple[type, str]]:
    """The samplers `pipeline` can run, by name."""
    return FLOW_SCHEDULERS if is_flow_matching(pipeline) else SCHEDULERS


def check_scheduler(pipeline, name: str | None) -> None:
    """Raise GenerationError (param 'scheduler') unless `pipeline` can run sampler `name`."""
    valid = schedulers_for(pipeline)
    if name is None or name in valid:
        return
    model = traits(pipeline).label
    if name in SCHEDULERS:
        raise GenerationError(
            f"scheduler='{name}' samples the noise schedule of UNet models (SD 1.x/2.x/SDXL); "
            f"this {model} model is a flow-matching transformer: use one of "
            f"{', '.join(valid)}", param="scheduler")
    raise GenerationError(f"scheduler='{name}' is unknown; valid names for this {model} "
                          f"model: {', '.join(valid)}", param="scheduler")


def sampler_name(pipeline, name: str | None) -> str:
    """The AUTOMATIC1111 sampler name of sampler `name` on `pipeline` (None: its own scheduler,
    by its class; `formats.infotext.a1111_sampler` maps the class names it knows)."""
    if name is not None:
        return schedulers_for(pipeline)[name][1]
    for cls, sampler in schedulers_for(pipeline).values():
        if type(pipeline.scheduler) is cls:
            return sampler
    return type(pipeline.scheduler).__name__


def set_scheduler(pipeline, name: str | None) -> str:
    """Swap in scheduler `name` (keeping the model's noise schedule); return its A1111 sampler name.

    With `name` None the pipeline's scheduler is kept and its sampler name is returned.
    """
    if name is None:
        return sampler_name(pipeline, None)
    check_scheduler(pipeline, name)
    config = dict(pipeline.scheduler.config)
    if is_flow_matching(pipeline):
        cls, sampler = FLOW_SCHEDULERS[name]
        if cls is DPMSolverMultistepScheduler:
            # The flow schedulers' `shift` is DPM-Solver's `flow_shift` (not read under its
            # own name, which diffusers would warn about).
            extra = dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                         flow_shift=config.pop("shift", 1.0), algorithm_type="dpmsolver++")
        else:
            extra = {}
        pipeline.scheduler = cls.from_config(config, **extra)
        return sampler
    cls, sampler = SCHEDULERS[name]
    extra = dict(_SCHEDULER_EXTRA.get(name, {}))
    if "clip_sample" not in config:
        # DDIM/DDPM default to clipping x0 to [-1, 1], right for pixels but not for latents
        # (SD's configs say clip_sample false); a latent model's config that is silent means no.
        extra["clip_sample"] = False
    pipeline.scheduler = cls.from_config(config, **extra)
    return sampler


def min_steps(scheduler) -> int:
    """The fewest denoising steps `scheduler` (an instance) can run: PNDM with its Runge-Kutta
    warm-up (`skip_prk_steps` false) needs `pndm_order` (4); every other sampler here needs 1."""
    if isinstance(scheduler, PNDMScheduler) and not scheduler.config.get("skip_prk_steps"):
        return scheduler.pndm_order
    return 1


def check_family_arguments(pipeline, *, negative_prompts: list[str], guidance_scale: float,
                           height: int, width: int) -> None:
    """Raise GenerationError (with its `param`) for what `pipeline`'s family cannot do: a
    negative prompt or a guidance scale FLUX.1 does not take, a size off its latent grid."""
    model_traits = traits(pipeline)
    if any(negative_prompts) and not model_traits.negative_prompt:
        raise GenerationError(
            f"negative_prompt is not used by {model_traits.label} models: they are "
            "guidance-distilled (one transformer pass per step, no classifier-free guidance), "
            "so leave negative_prompt empty", param="negative_prompt")
    if model_traits.guidance == "none" and guidance_scale > 1:
        raise GenerationError(
            f"guidance_scale={guidance_scale:g} has no effect on this {model_traits.label} "
            "model (its transformer has no guidance input: guidance_embeds false); leave it "
            "unset or 0", param="guidance_scale")
    multiple = model_traits.size_multiple
    unit = "image token" if model_traits.flow_matching else "latent step"
    for key, value in (("height", height), ("width", width)):
        if value % multiple:
            nearest = max(multiple, value // multiple * multiple)
            raise GenerationError(
                f"{key}={value} is not a multiple of {multiple}, the pixels per {unit} of "
                f"this {model_traits.label} model; use e.g. {nearest}", param=key)
