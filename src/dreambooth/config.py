"""Typed training configuration: one dataclass per concern, flat user-facing keys.

Every leaf field's name is the flag of diffusers' `examples/dreambooth/train_dreambooth.py`
(and of its `train_dreambooth_lora_sd3.py` / `_flux.py` for SD 3.x and FLUX.1) or a new flag of
ours, unique across sections, so a YAML file and the command line use the
same flat keys (`resolution: 512`, `--resolution 512`). Values flow one way:
YAML file -> command-line overrides -> `TrainConfig` -> explicit constructor arguments.
`parse_train_config` collects every problem and raises once, naming each key and value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
)
MIXED_PRECISION = ("no", "fp16", "bf16")
# Sizes beyond any model or run: refused up front instead of exhausting memory or disk later.
MAX_RESOLUTION = 4096
SIZE_LIMITS = {"train_batch_size": 1024, "sample_batch_size": 1024, "num_class_images": 100_000,
               "num_validation_images": 1024, "rank": 4096, "repeats": 10_000,
               "class_inference_steps": 1000, "validation_inference_steps": 1000}
TRACKERS = ("tensorboard", "wandb", "mlflow", "csv")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
PRECISIONS = ("no", "fp32", "fp16", "bf16")
MAX_SEQUENCE_LENGTH = 512  # T5 tokens: FLUX.1's and SD 3's T5-XXL limit
# The flow-matching keys; None means the family's own value, and a UNet family refuses any set.
FLOW_KEYS = ("weighting_scheme", "precondition_outputs", "guidance_scale", "max_sequence_length",
             "lora_layers", "lora_blocks", "quantize_base")


def option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A dataclass field whose one-line `help` becomes the flag's --help text."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str | None = option(
        None, "Base model: a diffusers pipeline folder, a Hugging Face hub id in the local cache, "
        "a single-file checkpoint, or 'demo' (the bundled world model).")
    revision: str | None = option(None, "Hub revision of the base model (cached ids only).")
    variant: str | None = option(
        None, "Weights variant to load, e.g. 'fp16' (diffusion_pytorch_model.fp16.safetensors).")
    prediction_type: str | None = option(
        None, "Override the model's prediction type (epsilon or v_prediction); also tells a "
        "single SD 2.x file's kind.", (None, "epsilon", "v_prediction"))
    pretrained_vae_model_name_or_path: str | None = option(
        None, "Another VAE (folder or cached id), e.g. SDXL's fp16-safe VAE.")
    single_file_config: str | None = option(
        None, "For a single-file base model: the diffusers folder (or cached id) of the model "
        "it was made from, as diffusers' from_single_file(config=...). SD 3.x / FLUX.1 files "
        "need it (tokenizers; VAE and text encoders of a transformer-only file).")


@dataclass
class DataConfig:
    instance_data_dir: str | None = option(None, "Folder with the 3-5 photos of the subject.")
    instance_prompt: str | None = option(
        None, "Prompt with the identifier bound to the subject, e.g. 'a photo of sks dog'.")
    class_data_dir: str | None = option(
        None, "Folder of class images for prior preservation; missing ones are generated here.")
    class_prompt: str | None = option(None, "Prompt for the class, e.g. 'a photo of dog'.")
    resolution: int = option(512, "Training resolution in pixels (a multiple of 8).")
    center_crop: bool = option(
        False, "Center-crop images to the resolution (else a seeded random crop).")
    random_flip: bool = option(False, "Also train on horizontally flipped images (both cached).")
    concepts: str | None = option(
        None, "YAML or JSON list of concepts (instance_data_dir, instance_prompt, class_data_dir, "
        "class_prompt, num_class_images, repeats, loss_weight), instead of the instance and "
        "class flags; a concepts_list.json reads unchanged.")
    caption_extension: str = option(
        ".txt", "Extension of per-image caption files beside the photos (photo.jpg -> "
        "photo.txt); metadata.jsonl (file_name, text) is read too. [trigger] in a caption "
        "becomes the concept's instance prompt.")
    caption_dropout_rate: float = option(
        0.0, "Probability that an instance sample's caption is replaced by the empty string.")
    shuffle_caption: bool = option(
        False, "Shuffle the comma-separated tags of each caption at every step (kohya).")
    keep_tokens: int = option(
        0, "With shuffle_caption: the first N comma-separated tags stay in place.")
    aspect_buckets: bool = option(
        False, "Aspect-ratio buckets: whole photos at about resolution^2 pixels instead of "
        "square crops (alias: enable_bucket).")
    min_bucket_reso: int | None = option(
        None, "Smallest bucket side in pixels (default: 256, or resolution / 2 if smaller).")
    max_bucket_reso: int | None = option(
        None, "Largest bucket side in pixels (default: 2 x resolution).")
    bucket_reso_steps: int = option(
        64, "Bucket sides are multiples of this; a multiple of the VAE factor x the UNet's "
        "downsampling (64 suits SD 1.x, 2.x and SDXL).")
    bucket_no_upscale: bool = option(
        False, "Never enlarge a photo: a small photo gets a bucket of its own size.")
    mask_dir: str | None = option(
        None, "Folder of loss masks named like the photos (photo.png -> MASK_DIR/photo.png); "
        "photo.mask.png beside a photo is used without it.")
    alpha_mask: bool = option(
        False, "Use each photo's alpha channel as its loss mask (no alpha: all opaque).")
    unmasked_weight: float = option(
        0.1, "Loss weight where a mask is 0 (1 where it is 1).")


@dataclass
class PriorConfig:
    with_prior_preservation: bool = option(
        False, "Add the class-prior preservation loss (paper, eq. 2).")
    prior_loss_weight: float = option(1.0, "Weight lambda of the prior preservation loss.")
    num_class_images: int = option(
        100, "Class images wanted; if class_data_dir holds fewer, the base model generates the "
        "rest.")
    sample_batch_size: int = option(4, "Batch size for generating class images.")
    class_inference_steps: int = option(50, "Denoising steps when generating class images.")
    class_guidance_scale: float | None = option(
        None, "Classifier-free guidance scale for class images (default: the base model's own, "
        "models.default_guidance_scale: 3 for demo, 7 for SD 3.x, 3.5 for FLUX.1, else 7.5).")
    prior_generation_precision: str | None = option(
        None, "Precision of the base model that generates class images, loaded apart from the "
        "one trained (default: the live model, in the training precision).", (None, *PRECISIONS))


@dataclass
class OptimizationConfig:
    train_text_encoder: bool = option(False, "Also fine-tune the text encoder.")
    text_encoder_lr: float | None = option(
        None, "Text encoder learning rate (default: learning_rate).")
    train_batch_size: int = option(4, "Instance images per step (as many class images are added).")
    max_train_steps: int | None = option(None, "Optimizer steps; default: num_train_epochs epochs.")
    num_train_epochs: int = option(
        1, "Epochs over the instance images when max_train_steps is unset.")
    repeats: int = option(1, "Count each instance image this many times per epoch.")
    learning_rate: float = option(5e-6, "Learning rate (after warmup) for the UNet.")
    scale_lr: bool = option(
        False, "Multiply learning rates by batch size x accumulation x processes.")
    lr_scheduler: str = option("constant", "Learning-rate schedule.", LR_SCHEDULERS)
    lr_warmup_steps: int = option(500, "Linear warmup steps of the learning rate.")
    lr_num_cycles: int = option(1, "Hard restarts for cosine_with_restarts.")
    lr_power: float = option(1.0, "Power of the polynomial schedule.")
    gradient_accumulation_steps: int = option(1, "Micro-batches accumulated per optimizer step.")
    gradient_checkpointing: bool = option(
        False, "Recompute activations in backward to save memory.")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this value (0 disables).")
    optimizer: str = option("adamw", "Optimizer: adamw, or prodigy (needs the prodigyopt package).",
                            ("adamw", "prodigy"))
    use_8bit_adam: bool = option(False, "bitsandbytes 8-bit AdamW (extra 'bnb'; needs a CUDA GPU).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_weight_decay: float = option(1e-2, "AdamW weight decay.")
    adam_weight_decay_text_encoder: float | None = option(
        None, "Weight decay for the text encoder(s) (default: adam_weight_decay).")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    offset_noise: bool = option(
        False, "Add offset noise (0.1 x per-channel noise) for darker/brighter images.")
    snr_gamma: float | None = option(
        None, "Min-SNR loss weighting gamma (Hang et al. 2023); 5.0 is usual.")
    mixed_precision: str = option(
        "no", "Autocast precision with fp32 master weights.", MIXED_PRECISION)
    prodigy_beta3: float | None = option(
        None, "Prodigy's beta3 (default: its own, sqrt(beta2)).")
    prodigy_decouple: bool = option(True, "Prodigy: decoupled (AdamW-style) weight decay.")
    prodigy_use_bias_correction: bool = option(True, "Prodigy: Adam's bias correction.")
    prodigy_safeguard_warmup: bool = option(
        True, "Prodigy: leave the learning rate out of the D estimate during warmup.")
    seed: int | None = option(None, "Seed: batches and noise of step k depend on (seed, k) only.")


@dataclass
class FlowConfig:
    """The flow-matching objective of SD 3.x and FLUX.1 (flow/objective.py); diffusers' flags."""

    weighting_scheme: str | None = option(
        None, "How training sigmas are drawn and the loss weighted: logit_normal, mode "
        "(sampling), sigma_sqrt, cosmap (weighting) or none (default: logit_normal for SD 3.x, "
        "none for FLUX.1, as diffusers' scripts).", (None, *WEIGHTING_SCHEMES))
    logit_mean: float = option(0.0, "Mean of the logit-normal sigma density.")
    logit_std: float = option(1.0, "Standard deviation of the logit-normal sigma density.")
    mode_scale: float = option(1.29, "Scale of the `mode` sigma density.")
    precondition_outputs: bool | None = option(
        None, "Regress the clean latents x_t - sigma v_hat instead of the velocity (default: "
        "on for SD 3.x, as diffusers' script; off for FLUX.1).")
    guidance_scale: float | None = option(
        None, "Guidance input of a guidance-distilled transformer (FLUX.1-dev) during training "
        "(default 3.5, diffusers' default; its README trains with 1.0).")
    max_sequence_length: int | None = option(
        None, "T5 tokens per prompt (default: 77 for SD 3.x, 512 for FLUX.1; at most 512).")


@dataclass
class AdapterConfig:
    use_lora: bool = option(
        False, "Train LoRA adapters (peft) instead of the full UNet/text encoder.")
    rank: int = option(4, "LoRA rank r.")
    lora_alpha: float | None = option(None, "LoRA alpha (scale = alpha / rank); default: rank.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch.")
    use_dora: bool = option(False, "Weight-decomposed LoRA (DoRA, Liu et al. 2024) through peft.")
    lora_unet_target_modules: str = option(
        "to_k,to_q,to_v,to_out.0", "Comma-separated UNet modules that get LoRA layers.")
    lora_text_encoder_target_modules: str = option(
        "q_proj,k_proj,v_proj,out_proj",
        "Comma-separated text encoder modules that get LoRA layers (with train_text_encoder).")
    lora_layers: str | None = option(
        None, "SD 3.x / FLUX.1: comma-separated transformer modules that get LoRA layers, e.g. "
        "'attn.to_k,attn.to_q,attn.to_v,attn.to_out.0' (default: diffusers' list of the "
        "family's attention (and FLUX.1's feed-forward) projections).")
    quantize_base: str | None = option(
        None, "SD 3.x / FLUX.1 LoRA: quantize the frozen base transformer's Linear weights to "
        "int8 or int4 (torchao, extra 'quantize'); the LoRA is trained and saved in full "
        "precision.", (None, "int8", "int4"))
    lora_blocks: str | None = option(
        None, "SD 3.x / FLUX.1: comma-separated indices of the transformer blocks that get LoRA "
        "layers, e.g. '12,13' (default: all).")


@dataclass
class EMAConfig:
    use_ema: bool = option(
        False, "Keep an exponential moving average (EMA) of the trained weights; it is what "
        "validation samples and the saved model (or LoRA files) use.")
    ema_decay: float = option(
        0.999, "Largest EMA decay, in (0, 1); with ema_warmup the average spans about the last "
        "tenth of a run shorter than ~9,000 steps (see train/ema.py).")
    ema_warmup: bool = option(
        True, "Ramp the decay as min(ema_decay, (1+s)/(10+s)) (diffusers' EMAModel); "
        "--no-ema_warmup: ema_decay from the first step (then lower it, e.g. 0.99).")
    ema_on_cpu: bool = option(
        False, "Keep the EMA copy in CPU memory, updated from the device weights (saves "
        "accelerator memory, costs a copy per step).")
    export_raw_weights: bool = option(
        False, "With use_ema: save the last trained weights instead of their average.")


@dataclass
class CheckpointConfig:
    output_dir: str = option(
        "dreambooth-model", "Where the trained pipeline, checkpoints and logs go.")
    output_name: str | None = option(
        None, "LoRA runs: name of the kohya LoRA file (NAME.safetensors) and its ss_output_name, "
        "the name AUTOMATIC1111 lists it under (default: output_dir's folder name).")
    checkpointing_steps: int = option(500, "Write a full-state checkpoint every N optimizer steps.")
    upcast_before_saving: bool = option(
        False, "SD 3.x / FLUX.1: save trained weights in fp32; without it they are saved in the "
        "mixed-precision dtype (fp32 when mixed_precision is no), as diffusers' scripts.")
    checkpoints_total_limit: int | None = option(None, "Keep only the newest N checkpoints.")
    resume_from_checkpoint: str | None = option(
        None, "'latest' or a checkpoint path to resume training from.")


@dataclass
class ValidationConfig:
    validation_prompt: str | None = option(
        None, "Prompt sampled during training to watch progress.")
    validation_prompts: str | None = option(
        None, "Text file of validation prompts, one a line ('#' comments and blank lines "
        "skipped; at most 64), sampled beside validation_prompt: one grid row per prompt.")
    validation_data_dir: str | None = option(
        None, "Held-out photos of the subject: every validation_steps, the loss on them at fixed "
        "timesteps and noise is logged as val_loss (training is unchanged).")
    validation_steps: int = option(
        100, "Sample validation images (and compute val_loss) every N optimizer steps.")
    num_validation_images: int = option(4, "Validation images per prompt (fixed seeds).")
    validation_inference_steps: int = option(25, "Denoising steps for validation images.")
    validation_guidance_scale: float | None = option(
        None, "Guidance scale for validation images (default: the base model's own); the "
        "trained model's default in generate, eval and serve.")


@dataclass
class TrackingConfig:
    report_to: str = option(
        "tensorboard", "Comma-separated trackers: tensorboard, wandb, mlflow, csv, all or none.")
    logging_dir: str = option("logs", "Tracker folder, relative to output_dir.")
    tracker_project_name: str = option(
        "dreambooth", "Project/experiment name for wandb and mlflow.")


@dataclass
class HardwareConfig:
    accelerator: str = option("auto", "Lightning accelerator: auto, cpu, gpu, mps ...")
    devices: str = option("auto", "Lightning devices: auto, a count, or a list such as '0,1'.")
    num_nodes: int = option(1, "Machines for multi-node training.")
    strategy: str = option("auto", "Lightning strategy: auto, ddp, ddp_spawn, fsdp, deepspeed ...")
    pre_compute_text_embeddings: bool = option(
        False, "Encode prompts once and keep the text encoder off the accelerator during training.")
    enable_xformers_memory_efficient_attention: bool = option(
        False, "Accepted for compatibility; PyTorch SDPA (fused attention) is always used.")
    allow_tf32: bool = option(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    dataloader_num_workers: int = option(
        0, "Accepted for compatibility; batches come from cached latents.")
    num_threads: int | None = option(
        None, "torch threads on the CPU (default: one per core other processes leave idle, "
        "measured as the run starts, or OMP_NUM_THREADS; a resumed run keeps its first count).")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    optim: OptimizationConfig = field(default_factory=OptimizationConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)

    def to_flat_dict(self) -> dict[str, Any]:
        return {f.name: getattr(getattr(self, section), f.name) for section, f in leaf_fields()}

    @property
    def trackers(self) -> list[str]:
        names = [name.strip() for name in self.tracking.report_to.split(",") if name.strip()]
        if names == ["all"]:
            return list(TRACKERS)
        return [] if names == ["none"] else names


# diffusers flags that have no meaning here; accepted with a warning so existing commands run.
IGNORED_FLAGS = {
    "output_kohya_format": "the kohya-format LoRA file is always written",
    "local_rank": "Lightning sets ranks itself",
    "push_to_hub": "this tool never uploads; push the output folder yourself",
    "hub_token": "this tool never uploads",
    "hub_model_id": "this tool never uploads",
    "set_grads_to_none": "gradients are always set to None after each step",
    "cache_latents": "latents are always computed once and cached",
    "validation_epochs": "validation runs every --validation_steps optimizer steps",
    "image_interpolation_mode": "photos are resized with LANCZOS (shrinking) or BICUBIC "
                                "(enlarging)",
}


# Other tools' names for our keys: accepted on the command line and in YAML.
ALIASES = {"enable_bucket": "aspect_buckets"}


# diffusers flags whose feature this tool does not offer: refused, with what to do instead.
UNSUPPORTED_FLAGS = {
    "dataset_name": "hub datasets are not downloaded; put the photos in a folder and pass "
                    "--instance_data_dir",
    "caption_column": "hub datasets are not read; put caption files beside the photos "
                      "(photo.txt, or metadata.jsonl) in --instance_data_dir",
    "image_column": "datasets are not supported; use --instance_data_dir",
    "train_text_encoder_ti": "pivotal tuning (textual inversion) is not implemented",
    "do_edm_style_training": "EDM-style training is not implemented",
    "dataset_config_name": "hub datasets are not downloaded; use --instance_data_dir",
    "cache_dir": "models are read from the local Hugging Face cache; set HF_HUB_CACHE to use "
                 "another folder",
    "aspect_ratio_buckets": "use --aspect_buckets (whole photos in buckets of about "
                            "resolution^2 pixels)",
}


def leaf_fields() -> Iterator[tuple[str, dataclasses.Field]]:
    """(section name, field) for every user-facing key, in declaration order."""
    for section, section_type in typing.get_type_hints(TrainConfig).items():
        for leaf in dataclasses.fields(section_type):
            yield section, leaf


def field_type(section: str, leaf: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional?) of a leaf field, e.g. `int | None` -> (int, True)."""
    section_type = typing.get_type_hints(TrainConfig)[section]
    return optional_type(typing.get_type_hints(section_type)[leaf.name])


def optional_type(hint: Any) -> tuple[Any, bool]:
    """(base type, optional?) of an annotation: `int | None` -> (int, True), `str` -> (str, False);
    of a union of several types, the first (`str | Path` -> str)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        base = next(arg for arg in args if arg is not type(None))
        return base, type(None) in args
    return hint, False


class ConfigError(ValueError):
    """Every problem with a configuration, collected; `problems` holds one line per key."""

    def __init__(self, problems: list[str], source: str = "configuration"):
        self.problems = problems
        super().__init__(f"invalid {source}:\n" + "\n".join(f"  - {line}" for line in problems))


def _coerce(key: str, value: Any, section: str, leaf: dataclasses.Field) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ValueError."""
    base, optional = field_type(section, leaf)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{key}: null is not allowed; expected {base.__name__}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{key}={value!r} is not a boolean (true or false)")
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{key}={value!r} is not an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r} is not an integer") from None
    if base is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}={value!r} is not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r} is not a number") from None
        if not math.isfinite(number):  # a NaN learning rate trains a NaN model
            raise ValueError(f"{key}={value!r} is not a finite number")
        return number
    if isinstance(value, (list, dict)):
        raise ValueError(f"{key}={value!r} must be a single value, not a {type(value).__name__}")
    return str(value)


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML mapping of config keys; errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError([f"config file '{path}' is a folder; pass a YAML file"], str(path))
    if not path.is_file():
        raise ConfigError([f"config file '{path}' does not exist"], str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError([f"'{path}' is not a text file (not UTF-8): pass a YAML file"],
                          str(path)) from None
    except OSError as error:
        raise ConfigError([f"cannot read '{path}': {error.strerror}"], str(path)) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"'{path}' is not valid YAML: {error}"], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"'{path}' must hold a mapping of keys to values"], str(path))
    bad_keys = [key for key in data if not isinstance(key, str)]
    if bad_keys:
        raise ConfigError([f"'{path}': keys must be strings (config key names such as "
                           f"'resolution'), not {', '.join(repr(key) for key in bad_keys)}"],
                          str(path))
    return data


def parse_train_config(values: dict[str, Any], source: str = "configuration") -> TrainConfig:
    """Build and validate a TrainConfig from flat keys; raises ConfigError listing every problem."""
    leaves = {leaf.name: (section, leaf) for section, leaf in leaf_fields()}
    config = TrainConfig()
    problems: list[str] = []
    failed: set[str] = set()
    for key, value in values.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not a config key name (keys are strings)")
            continue
        if key in UNSUPPORTED_FLAGS:
            problems.append(f"{key} is not supported: {UNSUPPORTED_FLAGS[key]}")
            continue
        key = ALIASES.get(key, key)
        if key in IGNORED_FLAGS:
            warnings.warn(f"'{key}' is ignored: {IGNORED_FLAGS[key]}", UserWarning, stacklevel=2)
            continue
        if key not in leaves:
            close = difflib.get_close_matches(key, leaves, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"unknown key '{key}'{hint}")
            continue
        section, leaf = leaves[key]
        if key == "optimizer" and isinstance(value, str):
            value = value.lower()  # diffusers' scripts take 'AdamW' and 'prodigy' in any case
        try:
            setattr(getattr(config, section), key, _coerce(key, value, section, leaf))
        except ValueError as error:
            problems.append(str(error))
            failed.add(key)
    # Semantic checks see defaults where a value failed to parse: skip lines about those keys.
    problems += [line for line in validate(config)
                 if line.split("=")[0].split(" ")[0] not in failed]
    if problems:
        raise ConfigError(problems, source)
    _fill_guidance_scales(config)
    return config


def _fill_guidance_scales(config: TrainConfig) -> None:
    """Unset guidance scales take the base model's own (3 for the world model, a flow family's
    own, else SD's 7.5); a single file's are those of the folder it was made from."""
    if None not in (config.prior.class_guidance_scale, config.validation.validation_guidance_scale):
        return
    from dreambooth.models import SINGLE_FILE_SUFFIXES, default_guidance_scale

    base = config.model.pretrained_model_name_or_path
    if config.model.single_file_config and \
            Path(str(base)).suffix.lower() in SINGLE_FILE_SUFFIXES:
        base = config.model.single_file_config
    scale = default_guidance_scale(base)
    if config.prior.class_guidance_scale is None:
        config.prior.class_guidance_scale = scale
    if config.validation.validation_guidance_scale is None:
        config.validation.validation_guidance_scale = scale


def validate(config: TrainConfig) -> list[str]:
    """Semantic checks across keys; returns one line per problem (empty when valid)."""
    flat = config.to_flat_dict()
    problems: list[str] = []
    if not flat["pretrained_model_name_or_path"]:
        problems.append("pretrained_model_name_or_path is required")
    if flat["concepts"]:
        given = [key for key in ("instance_data_dir", "instance_prompt", "class_data_dir",
                                 "class_prompt") if flat[key]]
        if given:
            problems.append(f"concepts={flat['concepts']!r} replaces {', '.join(given)}: give "
                            "them per concept in that file")
    elif not flat["instance_data_dir"]:
        problems.append("instance_data_dir is required (or concepts)")
    for section, leaf in leaf_fields():
        choices = leaf.metadata.get("choices")
        if choices and flat[leaf.name] not in choices:
            shown = ", ".join(str(choice) for choice in choices if choice is not None)
            problems.append(f"{leaf.name}={flat[leaf.name]!r} is not one of {shown}")
    positive = ("resolution", "train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                "checkpointing_steps", "sample_batch_size", "validation_steps",
                "num_validation_images", "class_inference_steps", "validation_inference_steps",
                "num_nodes", "lr_num_cycles", "rank", "repeats")
    for key in positive:
        if flat[key] < 1:
            problems.append(f"{key}={flat[key]} must be at least 1")
    for key in ("max_train_steps", "checkpoints_total_limit", "num_threads"):
        if flat[key] is not None and flat[key] < 1:
            problems.append(f"{key}={flat[key]} must be at least 1")
    for key in ("num_class_images", "lr_warmup_steps", "max_grad_norm", "prior_loss_weight"):
        if flat[key] < 0:
            problems.append(f"{key}={flat[key]} must not be negative")
    if not 0 <= flat["lora_dropout"] < 1:
        problems.append(f"lora_dropout={flat['lora_dropout']} must be in [0, 1)")
    for key in ("learning_rate", "text_encoder_lr", "snr_gamma", "lora_alpha"):
        if flat[key] is not None and flat[key] <= 0:
            problems.append(f"{key}={flat[key]} must be positive")
    if flat["resolution"] > MAX_RESOLUTION:
        problems.append(f"resolution={flat['resolution']} is larger than any Stable Diffusion "
                        f"model uses (at most {MAX_RESOLUTION}; SD 1.x trains at 512, SDXL at "
                        "1024)")
    for key, limit in SIZE_LIMITS.items():
        if flat[key] is not None and flat[key] > limit:
            problems.append(f"{key}={flat[key]} is above {limit}, more than a DreamBooth run "
                            "can use")
    name = flat["output_name"]
    if name is not None and (not name.strip() or name in (".", "..")
                             or any(c in name for c in '/\\:*?"<>|')):
        problems.append(f"output_name={name!r} must be a plain file name (no folders, no "
                        "/\\:*?\"<>|), e.g. 'sks_dog_v1'")
    if flat["resolution"] % 8:
        problems.append(f"resolution={flat['resolution']} is not a multiple of 8 "
                        "(the VAE downsamples by 8)")
    bad_trackers = [name for name in config.trackers if name not in TRACKERS]
    if bad_trackers:
        problems.append(f"report_to={flat['report_to']!r}: unknown tracker(s) "
                        f"{', '.join(bad_trackers)}; use {', '.join(TRACKERS)}, all or none")
    if config.prior.with_prior_preservation and not flat["concepts"]:
        for key in ("class_data_dir", "class_prompt"):
            if not flat[key]:
                problems.append(f"{key} is required with with_prior_preservation")
    if flat["class_prompt"] and flat["instance_prompt"] and (
            flat["class_prompt"].strip() == flat["instance_prompt"].strip()):
        problems.append(f"class_prompt equals instance_prompt ({flat['instance_prompt']!r}): the "
                        "instance prompt needs an identifier the class prompt lacks, "
                        "e.g. 'a sks dog'")
    if not 0 < flat["ema_decay"] < 1:
        problems.append(f"ema_decay={flat['ema_decay']} must be between 0 and 1 (exclusive), "
                        "e.g. 0.999")
    for key in ("ema_on_cpu", "export_raw_weights"):
        if flat[key] and not flat["use_ema"]:
            problems.append(f"{key} applies only with use_ema: add --use_ema or drop --{key}")
    if flat["use_ema"] and any(name in flat["strategy"] for name in ("fsdp", "deepspeed")):
        problems.append(f"use_ema with strategy={flat['strategy']!r}: the EMA follows whole "
                        "weights, not shards; use ddp (or a single device)")
    problems += _validate_data(flat)
    length = flat["max_sequence_length"]
    if length is not None and not 1 <= length <= MAX_SEQUENCE_LENGTH:
        problems.append(f"max_sequence_length={length} must be between 1 and "
                        f"{MAX_SEQUENCE_LENGTH} (T5's limit)")
    if flat["logit_std"] <= 0:
        problems.append(f"logit_std={flat['logit_std']} must be positive")
    if flat["guidance_scale"] is not None and flat["guidance_scale"] < 0:
        problems.append(f"guidance_scale={flat['guidance_scale']} must not be negative")
    blocks = flat["lora_blocks"]
    if blocks is not None and not all(part.strip().isdigit() for part in blocks.split(",")):
        problems.append(f"lora_blocks={blocks!r} must be comma-separated block indices, "
                        "e.g. '0,1,12'")
    if flat["quantize_base"] and not flat["use_lora"]:
        problems.append(f"quantize_base={flat['quantize_base']!r} needs use_lora (a quantized "
                        "base is not fine-tuned in full): add --use_lora or drop --quantize_base")
    if flat["pre_compute_text_embeddings"] and flat["train_text_encoder"]:
        problems.append("pre_compute_text_embeddings cannot be used with train_text_encoder "
                        "(a trained text encoder changes the embeddings)")
    return problems


def _validate_data(flat: dict[str, Any]) -> list[str]:
    """Checks of the caption, bucket and mask keys."""
    problems = []
    if not 0 <= flat["caption_dropout_rate"] <= 1:
        problems.append(f"caption_dropout_rate={flat['caption_dropout_rate']} must be in [0, 1]")
    if flat["keep_tokens"] < 0:
        problems.append(f"keep_tokens={flat['keep_tokens']} must not be negative")
    extension = flat["caption_extension"]
    from dreambooth.images import IMAGE_EXTENSIONS

    if not extension.startswith(".") or len(extension) < 2 or extension.lower() in (
            IMAGE_EXTENSIONS) or any(c in extension for c in "/\\"):
        problems.append(f"caption_extension={extension!r} must be a file extension such as "
                        "'.txt' or '.caption' (not an image's)")
    if not 0 <= flat["unmasked_weight"] <= 1:
        problems.append(f"unmasked_weight={flat['unmasked_weight']} must be in [0, 1]")
    steps = flat["bucket_reso_steps"]
    if steps < 8 or steps % 8:
        problems.append(f"bucket_reso_steps={steps} must be a positive multiple of 8 (64 suits "
                        "SD 1.x, 2.x and SDXL)")
    for key in ("min_bucket_reso", "max_bucket_reso"):
        if flat[key] is not None and flat[key] < steps:
            problems.append(f"{key}={flat[key]} must be at least bucket_reso_steps={steps}")
    if (flat["min_bucket_reso"] is not None and flat["max_bucket_reso"] is not None
            and flat["min_bucket_reso"] > flat["max_bucket_reso"]):
        problems.append(f"min_bucket_reso={flat['min_bucket_reso']} is above "
                        f"max_bucket_reso={flat['max_bucket_reso']}")
    if flat["aspect_buckets"] and steps >= 8 and flat["resolution"] % steps:
        divisor = math.gcd(flat["resolution"], steps)
        problems.append(f"resolution={flat['resolution']} is not a multiple of "
                        f"bucket_reso_steps={steps}: pass bucket_reso_steps={divisor} or a "
                        f"resolution that is a multiple of {steps}")
    return problems


def instance_prompt_warnings(config: TrainConfig) -> list[str]:
    """Soft problems worth a warning but not an error."""
    instance, cls = config.data.instance_prompt, config.data.class_prompt
    if instance and cls:
        extra_words = set(instance.lower().split()) - set(cls.lower().split())
        if not extra_words:
            return [f"instance_prompt {instance!r} has no word that class_prompt {cls!r} lacks: "
                    "without a rare identifier (e.g. 'sks') the subject is bound to the class word "
                    "itself and the class prior drifts"]
    return []


def dump_yaml(config: TrainConfig) -> str:
    """The resolved configuration as flat YAML, loadable by `--config`."""
    return yaml.safe_dump(config.to_flat_dict(), sort_keys=False)
