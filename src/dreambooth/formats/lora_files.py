"""LoRA files: the two layouts, their metadata, finding, checking, merging and exporting them.

Two files come out of a LoRA run, both safetensors with string metadata:
- `pytorch_lora_weights.safetensors`: diffusers/peft layout (`unet.<module>.lora_A.weight` ...),
  with each adapter's LoraConfig in the metadata so `pipe.load_lora_weights(dir)` restores the
  scale alpha / rank exactly;
  text-encoder keys as `text_encoder.text_model.encoder...` (the layout of transformers 4 that
  diffusers 0.3x and ComfyUI expect; diffusers drops the level again for transformers 5);
- `{output_name}.safetensors` (kohya's `--output_name`, default: the output_dir's name, since
  AUTOMATIC1111 names a LoRA by its file's basename): kohya layout (`lora_unet_<module_path>
  .lora_down.weight`, `.lora_up.weight`, `.alpha`; `lora_te_` for the text encoder; DoRA adds
  LyCORIS' `.dora_scale`) that AUTOMATIC1111 and ComfyUI load, with the metadata kohya's own
  trainer writes (`ss_*`, `sshs_*` hashes) and ModelSpec keys. It is derived from the first by
  `peft_to_kohya`, as `dreambooth export --format lora-kohya` derives it.

`merge_lora` fuses a LoRA into the base weights (diffusers `load_lora_weights` + `fuse_lora` +
`unload_lora_weights`): W <- W + scale * (alpha / rank) * B A.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from dreambooth.files import atomic_path
from dreambooth.formats.infotext import tensor_data_sha256
from dreambooth.formats.modelspec import modelspec
from dreambooth.formats.single_file import read_header
from dreambooth.formats.transformer_keys import (
    TRANSFORMER_FAMILIES,
    ModuleLora,
    lora_from_original,
    lora_to_original,
    module_map,
    to_original,
)
from dreambooth.models import read_training_config, resolve_model_path
from dreambooth.train.lora import LoraSettings, lora_state_dicts

log = logging.getLogger(__name__)

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' loaders look for
# The kohya file's fixed name before `output_name` existed; runs of that time are still found.
LEGACY_KOHYA_LORA_FILE = "pytorch_lora_weights_kohya.safetensors"
# kohya's `ss_base_model_version`: its SD trainers' names; FLUX is "flux1" (library/flux_utils.py)
# and SD3 the MMDiT's model type (library/sd3_utils.py): "medium" (3.0), "5-large", "5-medium".
_KOHYA_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0",
                             "flux-dev": "flux1", "flux-schnell": "flux1",
                             "sd3-medium": "medium", "sd3.5-large": "5-large",
                             "sd3.5-medium": "5-medium"}
# The parts of each family's pipeline a LoRA file may adapt (diffusers' LoRA loader mixins).
_LORA_COMPONENTS = {"sd1": ("unet", "text_encoder"), "sd2": ("unet", "text_encoder"),
                    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
                    "sd3": ("transformer", "text_encoder", "text_encoder_2"),
                    "flux": ("transformer", "text_encoder")}
_KOHYA_NETWORK_MODULE = {"sd3": "networks.lora_sd3", "flux": "networks.lora_flux"}


class LoraFileError(ValueError):
    """A LoRA file that cannot be found, read, converted or applied; the message names it."""


def default_output_name(output_dir: str | Path) -> str:
    """kohya's `--output_name` when none is given: the output_dir's name."""
    return Path(output_dir).expanduser().resolve().name or "dreambooth"


def kohya_lora_file(folder: str | Path) -> Path | None:
    """A LoRA run's kohya file: `{output_name}.safetensors` as its training_config.yaml records
    (default: the folder's name); in a renamed folder, the one file whose `ss_output_name` is
    its own name; the fixed name older runs used; None when it has none."""
    folder = Path(folder)
    name = read_training_config(folder).get("output_name") or default_output_name(folder)
    candidates = [folder / f"{name}.safetensors"]
    candidates += [path for path in sorted(folder.glob("*.safetensors"))
                   if path.name != DIFFUSERS_LORA_FILE and _output_name(path) == path.stem]
    candidates.append(folder / LEGACY_KOHYA_LORA_FILE)
    for candidate in candidates:
        if candidate.is_file() and candidate.name != DIFFUSERS_LORA_FILE:
            return candidate
    return None


def _output_name(path: Path) -> str | None:
    try:
        return read_header(path).metadata.get("ss_output_name")
    except (OSError, ValueError):
        return None  # not a readable safetensors file: not a kohya LoRA of this run


def lora_file(lora: str | Path, *, kohya: bool = False) -> Path:
    """The LoRA weights file (resolved) for a `.safetensors` path or a folder holding one (a LoRA
    run's output_dir): the folder's DIFFUSERS_LORA_FILE, or with `kohya` its kohya file
    (`kohya_lora_file`) when it has one. Generation, serving and export all find their LoRA
    files here."""
    path = Path(lora).expanduser()
    if path.is_dir():
        kohya_path = kohya_lora_file(path) if kohya else None
        path = kohya_path or path / DIFFUSERS_LORA_FILE
    if not path.is_file():
        raise LoraFileError(
            f"lora '{lora}' not found: pass a LoRA .safetensors file (diffusers/peft or kohya "
            f"format) or a folder holding {DIFFUSERS_LORA_FILE} (a LoRA run's output_dir)")
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(
            f"lora '{lora}' is not a .safetensors file; pickled LoRA files can run code when "
            "loaded and are not read")
    return path.resolve()


# --------------------------------------------------------------------------------------------
# Which model a LoRA fits
# --------------------------------------------------------------------------------------------

def lora_family(keys: list[str], metadata: dict[str, str]) -> str | None:
    """The family a LoRA was made for, from its metadata or family-only key names; None if
    silent (SD 1.x and 2.x LoRAs have the same names)."""
    architecture = metadata.get("modelspec.architecture", "")
    version = metadata.get("ss_base_model_version", "")
    if architecture.startswith("flux-1") or version.startswith("flux"):
        return "flux"
    if architecture.startswith(("stable-diffusion-v3", "stable-diffusion-3")) \
            or version in ("medium", "5-large", "5-medium") or version.startswith("sd3"):
        return "sd3"
    if "-xl-" in architecture or version.startswith("sdxl"):
        return "sdxl"
    if architecture.startswith("stable-diffusion-v2") or version.startswith("sd_v2") \
            or metadata.get("ss_v2") == "True":
        return "sd2"
    if architecture.startswith("stable-diffusion-v1") or version.startswith("sd_v1"):
        return "sd1"
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_",
                         "transformer.single_transformer_blocks.")) for k in keys):
        return "flux"
    if any(k.startswith(("lora_unet_joint_blocks_", "transformer.pos_embed."))
           or ".attn2.to_" in k and k.startswith("transformer.") for k in keys):
        return "sd3"
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys) and \
            not any(k.startswith("transformer.") for k in keys):
        return "sdxl"
    return None


_FAMILY_WIDTH = {768: "SD1", 1024: "SD2", 2048: "SDXL"}


def check_lora_fits(lora_path: Path, pipeline, family: str) -> None:
    """Refuse a LoRA made for another family: by its metadata, by family-only keys, and by the
    width of the layers it adapts (UNets: the cross-attention keys, 768 SD1, 1024 SD2, 2048
    SDXL; transformers: each diffusers-layout module's input width)."""
    header = read_header(lora_path)
    keys = header.keys
    made_for = lora_family(keys, header.metadata)
    if made_for is not None and made_for != family:
        raise LoraFileError(f"LoRA '{lora_path}' was made for {made_for.upper()} (its metadata / "
                            f"keys say so) but the model is {family.upper()}: use a LoRA trained "
                            "on this model's family")
    if family in TRANSFORMER_FAMILIES:
        _check_transformer_widths(lora_path, header.tensors, pipeline.transformer, family)
        return
    width = pipeline.unet.config.cross_attention_dim
    for key, tensor in header.tensors.items():
        is_down = key.endswith(("lora_A.weight", "lora_down.weight", "lora.down.weight"))
        if is_down and re.search(r"attn2[._]to_[kv]", key) and "unet" in key:
            if tensor.shape[-1] != width:
                guess = _FAMILY_WIDTH.get(tensor.shape[-1], "another model")
                raise LoraFileError(
                    f"LoRA '{lora_path}' does not fit this {family.upper()} model: its "
                    f"cross-attention weights take {tensor.shape[-1]}-wide text features "
                    f"({guess}), the model's take {width} ('{key}')")
            break


def _check_transformer_widths(lora_path: Path, tensors: dict, transformer, family: str) -> None:
    """Each adapted layer must exist in the model and take the LoRA's input width: diffusers
    names against the model's modules, kohya names against its original (fused) layers."""
    shapes = {key.replace(".base_layer.", "."): tuple(value.shape)
              for key, value in transformer.state_dict().items() if "lora_" not in key}
    meta = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    try:
        original = {key.removesuffix(".weight").replace(".", "_"): tuple(value.shape)
                    for key, value in to_original(meta, family).items()}
    except ValueError:
        original = {}
    for key, tensor in tensors.items():
        if m := re.fullmatch(r"transformer\.(.+)\.lora_A\.weight", key):
            weight = shapes.get(f"{m[1]}.weight")
        elif m := re.fullmatch(r"lora_unet_(.+)\.lora_down\.weight", key):
            weight = original.get(m[1])
        else:
            continue
        if weight is None or weight[-1] != tensor.shape[-1]:
            found = "no such layer" if weight is None else f"it takes {weight[-1]} features"
            raise LoraFileError(
                f"LoRA '{lora_path}' does not fit this {family.upper()} model: '{key}' adapts "
                f"a {tensor.shape[-1]}-wide input, but in the model {found}; is the LoRA made "
                "for another model?")


def merge_lora(pipeline, lora: str | Path, family: str, scale: float = 1.0) -> None:
    """Fuse a LoRA into the pipeline's weights in place: W <- W + scale * (alpha / r) * B A."""
    lora_path = lora_file(lora)
    check_lora_fits(lora_path, pipeline, family)
    source = lora_for_diffusers(lora_path, pipeline, family)
    try:
        pipeline.load_lora_weights(source, adapter_name="merged")
        # FluxPipeline.fuse_lora fuses only the transformer unless told: name every part.
        pipeline.fuse_lora(components=list(_LORA_COMPONENTS[family]), lora_scale=scale,
                           adapter_names=["merged"])
        pipeline.unload_lora_weights()
    except (ValueError, RuntimeError, KeyError, AssertionError) as error:
        # (diffusers' kohya FLUX reader asserts FLUX.1's widths)
        raise LoraFileError(f"LoRA '{lora_path}' could not be merged into this {family.upper()} "
                            f"model ({type(error).__name__}: {str(error)[:300]}); is it made for "
                            "this base model?") from error


def lora_for_diffusers(lora_path: Path, pipeline, family: str):
    """What to give `pipeline.load_lora_weights` for a LoRA file: its path, or for a kohya-layout
    SD3/FLUX file the diffusers-layout state dict `kohya_to_diffusers` makes of it (diffusers
    reads no kohya SD3 LoRAs, and its kohya FLUX reader fixes FLUX.1's widths and drops the
    LoRAs outside the blocks)."""
    if family not in TRANSFORMER_FAMILIES:
        return str(lora_path)
    header = read_header(lora_path)
    if not header.keys or not all(key.startswith("lora_") for key in header.keys):
        return str(lora_path)
    from safetensors.torch import load_file

    return kohya_to_diffusers(load_file(str(lora_path)), pipeline, family)


def kohya_to_diffusers(state: dict[str, torch.Tensor], pipeline,
                       family: str) -> dict[str, torch.Tensor]:
    """A kohya-layout SD3/FLUX LoRA (original layer names, q/k/v fused) -> diffusers/peft keys for
    `pipeline`, each module's scale alpha / rank folded into its `lora_B` (diffusers then reads
    alpha = rank). A fused layer's LoRA is cut by output rows into its parts' LoRAs
    (transformer_keys.lora_from_original), which leaves the merged delta unchanged."""
    shapes = {key.replace(".base_layer.", "."): tuple(value.shape)
              for key, value in pipeline.transformer.state_dict().items() if "lora_" not in key}
    originals = {layer.original.replace(".", "_"): layer.original
                 for layer in module_map(family, shapes)}
    heads = _kohya_heads(family)
    encoders = {}
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        model = getattr(pipeline, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                full = name if _is_t5(component, family) or name.startswith("text_model.") \
                    else "text_model." + name
                encoders[heads[component] + full.replace(".", "_")] = f"{component}.{full}"
    modules: dict[str, ModuleLora] = {}
    fused: dict[str, ModuleLora] = {}
    for key in state:
        if key.endswith((".lora_up.weight", ".alpha")):
            continue
        name, _, kind = key.partition(".")
        if kind != "lora_down.weight":
            raise LoraFileError(f"LoRA key '{key}' is not a kohya LoRA weight (lora_down/lora_up/"
                                "alpha); other adapters (DoRA, LoHa ...) are not read here")
        down = state[key].float()
        alpha = state[f"{name}.alpha"].item() if f"{name}.alpha" in state else down.shape[0]
        lora = ModuleLora(down, state[f"{name}.lora_up.weight"].float(), float(alpha))
        if name in encoders:
            modules[encoders[name]] = lora
        elif name.startswith("lora_unet_") and name.removeprefix("lora_unet_") in originals:
            fused[originals[name.removeprefix("lora_unet_")]] = lora
        else:
            raise LoraFileError(f"LoRA key '{key}' names no layer of this {family.upper()} model")
    try:
        parts = lora_from_original(fused, family, shapes)
    except ValueError as error:
        raise LoraFileError(f"this LoRA does not fit the {family.upper()} model: {error}") \
            from None
    modules.update({f"transformer.{part}": lora for part, lora in parts.items()})
    result: dict[str, torch.Tensor] = {}
    for module, lora in modules.items():
        result[f"{module}.lora_A.weight"] = lora.down
        result[f"{module}.lora_B.weight"] = lora.up * (lora.alpha / lora.down.shape[0])
    return result


# --------------------------------------------------------------------------------------------
# diffusers/peft -> kohya
# --------------------------------------------------------------------------------------------

def _adapter_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """{component: its LoraConfig fields} from a diffusers file's `lora_adapter_metadata`."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    result: dict[str, dict] = {}
    for key, value in json.loads(raw).items():
        component, field_name = key.split(".", 1)
        result.setdefault(component, {})[field_name] = value
    return result


def _is_t5(component: str, family: str | None) -> bool:
    return (family, component) in (("flux", "text_encoder_2"), ("sd3", "text_encoder_3"))


def _kohya_heads(family: str | None) -> dict[str, str]:
    """kohya's prefix for each diffusers component: `lora_te_` alone for SD 1.x/2.x; numbered
    per encoder for SDXL, SD3 (CLIP-L, CLIP-G, T5) and FLUX (CLIP-L, T5), as kohya's
    networks/lora.py, lora_sd3.py and lora_flux.py name them."""
    if family in (None, "sd1", "sd2"):
        return {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    return {"unet": "lora_unet_", "transformer": "lora_unet_", "text_encoder": "lora_te1_",
            "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}


def _module_alpha(config: dict, module: str, rank: int) -> float:
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = value
    return float(alpha)


def peft_to_kohya(state: dict[str, torch.Tensor], metadata: dict[str, str], *,
                  sdxl: bool = False, family: str | None = None) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA (`unet.<module>.lora_A.weight`) -> kohya (`lora_unet_<module>.lora_down
    .weight`, `.lora_up.weight`, `.alpha`; `lora_te_`, or per encoder `lora_te1_`/`lora_te2_`/
    `lora_te3_`, for the text encoders). Alpha comes from the file's LoraConfig metadata
    (lora_alpha, alpha_pattern); without it diffusers uses alpha = rank, and so does this.
    `family` (or `sdxl`) names the model family; None means SD 1.x/2.x.

    SD3/FLUX (`transformer.<module>...`): kohya and ComfyUI name the ORIGINAL layers
    (`lora_unet_double_blocks_0_img_attn_qkv`), where q, k and v are one fused weight; the
    LoRAs of the diffusers parts become one block-diagonal LoRA on it
    (transformer_keys.lora_to_original), whose merged delta is the same.

    DoRA (Liu et al. 2024): W' = m * (W + (alpha/r) B A) / ||W + (alpha/r) B A||, the norm taken
    per output row. peft keeps m as `lora_magnitude_vector` of shape (out,); the LyCORIS layout
    that ComfyUI reads keeps it as `.dora_scale` of shape (out, 1), which ComfyUI recognises as
    the output-axis decomposition by its first dimension matching the weight's."""
    family = family or ("sdxl" if sdxl else None)
    heads = _kohya_heads(family)
    configs = _adapter_configs(metadata)
    result: dict[str, torch.Tensor] = {}
    transformer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"(unet|transformer|text_encoder|text_encoder_2|text_encoder_3)\.(.+)\."
                         r"(lora_[AB]\.weight|lora_magnitude_vector)", key)
        if not m or m[1] not in heads:
            raise LoraFileError(f"LoRA key '{key}' is not in the diffusers/peft layout "
                                "(<component>.<module>.lora_A/B.weight, lora_magnitude_vector) "
                                f"of a {(family or 'sd1').upper()} model; other adapters cannot be "
                                "written in the kohya layout")
        component, module, kind = m[1], m[2], m[3]
        if component == "transformer":
            if kind == "lora_magnitude_vector":
                raise LoraFileError(f"'{key}': DoRA on an SD3/FLUX transformer has no kohya "
                                    "layout here (its q/k/v are one fused weight); use the "
                                    f"diffusers file {DIFFUSERS_LORA_FILE}")
            transformer.setdefault(module, {})[kind] = tensor
            continue
        if component != "unet" and not _is_t5(component, family) \
                and not module.startswith("text_model."):
            module = "text_model." + module  # transformers 5 dropped this level from names
        name = heads[component] + module.replace(".", "_")
        if kind == "lora_A.weight":
            result[f"{name}.lora_down.weight"] = tensor
            result[f"{name}.alpha"] = torch.tensor(
                _module_alpha(configs.get(component, {}), m[2], tensor.shape[0]))
        elif kind == "lora_B.weight":
            result[f"{name}.lora_up.weight"] = tensor
        else:
            result[f"{name}.dora_scale"] = tensor.reshape(-1, 1)  # (out,) -> (out, 1)
    if transformer:
        if family not in TRANSFORMER_FAMILIES:
            raise LoraFileError(f"LoRA keys 'transformer.*' belong to an SD3 or FLUX model, not "
                                f"to {(family or 'sd1').upper()}")
        loras = {}
        for module, parts in transformer.items():
            if set(parts) != {"lora_A.weight", "lora_B.weight"}:
                raise LoraFileError(f"LoRA module 'transformer.{module}' lacks its "
                                    f"{'lora_B' if 'lora_A.weight' in parts else 'lora_A'} weight")
            down = parts["lora_A.weight"]
            loras[module] = ModuleLora(down, parts["lora_B.weight"], _module_alpha(
                configs.get("transformer", {}), module, down.shape[0]))
        try:
            fused = lora_to_original(loras, family)
        except ValueError as error:
            raise LoraFileError(str(error)) from None
        for original, lora in fused.items():
            name = heads["transformer"] + original.replace(".", "_")
            result[f"{name}.lora_down.weight"] = lora.down.contiguous()
            result[f"{name}.lora_up.weight"] = lora.up.contiguous()
            result[f"{name}.alpha"] = torch.tensor(lora.alpha)
    return result


# --------------------------------------------------------------------------------------------
# Writing the files of a LoRA run
# --------------------------------------------------------------------------------------------

def safetensors_hashes(tensors: dict[str, torch.Tensor],
                       metadata: dict[str, str]) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) as kohya's trainer precomputes them for the
    additional-networks extension and AUTOMATIC1111: the file is serialised with only its `ss_*`
    metadata; the model hash is the sha256 of everything after the header (the tensor data,
    which AUTOMATIC1111's "addnet" LoRA hash also covers); the legacy hash is the first 8 hex
    digits of the sha256 of the 64 KiB at offset 1 MiB (empty for a smaller file)."""
    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    model_hash = tensor_data_sha256(io.BytesIO(blob))
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def lora_metadata(*, settings: LoraSettings, base_model: str, trigger_phrase: str,
                  output_name: str, resolution: int, prediction_type: str, training_steps: int,
                  learning_rate: float, text_encoder_lr: float | None, num_train_images: int,
                  tag_frequency: dict[str, dict[str, int]] | None = None,
                  family: str = "sd1", variant: str | None = None) -> dict[str, str]:
    """kohya `ss_*` (as kohya's `train_network.py` writes them) and ModelSpec keys, all values
    strings as safetensors requires. `text_encoder_lr` None: the text encoder was not trained.
    `tag_frequency`: {dataset folder: {tag: count}}. The base model is named by its basename,
    as kohya does, so the file does not reveal the user's directory layout. SD3 and FLUX need
    their `variant` (transformer_keys.transformer_variant of the transformer's config)."""
    base_name = Path(str(base_model).rstrip("/\\")).name or str(base_model)
    return {
        "ss_base_model_version": _KOHYA_BASE_MODEL_VERSION[variant or family],
        "ss_network_module": _KOHYA_NETWORK_MODULE.get(family, "networks.lora"),
        "ss_network_dim": str(settings.rank),
        "ss_network_alpha": str(settings.alpha),
        "ss_network_dropout": str(settings.dropout),
        **({"ss_network_args": json.dumps({"dora_wd": "True", "wd_on_output": "True"})}
           if settings.use_dora else {}),
        "ss_output_name": output_name,
        "ss_sd_model_name": base_name,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_max_train_steps": str(training_steps),
        "ss_num_train_images": str(num_train_images),
        "ss_learning_rate": str(learning_rate),
        "ss_unet_lr": str(learning_rate),
        "ss_text_encoder_lr": str(text_encoder_lr if text_encoder_lr is not None else 0.0),
        "ss_tag_frequency": json.dumps(tag_frequency or {}),
        "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        **modelspec(family, prediction_type, title=output_name, resolution=resolution,
                    lora=True, trigger_phrase=trigger_phrase, variant=variant),
        "training_steps": str(training_steps),
    }


def tag_frequency(captions: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: {dataset folder name: {tag: images whose caption has it}},
    a caption's tags being its comma-separated parts."""
    result = {}
    for folder, texts in captions.items():
        counts: collections.Counter[str] = collections.Counter()
        for text in texts:
            counts.update({tag.strip() for tag in text.split(",") if tag.strip()})
        result[folder] = dict(counts)
    return result


def save_lora_files(output_dir: str | Path, unet, text_encoders: list, *,
                    settings: LoraSettings, metadata: dict[str, str], output_name: str,
                    family: str = "sd1") -> tuple[Path, Path]:
    """Write the diffusers file and the kohya file `{output_name}.safetensors` atomically;
    return their paths. For SD3/FLUX `unet` is the transformer; its keys are `transformer.*`,
    as diffusers' SD3/FLUX LoRA loaders expect."""
    output_dir = Path(output_dir)
    states = lora_state_dicts(unet, text_encoders)
    if family in TRANSFORMER_FAMILIES and "unet" in states:
        states = {"transformer" if prefix == "unet" else prefix: state
                  for prefix, state in states.items()}
    diffusers_state = {}
    for prefix, state in states.items():
        for key, value in state.items():
            if prefix not in ("unet", "transformer") and not _is_t5(prefix, family) \
                    and not key.startswith("text_model."):
                key = "text_model." + key  # transformers 5 dropped it; diffusers 0.3x needs it
            diffusers_state[f"{prefix}.{key}"] = value
    # diffusers reads each adapter's LoraConfig from these keys (alpha / rank scale).
    denoiser_config = settings.peft_config(settings.unet_target_modules)
    text_config = settings.peft_config(settings.text_encoder_target_modules)
    configs = {"unet": denoiser_config, "transformer": denoiser_config,
               "text_encoder": text_config, "text_encoder_2": text_config,
               "text_encoder_3": text_config}
    adapter_metadata = {}
    for prefix in states:
        for key, value in configs[prefix].to_dict().items():
            adapter_metadata[f"{prefix}.{key}"] = sorted(value) if isinstance(value, set) else value
    diffusers_metadata = {"format": "pt", **metadata, "lora_adapter_metadata": json.dumps(
        adapter_metadata, indent=2, sort_keys=True, default=str)}
    diffusers_path = output_dir / DIFFUSERS_LORA_FILE
    with atomic_path(diffusers_path) as tmp:
        save_file(diffusers_state, str(tmp), metadata=diffusers_metadata)
    kohya_path = write_kohya_lora(diffusers_path, output_dir / f"{output_name}.safetensors",
                                  metadata=metadata, family=family)
    return diffusers_path, kohya_path


def write_kohya_lora(diffusers_path: str | Path, kohya_path: str | Path, *,
                     metadata: dict[str, str], family: str) -> Path:
    """The kohya-layout file of a diffusers/peft LoRA file (`peft_to_kohya`), atomically, with
    `metadata` (`lora_metadata`'s ss_* and ModelSpec keys) and kohya's `sshs_*` hashes. For an
    SD3/FLUX run whose diffusers file diffusers' `save_lora_weights` wrote, this adds the file
    ComfyUI and kohya's tools load."""
    from safetensors import safe_open

    with safe_open(str(diffusers_path), framework="pt") as handle:
        diffusers_metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    kohya_state = peft_to_kohya(state, diffusers_metadata, family=family)
    model_hash, legacy_hash = safetensors_hashes(kohya_state, metadata)
    kohya_metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    kohya_path = Path(kohya_path)
    with atomic_path(kohya_path) as tmp:
        save_file(kohya_state, str(tmp), metadata=kohya_metadata)
    return kohya_path


def _run_family(folder: Path) -> str | None:
    """The family of a LoRA run's base model, from its training_config.yaml (None if unknown)."""
    from dreambooth.families import detect_family

    recorded = read_training_config(folder)
    base = recorded.get("pretrained_model_name_or_path")
    try:
        return detect_family(resolve_model_path(
            base, single_file_config=recorded.get("single_file_config"))) if base else None
    except (OSError, ValueError):
        return None


def export_lora(source: str | Path, output: Path, *, kohya: bool,
                dtype: torch.dtype | None = None) -> Path:
    """Write the LoRA `source` (a LoRA run's output_dir or a LoRA file) to the `.safetensors`
    file `output` in the kohya or the diffusers/peft layout, in `dtype` (None: as stored)."""
    from safetensors import safe_open

    path = lora_file(source, kohya=kohya)
    header = read_header(path)  # clear errors for truncated / corrupted files
    with safe_open(str(path), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    metadata = dict(header.metadata)
    is_kohya = all(key.startswith("lora_") for key in state)
    if kohya and not is_kohya:
        family = lora_family(list(state), metadata)
        if family is None and Path(source).expanduser().is_dir():
            family = _run_family(Path(source).expanduser())
        state = peft_to_kohya(state, metadata, family=family)
        metadata.pop("lora_adapter_metadata", None)
    elif not kohya and is_kohya:
        raise LoraFileError(f"'{path}' is a kohya-layout LoRA; writing the diffusers layout needs "
                            f"the run's {DIFFUSERS_LORA_FILE} (a LoRA training output folder has "
                            "both)")
    if dtype is not None:
        state = {key: value.to(dtype) if value.is_floating_point() else value
                 for key, value in state.items()}
    with atomic_path(output) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    return output
