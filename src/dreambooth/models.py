"""Finding and loading the components that DreamBooth trains and samples with, for every family
(SD 1.x, 2.x, SDXL with a UNet; SD 3.x and FLUX.1 with a diffusion transformer).

Models come from the user's disk or the local Hugging Face cache, never from the network here:
a hub id is resolved with `local_files_only=True` and fails with instructions when it is not
cached.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from dreambooth.families import (
    PIPELINE_CLASSES,
    detect_family,
    flow_subfolders,
    is_flow_matching,
    pipeline_class,
)

REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Short names of the models that ship inside the package (diffusers folders in assets/).
BUNDLED_MODELS = {"demo": Path(__file__).parent / "assets" / "world_model"}
DEFAULT_GUIDANCE_SCALE = 7.5  # Stable Diffusion's
# The world model samples best at a lower classifier-free guidance scale: on 30 caption
# combinations it trained on, 0.98 of its images had every asked attribute at 3, 0.90 at 4
# (BENCHMARKS.md, "The world model").
WORLD_MODEL_GUIDANCE_SCALE = 3.0
BUNDLED_GUIDANCE_SCALES = {"demo": WORLD_MODEL_GUIDANCE_SCALE}
TRAINING_CONFIG_FILE = "training_config.yaml"  # what `dreambooth train` writes into its model
# Weight dtypes by the names the CLI and the Python API take.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

logger = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model folder or id that cannot be used; the message names it and says what to do."""


def resolve_model_path(name_or_path: str | Path, revision: str | None = None, *,
                       prediction_type: str | None = None,
                       single_file_config: str | Path | None = None) -> Path:
    """Return the local diffusers folder for a path, a single-file checkpoint
    (`.safetensors`/`.ckpt`: SD1/SD2/SDXL, SD 3.x, FLUX.1), a cached Hugging Face hub id or the
    short name of a bundled model (`demo`: the pretrained model of the procedural world).

    `single_file_config` (diffusers' `from_single_file(config=...)`): the diffusers folder (or
    cached hub id) of the model a single file was made from. SD 3.x and FLUX.1 files need it
    for what they lack (tokenizers; VAE and text encoders of a transformer-only file); for the
    UNet families it replaces the shipped architecture config. Other inputs ignore it.

    Raises ModelLoadError naming `name_or_path` if it is neither a diffusers pipeline folder nor
    a hub id present in the local cache.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        from dreambooth.formats.single_file import load_single_file

        # Converted once (offline, with the configs the package ships or the config folder)
        # and cached.
        return load_single_file(path, prediction_type=prediction_type,
                                config=single_file_config_folder(single_file_config, path,
                                                                 revision))
    if path.exists():
        return _check_pipeline_folder(path, str(name_or_path))
    text = str(name_or_path)
    if text in BUNDLED_MODELS:
        return _check_pipeline_folder(BUNDLED_MODELS[text], text)
    looks_like_repo_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_repo_id:
        raise ModelLoadError(
            f"model '{text}' not found: no such folder. Pass a diffusers pipeline folder "
            "(with model_index.json), a Hugging Face hub id such as 'org/name' that is in "
            f"your local cache, or a bundled model ({', '.join(BUNDLED_MODELS)})."
        )
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(text, revision=revision, local_files_only=True)
    except Exception as error:  # the hub raises several types for "not cached"
        raise ModelLoadError(
            f"model '{text}' is not in the local Hugging Face cache and this tool never "
            f"downloads weights by itself ({type(error).__name__}). Fetch it first, e.g. "
            f"`huggingface-cli download {text}`, or pass a local diffusers folder."
        ) from error
    return _check_pipeline_folder(Path(folder), text)


def single_file_config_folder(config: str | Path | None, single_file: Path,
                              revision: str | None = None) -> Path | None:
    """The diffusers folder that `single_file_config` (a folder or cached hub id) names, for
    the single file `single_file`; None for None."""
    if config is None or config == "":
        return None
    if Path(config).expanduser().is_file():
        raise ModelLoadError(
            f"single_file_config '{config}' is a file; pass the diffusers folder (or cached hub "
            f"id) of the model '{single_file.name}' was made from")
    return resolve_model_path(config, revision)


def read_training_config(folder: str | Path | None) -> dict[str, Any]:
    """The training_config.yaml that `dreambooth train` wrote into a model folder, as a dict;
    empty when there is none (a base model) or it cannot be read (logged: only what the file
    records, such as the trigger phrase, is lost)."""
    config = Path(folder) / TRAINING_CONFIG_FILE if folder is not None else None
    if config is None or not config.is_file():
        return {}
    try:
        values = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError) as error:
        logger.warning("cannot read %s (%s): its recorded settings are not used", config, error)
        return {}
    return values if isinstance(values, dict) else {}


def default_guidance_scale(model) -> float:
    """The classifier-free guidance scale to sample `model` (a name, a folder or a loaded
    pipeline) with when none is given: a bundled model's own (by short name or folder), the
    validation scale a model trained by this tool recorded in its training_config.yaml (the
    demo's model: the world model's), else a flow-matching family's own (`GUIDANCE_SCALE` of
    its dreambooth.flow module), else SD's 7.5."""
    text = str(getattr(model, "name_or_path", model) or "")
    if text in BUNDLED_GUIDANCE_SCALES:
        return BUNDLED_GUIDANCE_SCALES[text]
    path = Path(text).expanduser()
    if not text or not path.is_dir():
        return DEFAULT_GUIDANCE_SCALE
    for name, folder in BUNDLED_MODELS.items():
        if path.resolve() == folder.resolve():
            return BUNDLED_GUIDANCE_SCALES[name]
    scale = read_training_config(path).get("validation_guidance_scale")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale >= 0:
        return float(scale)
    try:
        family = detect_family(path)
    except ValueError:
        return DEFAULT_GUIDANCE_SCALE
    if not is_flow_matching(family):
        return DEFAULT_GUIDANCE_SCALE
    from dreambooth.flow import family_module

    return family_module(family).GUIDANCE_SCALE


def _check_pipeline_folder(path: Path, shown_name: str) -> Path:
    if not path.is_dir():
        raise ModelLoadError(
            f"model '{shown_name}' is a file, not a diffusers pipeline folder. Pass the folder "
            "that holds model_index.json."
        )
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"model folder '{path}' is not a diffusers pipeline: model_index.json is missing. "
            "Pass a folder saved by `save_pretrained` (with unet/, vae/, text_encoder/, "
            "tokenizer/ and scheduler/)."
        )
    try:
        family = detect_family(path)
    except ValueError:  # UnknownArchitectureError: the loaders say what the folder lacks
        family = None
    required = flow_subfolders(family) if family and is_flow_matching(family) \
        else REQUIRED_SUBFOLDERS
    missing = [name for name in required if not (path / name).is_dir()]
    if missing:
        kind = PIPELINE_CLASSES.get(family, "Stable Diffusion")
        raise ModelLoadError(
            f"model folder '{path}' is not a complete {kind} pipeline: missing "
            f"{', '.join(f'{name}/' for name in missing)}."
        )
    return path


@dataclass
class DiffusionComponents:
    """The parts of a pipeline that training touches.

    `family` is one of families.FAMILIES. SDXL adds a second tokenizer and text encoder (the
    latter with a projection that gives the pooled embedding). The flow-matching families
    have a `transformer` instead of a `unet` (None for them): SD 3.x with CLIP-L, CLIP-G and
    T5 (`text_encoder_3`), FLUX.1 with CLIP-L and T5 (`text_encoder_2`).
    """

    path: Path
    family: str
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    # DDPMScheduler with the model's training config; the flow-matching families' own
    # FlowMatchEulerDiscreteScheduler, whose sigmas training samples.
    noise_scheduler: Any
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    transformer: Any = None
    tokenizer_3: Any = None
    text_encoder_3: Any = None

    @property
    def denoiser(self) -> Any:
        """The network training fine-tunes: the UNet, or the flow families' transformer."""
        return self.transformer if self.unet is None else self.unet

    @property
    def is_flow_matching(self) -> bool:
        return is_flow_matching(self.family)

    @property
    def prediction_type(self) -> str:
        """epsilon or v_prediction (UNet families); 'flow_matching' (velocity) otherwise."""
        if self.is_flow_matching:
            return "flow_matching"
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_encoders(self) -> list:
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
                if e is not None]

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]

    @property
    def pipeline_modules(self) -> dict[str, Any]:
        """Keyword arguments naming the modules of this family's diffusers pipeline."""
        if self.is_flow_matching:  # (a released T5 is passed as None)
            return {name: getattr(self, name) for name in flow_subfolders(self.family)
                    if name != "scheduler"}
        modules = dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                       unet=self.unet)
        if self.family == "sdxl":
            modules.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)
        return modules


def load_pipeline(model: str | Path, *, device: str | None = None, dtype: str = "auto"):
    """The text-to-image pipeline of `model` (anything `resolve_model_path` takes) on `device`,
    without safety checker or progress bars.

    `device` None picks cuda when available, else cpu; `dtype` "auto" is fp16 on cuda for the
    UNet families, bf16 on cuda for SD 3.x and FLUX.1 (their activations overflow fp16: black or
    NaN images) and fp32 elsewhere, otherwise one of DTYPES' names.
    """
    from diffusers.utils import deprecation_utils

    if dtype != "auto" and dtype not in DTYPES:
        raise ModelLoadError(f"dtype='{dtype}' is not one of: auto, {', '.join(DTYPES)}")
    path = resolve_model_path(model)
    family = detect_family(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = (("bf16" if is_flow_matching(family) else "fp16")
                 if torch.device(device).type == "cuda" else "fp32")
    logger.info("loading %s on %s as %s", path, device, dtype)
    extra = ({"safety_checker": None, "requires_safety_checker": False}
             if family in ("sd1", "sd2") else {})
    # diffusers renamed from_pretrained's `torch_dtype` to `dtype` (PR #14205); older releases
    # only know `torch_dtype`.
    extra["dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"] = \
        DTYPES[dtype]
    pipeline = pipeline_class(family).from_pretrained(path, local_files_only=True, **extra)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def load_components(name_or_path: str | Path, revision: str | None = None, *,
                    vae_name_or_path: str | Path | None = None, variant: str | None = None,
                    prediction_type: str | None = None,
                    single_file_config: str | Path | None = None) -> DiffusionComponents:
    """Load tokenizer(s), text encoder(s), VAE, UNet (or transformer) and the training noise
    scheduler.

    `prediction_type` overrides the scheduler's (and tells a single SD2 file's kind; UNet
    families only). `vae_name_or_path` swaps in another VAE (a pipeline folder with vae/ or a
    VAE folder), as diffusers' `--pretrained_vae_model_name_or_path` does for SDXL's fp16-safe
    VAE. `single_file_config`: see resolve_model_path.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    path = resolve_model_path(name_or_path, revision, prediction_type=prediction_type,
                              single_file_config=single_file_config)
    family = detect_family(path)
    weights = dict(variant=variant) if variant else {}
    if is_flow_matching(family):
        if prediction_type:
            raise ModelLoadError(
                f"prediction_type={prediction_type!r} does not apply to {family} models, which "
                "predict the flow velocity; drop --prediction_type")
        components = _load_flow_components(path, family, weights)
        if vae_name_or_path:
            components.vae = _load_vae(vae_name_or_path)
        return components
    try:
        components = DiffusionComponents(
            path=path, family=family,
            tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", **weights),
            vae=AutoencoderKL.from_pretrained(path / "vae", **weights),
            unet=UNet2DConditionModel.from_pretrained(path / "unet", **weights),
            noise_scheduler=DDPMScheduler.from_pretrained(path / "scheduler"),
        )
        if prediction_type:
            components.noise_scheduler = DDPMScheduler.from_config(
                components.noise_scheduler.config, prediction_type=prediction_type)
        if family == "sdxl":
            components.tokenizer_2 = AutoTokenizer.from_pretrained(path / "tokenizer_2")
            components.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                path / "text_encoder_2", **weights)
        if vae_name_or_path:
            components.vae = _load_vae(vae_name_or_path)
    except (OSError, ValueError, EnvironmentError) as error:
        raise ModelLoadError(f"could not load the pipeline in '{path}': {error}") from error
    return components


def _load_flow_components(path: Path, family: str, weights: dict) -> DiffusionComponents:
    """The parts of an SD 3.x or FLUX.1 folder, each with the class its model_index.json names
    (diffusers' transformer, VAE and FlowMatchEulerDiscreteScheduler; transformers' CLIP and T5
    encoders and tokenizers)."""
    import importlib

    index = json.loads((path / "model_index.json").read_text())
    parts: dict[str, Any] = {}
    try:
        for name in flow_subfolders(family):
            library, class_name = index[name]
            cls = getattr(importlib.import_module(library), class_name)
            if name == "scheduler" or name.startswith("tokenizer"):
                parts[name] = cls.from_pretrained(path / name)
            else:
                parts[name] = cls.from_pretrained(path / name, **weights)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as error:
        raise ModelLoadError(f"could not load the {family} pipeline in '{path}': "
                             f"{type(error).__name__}: {error}") from error
    scheduler = parts.pop("scheduler")
    return DiffusionComponents(path=path, family=family, unet=None, noise_scheduler=scheduler,
                               **parts)


def _load_vae(name_or_path: str | Path):
    from diffusers import AutoencoderKL

    path = Path(name_or_path)
    if path.is_dir():
        return AutoencoderKL.from_pretrained(path / "vae" if (path / "vae").is_dir() else path)
    return AutoencoderKL.from_pretrained(str(name_or_path), local_files_only=True)


def load_inference_scheduler(path: Path):
    """The sampling scheduler the pipeline ships (e.g. PNDM for SD 1.x), from model_index.json."""
    import diffusers

    index = json.loads((path / "model_index.json").read_text())
    _, class_name = index.get("scheduler", [None, "PNDMScheduler"])
    scheduler_class = getattr(diffusers, class_name, diffusers.PNDMScheduler)
    return scheduler_class.from_pretrained(path / "scheduler")


def assemble_pipeline(components: DiffusionComponents, *, scheduler=None):
    """A diffusers pipeline over the live modules (no copy), for sampling during training."""
    scheduler = scheduler or load_inference_scheduler(components.path)
    extra = ({"safety_checker": None, "feature_extractor": None,
              "requires_safety_checker": False} if components.family in ("sd1", "sd2") else {})
    pipeline = pipeline_class(components.family)(**components.pipeline_modules,
                                                 scheduler=scheduler, **extra)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
