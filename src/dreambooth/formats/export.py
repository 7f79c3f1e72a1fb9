"""`dreambooth export`: a model in the formats the ecosystem loads, and the folder training writes.

- `diffusers`: a pipeline folder (`save_pretrained`, safetensors) in the chosen dtype.
- `single-file`: one `.safetensors` with CompVis key names, what AUTOMATIC1111 and ComfyUI call a
  checkpoint. diffusers reads such files (`from_single_file`) but writes none, so the key maps
  (formats/ldm_keys.py) invert diffusers' reader (`diffusers/loaders/single_file_utils.py`), and
  every export is checked against that reader before it is written: each tensor must come back
  under its name with its shape.
- `lora-diffusers` / `lora-kohya`: the LoRA files of a LoRA training run (formats/lora_files.py),
  in the chosen dtype; kohya keys are derived from the diffusers file when a run has only that.

`--merge_lora` fuses a LoRA into the base weights first (`lora_files.merge_lora`).
Every output is written beside its target and renamed into place, so a failed export leaves
nothing half-written and an existing file untouched.

Training writes its model here too (`save_trained_pipeline`): what
`StableDiffusionPipeline.from_pretrained(output_dir)` loads (weights only, safetensors, no
optimizer state), plus `training_config.yaml` (the resolved configuration, loadable with
`--config`) and `versions.json` (library versions).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import shutil
from pathlib import Path

import torch

from dreambooth.families import detect_family
from dreambooth.files import atomic_folder, atomic_path, atomic_write_text
from dreambooth.formats import ExportError
from dreambooth.formats.ldm_keys import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm
from dreambooth.formats.lora_files import (
    DIFFUSERS_LORA_FILE,
    export_lora,
    kohya_lora_file,
    merge_lora,
)
from dreambooth.formats.modelspec import modelspec
from dreambooth.formats.single_file import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    TEXT_ENCODER_PREFIXES,
    V_PRED_KEY,
    compare_with_models,
    diffusers_view,
    load_single_file,
    read_header,
)
from dreambooth.formats.transformer_checkpoints import transformer_single_file_state_dict
from dreambooth.formats.transformer_keys import TRANSFORMER_FAMILIES, transformer_variant
from dreambooth.models import (
    DTYPES,
    TRAINING_CONFIG_FILE,
    DiffusionComponents,
    load_pipeline,
    resolve_model_path,
    single_file_config_folder,
)

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "single-file", "lora-kohya", "lora-diffusers")
EXPORT_INFO_FILE = "export.json"  # what was exported from where, written beside the weights
VERSIONS_FILE = "versions.json"  # library versions, beside a trained model's weights
_LIBRARIES = ("dreambooth", "torch", "diffusers", "transformers", "lightning", "safetensors",
              "peft")

# --------------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------------

def _is_single_file(path: Path) -> bool:
    return path.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES and not path.is_dir()


def resolve_pipeline_folder(model: str | Path, prediction_type: str | None = None,
                            single_file_config: str | Path | None = None) -> Path:
    """A diffusers pipeline folder for a folder, a cached hub id or a single-file checkpoint
    (`single_file_config`: see models.resolve_model_path)."""
    path = Path(model).expanduser()
    if _is_single_file(path):
        return load_single_file(path, prediction_type=prediction_type,
                                config=single_file_config_folder(single_file_config, path))
    if path.is_dir() and not (path / "model_index.json").exists() and (
            (path / DIFFUSERS_LORA_FILE).exists() or kohya_lora_file(path) is not None):
        raise ExportError(
            f"'{path}' is the output of a LoRA run (it has {DIFFUSERS_LORA_FILE}), not a whole "
            "model: export it with --format lora-diffusers or lora-kohya, or fuse it into its "
            f"base with --model BASE --merge_lora {path / DIFFUSERS_LORA_FILE}")
    return resolve_model_path(model)


def _stored_dtype(folder: Path) -> torch.dtype:
    """dtype of the UNet's (or transformer's) weights on disk (float32 when it cannot be told)."""
    denoiser = "transformer" if (folder / "transformer").is_dir() else "unet"
    for file in sorted((folder / denoiser).glob("*.safetensors")):
        header = read_header(file)
        for tensor in header.tensors.values():
            if tensor.is_floating_point():
                return tensor.dtype
    return torch.float32


def single_file_state_dict(pipeline, family: str) -> dict[str, torch.Tensor]:
    """A live SD/SDXL pipeline's weights under CompVis names, checked against diffusers' reader:
    raises ExportError unless `from_single_file` would give back every tensor unchanged in name
    and shape. SD3 and FLUX have their own layouts (transformer_checkpoints.
    transformer_single_file_state_dict)."""
    if family not in TEXT_ENCODER_PREFIXES:
        raise ExportError(f"family '{family}' has no CompVis layout: SD3 and FLUX files are "
                          "written by transformer_checkpoints.transformer_single_file_state_dict")
    components = {"unet": pipeline.unet, "vae": pipeline.vae, "text_encoder": pipeline.text_encoder}
    if family == "sdxl":
        components["text_encoder_2"] = pipeline.text_encoder_2
    state = {**unet_to_ldm(pipeline.unet.state_dict(), pipeline.unet.config),
             **vae_to_ldm(pipeline.vae.state_dict(), pipeline.vae.config)}
    for name, prefix in TEXT_ENCODER_PREFIXES[family].items():
        convert = clip_to_ldm if prefix.endswith("text_model.") else open_clip_to_ldm
        state.update(convert(components[name].state_dict(), prefix))
    meta = {key: torch.empty(value.shape, dtype=value.dtype, device="meta")
            for key, value in state.items()}
    problems = compare_with_models(diffusers_view(meta, family, components), components)
    if problems:
        raise ExportError(f"the {family.upper()} single-file export would not load back intact "
                          "with diffusers' from_single_file: "
                          + "; ".join(p.describe() for p in problems))
    return state


# --------------------------------------------------------------------------------------------
# export_model
# --------------------------------------------------------------------------------------------

def _single_output_path(output: Path) -> Path:
    if output.is_dir():
        raise ExportError(f"output '{output}' is a folder; name the .safetensors file to write")
    if output.suffix.lower() != ".safetensors":
        raise ExportError(f"output '{output}' must end in .safetensors (this tool writes no "
                          "pickles)")
    return output


def export_model(model: str | Path, fmt: str, output: str | Path, *, dtype: str | None = None,
                 merge_lora_path: str | Path | None = None, lora_scale: float = 1.0,
                 prediction_type: str | None = None,
                 single_file_config: str | Path | None = None) -> Path:
    """Write `model` in format `fmt` to `output`; return the path written.

    - `model`: a diffusers folder (a training output_dir), a cached hub id or a single-file
      checkpoint; for the LoRA formats, a LoRA training output folder or LoRA .safetensors file.
    - `fmt`: one of FORMATS. `output`: a folder for 'diffusers' (must not exist or be empty),
      a `.safetensors` path otherwise (replaced only once the new file is complete).
    - `dtype`: 'fp32', 'fp16' or 'bf16'; None keeps the dtype the model is stored in.
    - `merge_lora_path` / `lora_scale`: fuse this LoRA into the model first (not for LoRA formats).
    - `prediction_type`: for a single-file SD 2.x input whose type cannot be told (see
      single_file.resolve_prediction_type).
    - `single_file_config`: for a single-file input, the diffusers folder of the model it was
      made from (needed for SD 3.x / FLUX.1 files; see models.resolve_model_path).

    Args:
        model: A diffusers folder (training output_dir), a cached hub id, a .safetensors/.ckpt
            single file, or for lora-* formats a LoRA run's output_dir or LoRA .safetensors.
        fmt: diffusers folder, single-file checkpoint (A1111/ComfyUI), or LoRA in the kohya or
            diffusers layout.
        output: Folder for diffusers, .safetensors file otherwise; written atomically, an
            existing diffusers folder must be empty.
        dtype: Weight dtype written (default: as the model is stored).
        merge_lora_path: Fuse this LoRA (.safetensors or LoRA output_dir) into the model before
            exporting.
        lora_scale: Strength of the merged LoRA (W + scale * alpha/r * BA).
        prediction_type: For a single-file SD 2.x model whose type the file does not tell
            (768-v models use v_prediction).
        single_file_config: For a single-file model: the diffusers folder (or cached id) of
            the model it was made from, as diffusers' from_single_file(config=...); SD 3.x and
            FLUX.1 files need it.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}': choose one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype] if dtype else None
    output = Path(output).expanduser()
    if fmt.startswith("lora-"):
        if merge_lora_path is not None:
            raise ExportError("--merge_lora fuses a LoRA into a full model; it does not apply "
                              f"to --format {fmt}")
        return export_lora(model, _single_output_path(output), kohya=fmt == "lora-kohya",
                           dtype=torch_dtype)
    if fmt == "single-file":
        _single_output_path(output)
    elif output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ExportError(f"output '{output}' already exists and is not an empty folder; "
                          "choose a new path (nothing was written)")

    folder = resolve_pipeline_folder(model, prediction_type, single_file_config)
    family = detect_family(folder)
    torch_dtype = torch_dtype or _stored_dtype(folder)
    pipeline = load_pipeline(folder, device="cpu", dtype="fp32")
    if merge_lora_path is not None:
        merge_lora(pipeline, merge_lora_path, family, lora_scale)
    # SD3/FLUX learn a rectified-flow velocity: no prediction type in the SD sense.
    prediction = (None if family in TRANSFORMER_FAMILIES
                  else pipeline.scheduler.config.get("prediction_type", "epsilon"))
    provenance = {"source": str(model), "format": fmt, "family": family,
                  "dtype": str(torch_dtype).removeprefix("torch."), "prediction_type": prediction,
                  "merged_lora": str(merge_lora_path) if merge_lora_path is not None else None,
                  "lora_scale": lora_scale if merge_lora_path is not None else None,
                  "versions": library_versions()}
    if fmt == "single-file":
        state = (transformer_single_file_state_dict(pipeline, family)
                 if family in TRANSFORMER_FAMILIES else single_file_state_dict(pipeline, family))
        state = {key: value.to(torch_dtype).contiguous() if value.is_floating_point() else value
                 for key, value in state.items()}
        if prediction == "v_prediction":
            state[V_PRED_KEY] = torch.tensor([])  # ComfyUI's marker; readers ignore it
        source = Path(str(model))
        title = source.stem if _is_single_file(source) else source.name
        variant = None
        if family in TRANSFORMER_FAMILIES:
            variant = transformer_variant(family, pipeline.transformer.config)
            resolution = pipeline.default_sample_size * pipeline.vae_scale_factor
        else:
            resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        metadata = {"format": "pt",
                    **modelspec(family, prediction, title=title, resolution=resolution,
                                variant=variant),
                    "dreambooth.export": json.dumps(provenance, sort_keys=True)}
        from safetensors.torch import save_file

        with atomic_path(output) as tmp:
            save_file(state, str(tmp), metadata=metadata)
        log.info("wrote %s single file %s (%s)", family.upper(), output, torch_dtype)
        return output

    pipeline.to(dtype=torch_dtype)
    with atomic_folder(output) as staging:  # replaces an empty folder, checked above
        pipeline.save_pretrained(staging, safe_serialization=True)
        for_older_stacks(staging, folder)
        (staging / EXPORT_INFO_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if (folder / TRAINING_CONFIG_FILE).is_file():  # the run that made it, when there is one
            shutil.copyfile(folder / TRAINING_CONFIG_FILE, staging / TRAINING_CONFIG_FILE)
    return output


# --------------------------------------------------------------------------------------------
# The folder a training run writes
# --------------------------------------------------------------------------------------------

def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def save_trained_pipeline(components: DiffusionComponents, output_dir: str | Path, *,
                          config_yaml: str) -> Path:
    """Save base pipeline + trained UNet/text encoder into `output_dir` as a diffusers folder.

    The parts training did not touch (scheduler, safety checker ...) are taken from the base
    pipeline as it is on disk. The new folder is written beside `output_dir` first and moved
    into it entry by entry, so a crash mid-save leaves either the old or the new entries, and
    the checkpoints and logs in `output_dir` stay.
    """
    from diffusers import DiffusionPipeline

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    modules = components.pipeline_modules
    for module in (components.unet, components.vae, *components.text_encoders):
        module.to("cpu")
        if module.dtype != torch.float32:  # frozen parts ran in half precision on the GPU
            module.to(dtype=torch.float32)
    pipeline = DiffusionPipeline.from_pretrained(components.path, **modules,
                                                 local_files_only=True)
    with atomic_folder(output_dir, existing="merge") as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        for_older_stacks(staging, components.path)
        write_run_files(staging, config_yaml)  # moved in with the weights they describe
    return output_dir


def for_older_stacks(folder: Path, base: Path) -> None:
    """Make a saved pipeline folder load in the transformers 4.x and diffusers 0.3x stacks
    users still run, as well as in this one:

    - transformers 5 writes CLIP text models without the `text_model.` level in their weight
      names; 4.x then finds none of them and initialises the encoder at random (with only a
      warning). Names are written with it, which 5 reads as well. Only CLIP's: T5 encoders
      (SD3, FLUX) have no such level.
    - A tokenizer saved by transformers 5 may hold only `tokenizer.json`; the slow
      CLIPTokenizer that model_index.json names needs `vocab.json` and `merges.txt`, copied
      from the base model when it has them.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    for encoder in sorted(folder.glob("text_encoder*")):
        if not _is_clip(encoder):
            continue  # T5 (SD3, FLUX) never had the level
        for weights in sorted(encoder.glob("*.safetensors")):
            with safe_open(str(weights), framework="pt") as handle:
                metadata = handle.metadata() or {"format": "pt"}
                state = {_with_text_model(key): handle.get_tensor(key) for key in handle.keys()}
            save_file(state, str(weights), metadata=metadata)
        for index in encoder.glob("*.safetensors.index.json"):
            content = json.loads(index.read_text())
            content["weight_map"] = {_with_text_model(key): file
                                     for key, file in content["weight_map"].items()}
            index.write_text(json.dumps(content, indent=2) + "\n")
    for tokenizer in sorted(folder.glob("tokenizer*")):
        for name in ("vocab.json", "merges.txt"):
            source = base / tokenizer.name / name
            if source.is_file() and not (tokenizer / name).exists():
                shutil.copyfile(source, tokenizer / name)


def _is_clip(encoder: Path) -> bool:
    try:
        config = json.loads((encoder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return str(config.get("model_type", "")).startswith("clip")


def _with_text_model(key: str) -> str:
    """`encoder.layers.0...` -> `text_model.encoder.layers.0...` (CLIP's projection stays)."""
    if key.startswith(("text_model.", "text_projection.")):
        return key
    return "text_model." + key


def write_run_files(output_dir: Path, config_yaml: str) -> None:
    """The resolved configuration and library versions, beside the weights."""
    atomic_write_text(output_dir / TRAINING_CONFIG_FILE, config_yaml)
    atomic_write_text(output_dir / VERSIONS_FILE, json.dumps(library_versions(), indent=2) + "\n")
