"""Single-file checkpoints of SD 3.x and FLUX.1 in the layouts their makers ship.

    flux  transformer only, BFL names without prefix (`double_blocks.*`, `single_blocks.*`,
          `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`, `final_layer`): what BFL
          publishes as `flux1-dev.safetensors` and ComfyUI loads from models/diffusion_models;
          the VAE and text encoders come separately.
    sd3   the whole pipeline as Stability ships `sd3_medium_incl_clips_t5xxlfp16.safetensors`:
          `model.diffusion_model.*` (MMDiT names: `joint_blocks.*`, `x_embedder`,
          `context_embedder`, `t_embedder`, `y_embedder`, `final_layer`), `first_stage_model.*`
          (VAE, CompVis names), `text_encoders.clip_l.transformer.*`,
          `text_encoders.clip_g.transformer.*` and `text_encoders.t5xxl.transformer.*`
          (transformers names).

Writing inverts diffusers' reader (`diffusers/loaders/single_file_utils.py`), with the key map
of formats/transformer_keys.py, and every export is checked against a reader before it is
written. SD3 files load back through diffusers' own `StableDiffusion3Pipeline.from_single_file`.
diffusers' FLUX reader assumes FLUX.1's width (3072, MLP 12288), so FLUX files of any width are
read with `transformer_keys.from_original`, which cuts at the model's own widths and gives what
diffusers gives at FLUX.1's (tests/test_flow_formats.py checks both against each other).

diffusers' SD3 reader gives CLIP-L an identity `text_projection` (SD3 uses CLIP-L's pooled
output unprojected); the file keeps the model's own, as ComfyUI reads it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dreambooth.formats import ExportError
from dreambooth.formats.checkpoint_files import (
    VAE_PREFIX,
    MismatchedWeightsError,
    SingleFileError,
    read_header,
    read_state_dict,
)
from dreambooth.formats.transformer_keys import (
    TRANSFORMER_PREFIX,
    from_original,
    to_original,
    transformer_file_family,
)

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent.parent / "assets"
# Shipped transformer configs (the released models' config.json) by variant.
TRANSFORMER_CONFIGS = {"flux-dev": "flux-dev", "flux-schnell": "flux-schnell",
                       "sd3-medium": "sd3", "sd3.5-large": "sd3.5-large",
                       "sd3.5-medium": "sd3.5-medium"}
SD3_TEXT_ENCODERS = {"text_encoder": "text_encoders.clip_l.transformer.",
                     "text_encoder_2": "text_encoders.clip_g.transformer.",
                     "text_encoder_3": "text_encoders.t5xxl.transformer."}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _clip_names(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text model -> `<prefix>text_model.*` (+ `<prefix>text_projection.*`):
    the names of transformers 4, which SD3 files keep (transformers 5 dropped `text_model.`
    from CLIPTextModel's state dict)."""
    result = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        result[prefix + key] = tensor
    return result


def _t5_names(model, prefix: str) -> dict[str, torch.Tensor]:
    """T5EncoderModel -> `<prefix>*`. The model ties `encoder.embed_tokens.weight` to
    `shared.weight`; both are written (safetensors stores no shared tensors, so as a copy),
    since diffusers' reader fills neither from the other."""
    state = model.state_dict()
    return {prefix + key: tensor.clone() if key == "encoder.embed_tokens.weight" else tensor
            for key, tensor in state.items()}


def transformer_single_file_state_dict(pipeline, family: str) -> dict[str, torch.Tensor]:
    """A live SD3 or FLUX pipeline's single file (see the module docstring), checked against a
    reader: raises ExportError unless every tensor of the written parts comes back under its
    diffusers name with its shape."""
    from dreambooth.formats.ldm_keys import vae_to_ldm

    transformer = pipeline.transformer
    original = to_original(transformer.state_dict(), family)
    _check_transformer(original, family, transformer)
    if family == "flux":
        return original
    state = {TRANSFORMER_PREFIX + key: value for key, value in original.items()}
    state.update(vae_to_ldm(pipeline.vae.state_dict(), pipeline.vae.config))
    for name in ("text_encoder", "text_encoder_2"):
        state.update(_clip_names(getattr(pipeline, name).state_dict(), SD3_TEXT_ENCODERS[name]))
    if pipeline.text_encoder_3 is not None:
        state.update(_t5_names(pipeline.text_encoder_3, SD3_TEXT_ENCODERS["text_encoder_3"]))
    projection = pipeline.text_encoder.state_dict().get("text_projection.weight")
    if projection is not None and not torch.equal(
            projection, torch.eye(*projection.shape, dtype=projection.dtype)):
        log.warning("CLIP-L's text_projection is not the identity: ComfyUI reads it from the "
                    "single file, diffusers' from_single_file replaces it with the identity")
    _check_sd3_parts(state, pipeline)
    return state


def _check_transformer(original: dict[str, torch.Tensor], family: str, transformer) -> None:
    shapes = {key: tuple(value.shape) for key, value in transformer.state_dict().items()}
    try:
        back = from_original(original, family, shapes)
    except KeyError as error:
        raise ExportError(f"the {family} single-file export lacks {error}") from None
    wrong = [key for key, shape in shapes.items()
             if key not in back or tuple(back[key].shape) != shape]
    if wrong:
        raise ExportError(f"the {family} single-file export would not load back intact: "
                          f"{len(wrong)} transformer tensors missing or misshaped "
                          f"(e.g. {wrong[0]})")


def _check_sd3_parts(state: dict[str, torch.Tensor], pipeline) -> None:
    """diffusers' own SD3 conversions of the VAE and text encoders (on meta tensors) must give
    back every tensor of the live modules with its shape."""
    from diffusers.loaders import single_file_utils as sfu

    meta = {key: torch.empty(value.shape, dtype=value.dtype, device="meta")
            for key, value in state.items()}
    views = {"vae": sfu.convert_ldm_vae_checkpoint(meta, dict(pipeline.vae.config))}
    for name in ("text_encoder", "text_encoder_2"):
        views[name] = {key.removeprefix("text_model."): value for key, value in
                       sfu.convert_ldm_clip_checkpoint(meta, SD3_TEXT_ENCODERS[name]).items()}
    if pipeline.text_encoder_3 is not None:
        views["text_encoder_3"] = sfu.convert_sd3_t5_checkpoint_to_diffusers(meta)
    for name, view in views.items():
        module = getattr(pipeline, name)
        wanted = {key.removeprefix("text_model."): tuple(value.shape)
                  for key, value in module.state_dict().items()
                  if not key.endswith("position_ids")}
        got = {key: tuple(value.shape) for key, value in view.items()}
        wrong = [key for key, shape in wanted.items() if got.get(key) != shape]
        if wrong:
            raise ExportError(f"the sd3 single-file export of {name} would not load back "
                              f"intact with diffusers' from_single_file: {len(wrong)} tensors "
                              f"missing or misshaped (e.g. {wrong[0]})")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def transformer_config(variant: str) -> Path:
    """The shipped `config.json` folder of a released transformer (TRANSFORMER_CONFIGS)."""
    if variant not in TRANSFORMER_CONFIGS:
        raise SingleFileError(f"no shipped transformer config for '{variant}': pass a config "
                              f"folder; shipped are {', '.join(TRANSFORMER_CONFIGS)}")
    return ASSETS / "configs" / TRANSFORMER_CONFIGS[variant] / "transformer"


def file_variant(keys, family: str) -> str:
    """The released model a transformer file is, from its key names (guidance_in: FLUX.1-dev;
    ln_q: SD 3.5; attn2: SD 3.5 medium)."""
    keys = {key.removeprefix(TRANSFORMER_PREFIX) for key in keys}
    if family == "flux":
        return "flux-dev" if "guidance_in.in_layer.weight" in keys else "flux-schnell"
    if not any(".attn.ln_q." in key for key in keys):
        return "sd3-medium"
    return "sd3.5-medium" if any(".attn2." in key for key in keys) else "sd3.5-large"


def load_transformer_file(path: str | Path, *, config: str | Path | None = None,
                          torch_dtype: torch.dtype = torch.float32):
    """The diffusers SD3Transformer2DModel / FluxTransformer2DModel in a single file (a FLUX
    transformer file, or the `model.diffusion_model.*` part of an SD3 checkpoint).

    `config`: a folder with the transformer's `config.json` (a diffusers pipeline folder, whose
    `transformer/` is used, or a transformer folder); None takes the shipped config of the
    released model the keys show. Raises SingleFileError subclasses naming the file."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    path = Path(path).expanduser()
    header = read_header(path)  # clear errors for truncated files and unsafe pickles
    family = transformer_file_family(header.keys)
    if family is None:
        raise SingleFileError(f"'{path}' holds no SD3 or FLUX transformer (no "
                              "'double_blocks.*' or 'joint_blocks.*' keys)")
    if config is None:
        folder = transformer_config(file_variant(header.keys, family))
    else:
        folder = Path(config).expanduser()
        if (folder / "transformer" / "config.json").is_file():
            folder = folder / "transformer"
    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    try:
        model_config = cls.load_config(str(folder))
    except (OSError, ValueError) as error:
        raise SingleFileError(f"cannot read the transformer config in '{folder}': {error}") \
            from None
    if model_config.get("_class_name", cls.__name__) != cls.__name__:
        raise SingleFileError(f"'{path}' is a {family} transformer but the config in '{folder}' "
                              f"is a {model_config['_class_name']}: pass the config of a "
                              f"{family} model")
    with torch.device("meta"):
        shapes = {key: tuple(value.shape)
                  for key, value in cls.from_config(model_config).state_dict().items()}
    state = {key.removeprefix(TRANSFORMER_PREFIX): value
             for key, value in read_state_dict(path).items()
             if family == "flux" or key.startswith(TRANSFORMER_PREFIX)}
    try:
        converted = from_original(state, family, shapes)
    except KeyError as error:
        raise MismatchedWeightsError(f"'{path}' is an incomplete {family} transformer: tensor "
                                     f"{error} is missing") from None
    except ValueError as error:
        raise MismatchedWeightsError(
            f"'{path}' does not fit the {family} transformer config in '{folder}' ({error}); "
            "pass the config of the model the file was made from") from None
    wrong = [(key, tuple(converted[key].shape), shape) for key, shape in shapes.items()
             if tuple(converted[key].shape) != shape]
    if wrong:
        key, got, want = wrong[0]
        raise MismatchedWeightsError(
            f"'{path}' does not fit the {family} transformer config in '{folder}': "
            f"{len(wrong)} tensors of the wrong shape (e.g. {key}: {got} in the file, {want} "
            "expected); pass the config of the model the file was made from")
    model = cls.from_config(model_config)
    model.load_state_dict({k: v.to(torch_dtype) for k, v in converted.items()}, strict=True)
    return model.to(torch_dtype).eval()


def sd3_pipeline_from_single_file(path: str | Path, config: str | Path,
                                  torch_dtype: torch.dtype = torch.float32):
    """An SD3 checkpoint with VAE and text encoders, through diffusers' own reader, offline:
    `config` is a diffusers SD3 pipeline folder (its configs and tokenizers are used)."""
    from diffusers import StableDiffusion3Pipeline

    from dreambooth.formats.checkpoint_files import quiet_dtype_deprecation

    header = read_header(path)
    if transformer_file_family(header.keys) != "sd3" or \
            not any(key.startswith(VAE_PREFIX) for key in header.keys):
        raise SingleFileError(f"'{path}' is not a whole SD3 checkpoint (model.diffusion_model."
                              f"joint_blocks.* and {VAE_PREFIX}*)")
    with quiet_dtype_deprecation():
        return StableDiffusion3Pipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, torch_dtype=torch_dtype)


def transformer_file_to_folder(path: str | Path, base: str | Path | None,
                               torch_dtype: torch.dtype = torch.float32) -> Path:
    """A diffusers pipeline folder for an SD3/FLUX single file, cached like
    single_file.load_single_file's. The file's parts replace those of `base`, a diffusers
    pipeline folder of the same family (e.g. a download of black-forest-labs/FLUX.1-dev),
    which gives what the file lacks: the tokenizers always (T5's vocabulary is not shipped in
    this package), and for a transformer-only file the VAE and text encoders too."""
    from dreambooth.families import detect_family, pipeline_class
    from dreambooth.files import atomic_folder
    from dreambooth.formats.checkpoint_files import (
        _tree_digest,
        cache_root,
        file_sha256,
        quiet_dtype_deprecation,
    )

    path = Path(path).expanduser().resolve()
    header = read_header(path)
    family = transformer_file_family(header.keys)
    if family is None:
        raise SingleFileError(f"'{path}' holds no SD3 or FLUX transformer")
    name = {"flux": "FLUX.1", "sd3": "SD 3.x"}[family]
    if base is None:
        raise SingleFileError(
            f"'{path}' is a {name} single file without the tokenizers (and, if transformer-"
            "only, the VAE and text encoders) it needs: pass the diffusers folder of the "
            f"{name} model it was made from with --single_file_config FOLDER "
            "(single_file_config= in Python)")
    base = Path(base).expanduser().resolve()
    if detect_family(base) != family:
        raise SingleFileError(f"'{base}' is not a {name} pipeline folder, so it cannot complete "
                              f"the {family} file '{path}'")
    dtype_name = str(torch_dtype).removeprefix("torch.")
    target = cache_root() / "single-file" / (
        f"{file_sha256(path)[:16]}-{family}-{dtype_name}-base-{_tree_digest(base)[:8]}")
    if (target / "model_index.json").is_file():
        return target
    whole = family == "sd3" and any(key.startswith(VAE_PREFIX) for key in header.keys)
    with atomic_folder(target, existing="keep") as staging:
        if whole:
            pipeline = sd3_pipeline_from_single_file(path, base, torch_dtype)
        else:
            transformer = load_transformer_file(path, config=base, torch_dtype=torch_dtype)
            with quiet_dtype_deprecation():
                pipeline = pipeline_class(family).from_pretrained(
                    base, transformer=transformer, torch_dtype=torch_dtype,
                    local_files_only=True)
        pipeline.save_pretrained(staging, safe_serialization=True)
    log.info("converted %s single file '%s' into '%s'", family, path, target)
    return target
