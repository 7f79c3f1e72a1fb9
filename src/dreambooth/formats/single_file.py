"""Single-file Stable Diffusion checkpoints: what AUTOMATIC1111 and ComfyUI call a checkpoint.

A single file holds a whole pipeline under the original CompVis key names: `model.diffusion_model.*`
(UNet), `first_stage_model.*` (VAE) and the text encoder(s) of its family:

    sd1   `cond_stage_model.transformer.text_model.*`        (OpenAI CLIP ViT-L/14)
    sd2   `cond_stage_model.model.*`                         (OpenCLIP ViT-H/14)
    sdxl  `conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L/14) and
          `conditioner.embedders.1.model.*`                  (OpenCLIP ViT-bigG/14)

`load_single_file(path)` turns such a file into a diffusers pipeline folder with diffusers' own
`from_single_file`, offline: the architecture configs and the CLIP tokenizer of each family ship
in this package (`assets/`), so nothing is looked up on the Hub. The folder is written once into a
cache (`$DREAMBOOTH_CACHE`, default `~/.cache/dreambooth`) and reused.

Whether an SD 2.x file predicts noise (`epsilon`, the 512 px "base" models) or velocity
(`v_prediction`, the 768 px "768-v" models) cannot be read from its key names; see
`resolve_prediction_type` for the conventions followed, and pass `prediction_type` to be sure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth.families import (
    UNET_PREFIX,
    UnknownArchitectureError,
    detect_family,
    is_flow_matching,
)
from dreambooth.files import atomic_folder

# The readers live in checkpoint_files (below transformer_checkpoints, which single-file loading
# dispatches to); the public ones are importable from here as before.
from dreambooth.formats.checkpoint_files import (
    PICKLE_SUFFIXES,  # noqa: F401
    SAFETENSORS_SUFFIXES,  # noqa: F401
    TEXT_ENCODER_PREFIXES,
    VAE_PREFIX,
    CheckpointHeader,
    MismatchedWeightsError,
    SingleFileError,
    UnreadableCheckpointError,  # noqa: F401
    _is_safetensors,
    _read_tensor,
    _tree_digest,
    cache_root,
    file_sha256,
    quiet_dtype_deprecation,
    read_header,
    read_state_dict,
)

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")

ASSETS = Path(__file__).parent.parent / "assets"
CONFIG_NAMES = ("sd1", "sd2", "sd2-v", "sdxl")  # folders under assets/configs

# ComfyUI's marker key in v-prediction checkpoints (an empty tensor).
V_PRED_KEY = "v_pred"
# ComfyUI's SD 2.x test (comfy/supported_models.py): this bias has std > 0.09 in v models.
_SD2_V_PROBE_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


# --------------------------------------------------------------------------------------------
# What the keys look like (for errors; models.detect_family tells the family)
# --------------------------------------------------------------------------------------------

def resolve_prediction_type(header: CheckpointHeader, family: str,
                            prediction_type: str | None = None) -> tuple[str, str]:
    """(prediction type, why) for a checkpoint. The first rule that applies wins:

    1. the `prediction_type` argument ('epsilon' or 'v_prediction');
    2. a `v_pred` key in the file (ComfyUI's marker);
    3. ModelSpec metadata: `modelspec.prediction_type` ('v'/'v_prediction'/'epsilon') or a
       `modelspec.architecture` ending in '-v' (e.g. 'stable-diffusion-v2-768-v');
    4. an AUTOMATIC1111 config beside the file (`model.yaml` for `model.safetensors`) with
       `parameterization: "v"` (v_prediction) or without it (epsilon);
    5. SD 2.x only: ComfyUI's weight test, the std of
       `output_blocks.11.1.transformer_blocks.0.norm1.bias` above 0.09 means v_prediction;
    6. otherwise 'epsilon'.
    """
    if prediction_type is not None:
        if prediction_type not in PREDICTION_TYPES:
            raise SingleFileError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                                  f"got '{prediction_type}'")
        return prediction_type, "given"
    if V_PRED_KEY in header.tensors:
        return "v_prediction", f"the file has a '{V_PRED_KEY}' key"
    spec = header.metadata.get("modelspec.prediction_type", "").strip().lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v_prediction", f"modelspec.prediction_type = {spec!r}"
    if spec in ("epsilon", "eps"):
        return "epsilon", f"modelspec.prediction_type = {spec!r}"
    architecture = header.metadata.get("modelspec.architecture", "")
    if architecture.endswith("-v"):
        return "v_prediction", f"modelspec.architecture = {architecture!r}"
    sidecar = header.path.with_suffix(".yaml")
    if sidecar.is_file():
        import yaml

        try:
            params = (yaml.safe_load(sidecar.read_text()) or {}).get("model", {}).get("params", {})
        except (yaml.YAMLError, AttributeError) as error:
            raise SingleFileError(f"cannot read the model config '{sidecar}' beside the "
                                  f"checkpoint: {error}") from error
        if params.get("parameterization") == "v":
            return "v_prediction", f"'{sidecar.name}' says parameterization: v"
        return "epsilon", f"'{sidecar.name}' has no parameterization: v"
    if family == "sd2" and _SD2_V_PROBE_KEY in header.tensors:
        bias = _read_tensor(header.path, _SD2_V_PROBE_KEY).float()
        if torch.std(bias, unbiased=False).item() > 0.09:
            return "v_prediction", "ComfyUI's SD2 weight test (768-v model)"
        return "epsilon", "ComfyUI's SD2 weight test (512 base model)"
    return "epsilon", "default"


# --------------------------------------------------------------------------------------------
# Shipped configs
# --------------------------------------------------------------------------------------------

def config_folder(family: str, prediction_type: str | None = None) -> Path:
    """A complete diffusers pipeline folder without weights for `family`.

    `family` is 'sd1' (SD 1.5), 'sd2' (SD 2.1-base, 512 px, epsilon), 'sd2-v' (SD 2.1, 768 px,
    v-prediction) or 'sdxl' (SDXL base 1.0); `sd2` with `prediction_type='v_prediction'` means
    'sd2-v'. The package ships the JSON configs once per family and one copy of the CLIP BPE
    vocabulary; this assembles them into `<cache>/configs/<family>-<digest>/` on first use.
    """
    if family == "sd2" and prediction_type == "v_prediction":
        family = "sd2-v"
    if family not in CONFIG_NAMES:
        raise ValueError(f"unknown model family '{family}': expected one of "
                         f"{', '.join(CONFIG_NAMES)}")
    source = ASSETS / "configs" / family
    vocabulary = ASSETS / "clip_tokenizer"
    digest = hashlib.sha256((_tree_digest(source) + _tree_digest(vocabulary)).encode()).hexdigest()
    target = cache_root() / "configs" / f"{family}-{digest[:12]}"
    if (target / "model_index.json").is_file():
        return target
    with atomic_folder(target, existing="keep") as staging:  # another process may be first
        shutil.copytree(source, staging, dirs_exist_ok=True)
        for tokenizer in staging.glob("tokenizer*"):
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(vocabulary / name, tokenizer / name)
    return target


# --------------------------------------------------------------------------------------------
# Checking a file against an architecture (no weights are read)
# --------------------------------------------------------------------------------------------

@dataclass
class Mismatch:
    component: str
    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[tuple[str, tuple, tuple]]  # key, shape in file, shape the model wants

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)

    def describe(self, limit: int = 3) -> str:
        parts = []
        if self.missing:
            shown = ", ".join(self.missing[:limit])
            parts.append(f"{len(self.missing)} tensors missing (e.g. {shown})")
        if self.wrong_shape:
            shown = ", ".join(f"{k}: {tuple(a)} in the file, {tuple(b)} expected"
                              for k, a, b in self.wrong_shape[:limit])
            parts.append(f"{len(self.wrong_shape)} tensors of the wrong shape ({shown})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected tensors "
                         f"(e.g. {', '.join(self.unexpected[:limit])})")
        return f"{self.component}: " + "; ".join(parts)


def _meta_models(family: str, folder: Path) -> dict[str, torch.nn.Module]:
    """The pipeline's modules built from `folder`'s configs on the meta device (no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = {name: cls.from_config(cls.load_config(folder / name))
                  for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL))}
        for name in TEXT_ENCODER_PREFIXES[family]:
            config = CLIPTextConfig.from_pretrained(folder / name)
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            models[name] = cls(config)
    return models


def _text_encoder_view(checkpoint: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """diffusers' choice of weights for one CLIP text encoder, in its order: a CLIP layout whose
    width matches the model, else an OpenCLIP layout whose width matches (single_file_utils.
    create_diffusers_clip_model_from_ldm). Empty when diffusers would find none."""
    from diffusers.loaders import single_file_utils as sfu

    text = getattr(model, "text_model", model)
    width = text.embeddings.position_embedding.weight.shape[-1]
    names = sfu.CHECKPOINT_KEY_NAMES
    if sfu.is_clip_model(checkpoint) or (sfu.is_clip_sdxl_model(checkpoint) and
                                         checkpoint[names["clip_sdxl"]].shape[-1] == width):
        state = sfu.convert_ldm_clip_checkpoint(checkpoint)
    elif sfu.is_open_clip_model(checkpoint):
        state = sfu.convert_open_clip_checkpoint(model, checkpoint,
                                                 prefix="cond_stage_model.model.")
    elif sfu.is_open_clip_sdxl_model(checkpoint) and \
            checkpoint[names["open_clip_sdxl"]].shape[-1] == width:
        state = sfu.convert_open_clip_checkpoint(model, checkpoint,
                                                 prefix="conditioner.embedders.1.model.")
    else:
        return {}
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    return state


def diffusers_view(checkpoint: dict[str, torch.Tensor], family: str,
                   models: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """What diffusers' `from_single_file` makes of `checkpoint`: {component: diffusers state}.

    Uses diffusers' own conversion functions and its choice between them, so it is what a load
    would see; works on meta tensors. Raises KeyError naming a tensor the conversion needs.
    """
    from diffusers.loaders import single_file_utils as sfu

    unet, vae = models["unet"], models["vae"]
    view = {"unet": sfu.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)),
            "vae": sfu.convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))}
    for name in TEXT_ENCODER_PREFIXES[family]:
        view[name] = _text_encoder_view(checkpoint, models[name])
    return view


def compare_with_models(view: dict[str, dict[str, torch.Tensor]],
                        models: dict[str, torch.nn.Module]) -> list[Mismatch]:
    """Per component: tensors the model needs but the view lacks, extra ones, wrong shapes."""
    problems = []
    for name, model in models.items():
        wanted = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        got = {key: tuple(value.shape) for key, value in view.get(name, {}).items()
               if value is not None}
        mismatch = Mismatch(
            name,
            missing=sorted(set(wanted) - set(got)),
            unexpected=sorted(set(got) - set(wanted)),
            wrong_shape=[(k, got[k], wanted[k]) for k in sorted(set(got) & set(wanted))
                         if got[k] != wanted[k]])
        if mismatch:
            problems.append(mismatch)
    return problems


def check_checkpoint(header: CheckpointHeader, family: str, folder: Path) -> None:
    """Raise MismatchedWeightsError unless every weight of `folder`'s architecture is in the file
    with the right shape (extra tensors, such as EMA copies, are fine)."""
    models = _meta_models(family, folder)
    try:
        view = diffusers_view(header.tensors, family, models)
    except KeyError as error:
        raise MismatchedWeightsError(
            f"'{header.path}' is an incomplete {family.upper()} checkpoint: tensor {error} is "
            "missing.") from error
    problems = [p for p in compare_with_models(view, models) if p.missing or p.wrong_shape]
    if not problems:
        return
    hint = ""
    conv_in = header.tensors.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        hint = (f" Its UNet takes {conv_in.shape[1]} input channels (an inpainting or "
                "instruct-pix2pix model?); only text-to-image models (4 channels) are supported.")
    elif any(p.component == "vae" and len(p.missing) == sum(1 for _ in models["vae"].parameters())
             for p in problems):
        hint = f" It has no VAE ('{VAE_PREFIX}*'); such files need a separate VAE."
    raise MismatchedWeightsError(
        f"'{header.path}' does not fit the {family.upper()} architecture in '{folder}': "
        + "; ".join(p.describe() for p in problems) + "." + hint)


# --------------------------------------------------------------------------------------------
# Loading: single file -> cached diffusers folder
# --------------------------------------------------------------------------------------------

_SD1_TEXT = TEXT_ENCODER_PREFIXES["sd1"]["text_encoder"]  # cond_stage_model.transformer.text_model.


def _canonical_key(key: str) -> str:
    """SD1 text encoder keys written without `text_model.` (a converter run under transformers 5)
    are the same tensors; diffusers finds them only under the canonical name."""
    if key.startswith("cond_stage_model.transformer.") and not key.startswith(_SD1_TEXT):
        return _SD1_TEXT + key.removeprefix("cond_stage_model.transformer.")
    return key


def _canonical_header(header: CheckpointHeader) -> tuple[CheckpointHeader, bool]:
    renamed = {_canonical_key(key): tensor for key, tensor in header.tensors.items()}
    changed = renamed.keys() != header.tensors.keys()
    if changed:
        log.info("'%s': SD1 text encoder keys lack 'text_model.'; reading them as %s*",
                 header.path, _SD1_TEXT)
    return CheckpointHeader(header.path, renamed, header.metadata), changed


def _write_readable_copy(path: Path, target: Path) -> None:
    """A .ckpt, or keys that need renaming, as a safetensors file diffusers reads directly."""
    from safetensors.torch import save_file

    state = {_canonical_key(key): tensor for key, tensor in read_state_dict(path).items()}
    seen: set[int] = set()
    for key, tensor in state.items():  # safetensors refuses tensors that share memory
        pointer = tensor.untyped_storage().data_ptr()
        state[key] = tensor.clone().contiguous() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    save_file(state, str(target))


def load_single_file(path: str | Path, *, prediction_type: str | None = None,
                     config: str | Path | None = None,
                     torch_dtype: torch.dtype = torch.float32) -> Path:
    """Convert a single-file checkpoint into a diffusers pipeline folder; return the folder.

    - `path`: `.safetensors` (or a `.ckpt`, read with `torch.load(weights_only=True)`).
    - `prediction_type`: 'epsilon' or 'v_prediction'; None follows `resolve_prediction_type`.
      For SD 2.x it also picks the config: 'sd2' (512, epsilon) or 'sd2-v' (768, v-prediction).
    - `config`: a diffusers folder whose configs describe the architecture, instead of the
      shipped one for the detected family (for fine-tunes with another architecture, and tests).
      SD 3.x / FLUX.1 files need it: the diffusers folder of the model, which gives what the
      file lacks (transformer_checkpoints.transformer_file_to_folder).
    - `torch_dtype`: dtype of the weights written (float32 by default, as training wants).

    The folder lives under `<cache>/single-file/<sha256 prefix>-...` and is reused by later
    calls; it is written into a temporary folder first and renamed into place, so an interrupted
    conversion leaves nothing half-written. Raises SingleFileError subclasses (ValueError) naming
    the file for unreadable files, unknown architectures and missing or mis-shaped tensors.
    """
    path = Path(path).expanduser().resolve()
    header = read_header(path)
    try:
        family = detect_family(header.keys)
    except UnknownArchitectureError as error:
        raise UnknownArchitectureError(f"'{path}' is {error}") from None
    if is_flow_matching(family):  # SD 3.x / FLUX.1: the original transformer's names
        from dreambooth.formats.transformer_checkpoints import transformer_file_to_folder

        return transformer_file_to_folder(path, config, torch_dtype)
    header, renamed = _canonical_header(header)
    prediction, reason = resolve_prediction_type(header, family, prediction_type)
    folder = Path(config).expanduser().resolve() if config else config_folder(family, prediction)
    needed = ["model_index.json", "unet/config.json", "vae/config.json",
              *(f"{name}/config.json" for name in TEXT_ENCODER_PREFIXES[family])]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise SingleFileError(f"config folder '{folder}' cannot describe the {family.upper()} "
                              f"checkpoint '{path}': it lacks {', '.join(missing)}")
    check_checkpoint(header, family, folder)

    dtype_name = str(torch_dtype).removeprefix("torch.")
    name = f"{file_sha256(path)[:16]}-{family}-{prediction}-{dtype_name}"
    if config:
        name += f"-config-{_tree_digest(folder)[:8]}"
    target = cache_root() / "single-file" / name
    if (target / "model_index.json").is_file():
        log.info("single file '%s': using the converted pipeline in '%s'", path, target)
        return target
    log.info("converting single file '%s' (%s, %s: %s) into '%s'", path, family.upper(),
             prediction, reason, target)
    with atomic_folder(target, existing="keep") as staging:  # another process may be first
        source = path
        if renamed or not _is_safetensors(path):
            source = staging / "readable-copy.safetensors"
            _write_readable_copy(path, source)
        pipeline = _from_single_file(source, family, folder, torch_dtype)
        pipeline.scheduler.register_to_config(prediction_type=prediction)
        pipeline.save_pretrained(staging, safe_serialization=True)
        del pipeline
        if source != path:
            source.unlink()
        (staging / "single_file_source.json").write_text(json.dumps({
            "source": str(path), "family": family, "prediction_type": prediction,
            "prediction_type_reason": reason, "config": str(folder), "dtype": dtype_name,
        }, indent=2) + "\n")
    return target


def _from_single_file(source: Path, family: str, folder: Path, torch_dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    with quiet_dtype_deprecation():
        if family == "sdxl":
            return StableDiffusionXLPipeline.from_single_file(
                str(source), config=str(folder), local_files_only=True, torch_dtype=torch_dtype)
        return StableDiffusionPipeline.from_single_file(
            str(source), config=str(folder), local_files_only=True, torch_dtype=torch_dtype,
            safety_checker=None, requires_safety_checker=False)
