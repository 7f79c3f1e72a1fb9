"""diffusers <-> original key names of the SD3 (MMDiT) and FLUX.1 transformers, for weights and
for LoRAs on them.

The original code of both families (Stability's `sd3_impls`/`sgm`, Black Forest Labs' `flux`)
computes q, k and v with ONE linear layer per stream (`...attn.qkv`; FLUX's single blocks fuse
q, k, v and the MLP's input projection into `linear1`), where diffusers has one Linear each. The
single files people share (BFL's `flux1-dev.safetensors`, Stability's `sd3_medium*.safetensors`)
and the LoRAs that ComfyUI and kohya's trainers load (`lora_unet_double_blocks_0_img_attn_qkv`,
`lora_unet_joint_blocks_0_x_block_attn_qkv`) use the original names. One table says where each
diffusers module lives in the original model (`module_map`); weights, and LoRAs, are converted
with it:

- weights: the fused weight is the diffusers weights stacked on the output axis, in the order
  q, k, v (, mlp); diffusers' reader (`diffusers/loaders/single_file_utils.py`) chunks it back.
- LoRAs: a LoRA on the fused layer that equals separate LoRAs (B_i, A_i, scale_i = alpha_i / r_i)
  on its parts is `lora_down` = [A_1; ...; A_n] (n r x in) and `lora_up` = blockdiag(B_1, ...,
  B_n) (sum out_i x n r), with alpha = n * alpha: up @ down = [B_1 A_1; ...; B_n A_n] and the
  consumers' scale alpha / rank is (n alpha) / (n r) = alpha / r. That is how kohya's
  `networks/lora_flux.py` saves its `split_qkv` LoRAs, and diffusers' kohya reader
  (`_convert_kohya_flux_lora_to_diffusers`) recognises the block-diagonal `lora_up` and cuts it
  back into the n LoRAs exactly.
- The final adaLN (and SD3's last context block, which is "pre-only") keep (shift, scale) in
  the original and (scale, shift) in diffusers: those rows are swapped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dreambooth.formats import ExportError

TRANSFORMER_FAMILIES = ("sd3", "flux")


@dataclass(frozen=True)
class Fused:
    """One layer of the original model and the diffusers modules it holds, stacked on dim 0."""

    original: str            # e.g. "double_blocks.0.img_attn.qkv"
    parts: tuple[str, ...]   # e.g. ("transformer_blocks.0.attn.to_q", ...to_k, ...to_v)
    swap_halves: bool = False  # (scale, shift) in diffusers, (shift, scale) in the original


# Block prefixes: a diffusers block `D`/`S` and the original block it is (`\1` its number).
D, S = r"transformer_blocks\.(\d+)\.", r"single_transformer_blocks\.(\d+)\."
DB, SB, JB = r"double_blocks.\1.", r"single_blocks.\1.", r"joint_blocks.\1."
# (diffusers module regex, original module, position among the fused parts, number of parts)
_FLUX_MODULES = (
    (D + r"attn\.to_([qkv])", DB + r"img_attn.qkv", 3),
    (D + r"attn\.add_([qkv])_proj", DB + r"txt_attn.qkv", 3),
    (D + r"attn\.to_out\.0", DB + r"img_attn.proj", 1),
    (D + r"attn\.to_add_out", DB + r"txt_attn.proj", 1),
    (D + r"norm1\.linear", DB + r"img_mod.lin", 1),
    (D + r"norm1_context\.linear", DB + r"txt_mod.lin", 1),
    (D + r"ff\.net\.0\.proj", DB + r"img_mlp.0", 1),
    (D + r"ff\.net\.2", DB + r"img_mlp.2", 1),
    (D + r"ff_context\.net\.0\.proj", DB + r"txt_mlp.0", 1),
    (D + r"ff_context\.net\.2", DB + r"txt_mlp.2", 1),
    (S + r"attn\.to_([qkv])", SB + r"linear1", 4),
    (S + r"(proj_mlp)", SB + r"linear1", 4),
    (S + r"proj_out", SB + r"linear2", 1),
    (S + r"norm\.linear", SB + r"modulation.lin", 1),
    (r"x_embedder", "img_in", 1),
    (r"context_embedder", "txt_in", 1),
    (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer", 1),
    (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer", 1),
    (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer", 1),
    (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer", 1),
    (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", 1),
    (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", 1),
    (r"proj_out", "final_layer.linear", 1),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", 1),
)
_FLUX_PARAMETERS = (  # RMSNorm scales: parameters, not modules
    (D + r"attn\.norm_q\.weight", DB + r"img_attn.norm.query_norm.scale"),
    (D + r"attn\.norm_k\.weight", DB + r"img_attn.norm.key_norm.scale"),
    (D + r"attn\.norm_added_q\.weight", DB + r"txt_attn.norm.query_norm.scale"),
    (D + r"attn\.norm_added_k\.weight", DB + r"txt_attn.norm.key_norm.scale"),
    (S + r"attn\.norm_q\.weight", SB + r"norm.query_norm.scale"),
    (S + r"attn\.norm_k\.weight", SB + r"norm.key_norm.scale"),
)
_SD3_MODULES = (
    (D + r"attn\.to_([qkv])", JB + r"x_block.attn.qkv", 3),
    (D + r"attn\.add_([qkv])_proj", JB + r"context_block.attn.qkv", 3),
    (D + r"attn\.to_out\.0", JB + r"x_block.attn.proj", 1),
    (D + r"attn\.to_add_out", JB + r"context_block.attn.proj", 1),
    (D + r"attn2\.to_([qkv])", JB + r"x_block.attn2.qkv", 3),
    (D + r"attn2\.to_out\.0", JB + r"x_block.attn2.proj", 1),
    (D + r"norm1\.linear", JB + r"x_block.adaLN_modulation.1", 1),
    (D + r"norm1_context\.linear", JB + r"context_block.adaLN_modulation.1", 1),
    (D + r"ff\.net\.0\.proj", JB + r"x_block.mlp.fc1", 1),
    (D + r"ff\.net\.2", JB + r"x_block.mlp.fc2", 1),
    (D + r"ff_context\.net\.0\.proj", JB + r"context_block.mlp.fc1", 1),
    (D + r"ff_context\.net\.2", JB + r"context_block.mlp.fc2", 1),
    (r"pos_embed\.proj", "x_embedder.proj", 1),
    (r"context_embedder", "context_embedder", 1),
    (r"time_text_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0", 1),
    (r"time_text_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2", 1),
    (r"time_text_embed\.text_embedder\.linear_1", "y_embedder.mlp.0", 1),
    (r"time_text_embed\.text_embedder\.linear_2", "y_embedder.mlp.2", 1),
    (r"proj_out", "final_layer.linear", 1),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", 1),
)
_SD3_PARAMETERS = (
    (D + r"attn\.norm_q\.weight", JB + r"x_block.attn.ln_q.weight"),
    (D + r"attn\.norm_k\.weight", JB + r"x_block.attn.ln_k.weight"),
    (D + r"attn\.norm_added_q\.weight", JB + r"context_block.attn.ln_q.weight"),
    (D + r"attn\.norm_added_k\.weight", JB + r"context_block.attn.ln_k.weight"),
    (D + r"attn2\.norm_q\.weight", JB + r"x_block.attn2.ln_q.weight"),
    (D + r"attn2\.norm_k\.weight", JB + r"x_block.attn2.ln_k.weight"),
    (r"pos_embed\.pos_embed", "pos_embed"),
)
_TABLES = {"flux": (_FLUX_MODULES, _FLUX_PARAMETERS), "sd3": (_SD3_MODULES, _SD3_PARAMETERS)}
_PART_ORDER = {"q": 0, "k": 1, "v": 2, "proj_mlp": 3}


def _check_family(family: str) -> None:
    if family not in TRANSFORMER_FAMILIES:
        raise ValueError(f"family '{family}' has no transformer key map: expected one of "
                         f"{', '.join(TRANSFORMER_FAMILIES)}")


def _place(family: str, module: str) -> tuple[str, int, int] | None:
    """(original module, position, number of parts) of one diffusers module; None if unmapped."""
    for pattern, original, count in _TABLES[family][0]:
        if m := re.fullmatch(pattern, module):
            position = _PART_ORDER[m[2]] if count > 1 else 0
            return m.expand(original), position, count
    return None


def _swaps_halves(family: str, module: str, shape: tuple) -> bool:
    """Whether a layer keeps (scale, shift) in diffusers: the final adaLN, and in SD3 the context
    adaLN of the last, "context pre-only" joint block (AdaLayerNormContinuous, 2 * dim outputs
    where the other blocks' AdaLayerNormZero has 6 * dim)."""
    if module == "norm_out.linear":
        return True
    return (family == "sd3" and module.endswith(".norm1_context.linear")
            and shape[0] == 2 * shape[1])


def module_map(family: str, shapes: dict[str, tuple]) -> list[Fused]:
    """The original layers of a diffusers SD3/FLUX transformer whose state-dict shapes are
    `shapes` (`{name: shape}`, e.g. of a model built on the meta device)."""
    _check_family(family)
    modules = {key.rsplit(".", 1)[0] for key in shapes if key.endswith((".weight", ".bias"))}
    groups: dict[str, list] = {}
    swaps: dict[str, bool] = {}
    for module in sorted(modules):
        place = _place(family, module)
        if place is None:
            continue
        original, position, count = place
        groups.setdefault(original, [None] * count)[position] = module
        swaps[original] = _swaps_halves(family, module, shapes[f"{module}.weight"])
    result = []
    for original, parts in groups.items():
        if None in parts:
            raise ExportError(f"{family} transformer layer '{original}' lacks one of its parts "
                              f"({', '.join(str(p) for p in parts)}): not a standard "
                              f"{family.upper()} transformer")
        result.append(Fused(original, tuple(parts), swaps[original]))
    return result


def _parameter_map(family: str, shapes: dict[str, tuple]) -> dict[str, str]:
    result = {}
    for key in shapes:
        for pattern, original in _TABLES[family][1]:
            if m := re.fullmatch(pattern, key):
                result[key] = m.expand(original)
    return result


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

def to_original(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel / FluxTransformer2DModel state dict under the original
    names (no `model.diffusion_model.` prefix). Raises ExportError for a weight with no name."""
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    result, used = {}, set()
    for layer in module_map(family, shapes):
        for kind in ("weight", "bias"):
            names = [f"{part}.{kind}" for part in layer.parts]
            present = [name in state for name in names]
            if not any(present):
                continue
            if not all(present):
                raise ExportError(f"{family} layer '{layer.original}': some of "
                                  f"{', '.join(names)} have a {kind} and some do not")
            tensor = torch.cat([state[name] for name in names], dim=0)
            result[f"{layer.original}.{kind}"] = _swap_halves(tensor) if layer.swap_halves \
                else tensor
            used.update(names)
    for key, original in _parameter_map(family, shapes).items():
        result[original] = state[key]
        used.add(key)
    left = sorted(set(state) - used)
    if left:
        raise ExportError(f"{family} transformer weight '{left[0]}' (and {len(left) - 1} more) "
                          f"has no name in the original {family.upper()} layout: not a standard "
                          f"{family.upper()} transformer")
    return result


def from_original(state: dict[str, torch.Tensor], family: str,
                  shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The inverse of `to_original` for a model whose diffusers state-dict shapes are `shapes`:
    fused layers are cut on dim 0 at the parts' output sizes. Tensors the model does not have
    are ignored; KeyError names one it needs that `state` lacks, ValueError one of another
    width."""
    result = {}
    for layer in module_map(family, shapes):
        for kind in ("weight", "bias"):
            names = [f"{part}.{kind}" for part in layer.parts]
            if names[0] not in shapes:
                continue
            tensor = state[f"{layer.original}.{kind}"]
            if layer.swap_halves:
                tensor = _swap_halves(tensor)
            sizes = [shapes[name][0] for name in names]
            if tensor.shape[0] != sum(sizes):
                raise ValueError(f"'{layer.original}.{kind}' has {tensor.shape[0]} rows where "
                                 f"the model's {', '.join(layer.parts)} have {sum(sizes)}")
            for name, piece in zip(names, torch.split(tensor, sizes, dim=0)):
                result[name] = piece
    for key, original in _parameter_map(family, shapes).items():
        result[key] = state[original]
    return result


# --------------------------------------------------------------------------------------------
# LoRAs
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleLora:
    """One module's LoRA: delta W = scale * up @ down, scale = alpha / rank."""

    down: torch.Tensor  # (rank, in)
    up: torch.Tensor    # (out, rank)
    alpha: float


def lora_to_original(loras: dict[str, ModuleLora], family: str) -> dict[str, ModuleLora]:
    """LoRAs on diffusers modules ({module: ModuleLora}) -> LoRAs on the original layers
    ({original layer: ModuleLora}) with the same merged delta (see the module docstring).

    A fused layer whose LoRA covers only some parts gets zero blocks for the rest (their delta
    is zero; q, k and v have equal widths, FLUX's MLP part is 4 times theirs); parts of
    different rank are padded with zero rows/columns to the largest; parts of different scale
    have their scale folded into `up` and alpha = rank (scale 1).
    """
    _check_family(family)
    groups: dict[str, list] = {}
    for module, lora in sorted(loras.items()):
        place = _place(family, module)
        if place is None:
            raise ExportError(f"LoRA module '{module}' is not a layer of the {family.upper()} "
                              "transformer that the original layout knows (is the LoRA made "
                              "for this model family?)")
        original, position, count = place
        groups.setdefault(original, [None] * count)[position] = (module, lora)
    result = {}
    for original, parts in groups.items():
        present = [part[1] for part in parts if part is not None]
        sample = present[0]
        rank = max(lora.down.shape[0] for lora in present)
        uniform = len({lora.alpha / lora.down.shape[0] for lora in present}) == 1 and all(
            lora.down.shape[0] == rank for lora in present)
        widths = _part_widths([None if part is None else part[1].up.shape[0] for part in parts])
        downs, ups = [], []
        for part, width in zip(parts, widths):
            down = torch.zeros(rank, sample.down.shape[1], dtype=sample.down.dtype)
            up = torch.zeros(width, rank, dtype=sample.up.dtype)
            if part is not None:
                lora = part[1]
                r = lora.down.shape[0]
                down[:r] = lora.down
                up[:, :r] = lora.up if uniform else lora.up * (lora.alpha / r)
            downs.append(down)
            ups.append(up)
        up = torch.block_diag(*ups) if len(parts) > 1 else ups[0]
        if len(parts) == 1 and _swaps_halves(family, parts[0][0],
                                             (sample.up.shape[0], sample.down.shape[1])):
            up = _swap_halves(up)
        alpha = len(parts) * sample.alpha if uniform else float(len(parts) * rank)
        if original.startswith("final_layer.") and alpha != rank:
            # diffusers' kohya FLUX reader takes final_layer's LoRA without its alpha: the
            # scale goes into `up` and alpha = rank, which every reader merges the same.
            up, alpha = up * (alpha / rank), float(rank)
        result[original] = ModuleLora(torch.cat(downs, dim=0), up, float(alpha))
    return result


def lora_from_original(loras: dict[str, ModuleLora], family: str,
                       shapes: dict[str, tuple]) -> dict[str, ModuleLora]:
    """The inverse of `lora_to_original` for a model whose diffusers state-dict shapes are
    `shapes`: each original layer's LoRA ({original layer: ModuleLora}, original names with
    dots) is cut by output rows into its parts' LoRAs. A block-diagonal one (as written here
    and by kohya's split_qkv) gives each part its diagonal block, rank / n with alpha / n;
    any other shares the whole `down` among the parts. The merged deltas are unchanged.
    KeyError names a layer the model does not have."""
    layers = {layer.original: layer for layer in module_map(family, shapes)}
    result = {}
    for original, lora in loras.items():
        layer = layers[original]
        up = _swap_halves(lora.up) if layer.swap_halves else lora.up
        widths = [shapes[f"{part}.weight"][0] for part in layer.parts]
        if up.shape[0] != sum(widths):
            raise ValueError(f"the LoRA on '{original}' has {up.shape[0]} output rows where the "
                             f"model's {', '.join(layer.parts)} have {sum(widths)}")
        ups = torch.split(up, widths, dim=0)
        count, rank = len(layer.parts), lora.down.shape[0]
        block = rank // count
        diagonal = count > 1 and rank % count == 0 and all(
            not piece[:, j * block:(j + 1) * block].any()
            for i, piece in enumerate(ups) for j in range(count) if j != i)
        for i, (part, piece) in enumerate(zip(layer.parts, ups)):
            if diagonal:
                result[part] = ModuleLora(lora.down[i * block:(i + 1) * block],
                                          piece[:, i * block:(i + 1) * block].contiguous(),
                                          lora.alpha / count)
            else:
                result[part] = ModuleLora(lora.down, piece.contiguous(), lora.alpha)
    return result


def _part_widths(widths: list[int | None]) -> list[int]:
    """Output widths of a fused layer's parts, those of parts without a LoRA filled in: q, k
    and v are equally wide, FLUX's proj_mlp (the 4th part) is 4 times as wide (mlp_ratio 4)."""
    attention = next((w for w in widths[:3] if w is not None), None)
    if attention is None:
        attention = widths[3] // 4
    return [w if w is not None else (attention if i < 3 else 4 * attention)
            for i, w in enumerate(widths)]


def lora_delta(lora: ModuleLora) -> torch.Tensor:
    """The weight change a LoRA makes (every consumer's merge): alpha / rank * up @ down."""
    return (lora.alpha / lora.down.shape[0]) * (lora.up.float() @ lora.down.float())


# --------------------------------------------------------------------------------------------
# Recognising files
# --------------------------------------------------------------------------------------------

TRANSFORMER_PREFIX = "model.diffusion_model."
_MARKERS = {"flux": "double_blocks.", "sd3": "joint_blocks."}  # only that family's blocks


def transformer_file_family(keys) -> str | None:
    """'sd3' or 'flux' when a single file's keys hold that original transformer (with or without
    the `model.diffusion_model.` prefix of full checkpoints), else None. For families.py."""
    for key in keys:
        key = key.removeprefix(TRANSFORMER_PREFIX)
        for family, marker in _MARKERS.items():
            if key.startswith(marker):
                return family
    return None


def transformer_variant(family: str, config) -> str:
    """Which released model a transformer config is: 'flux-dev' (guidance-distilled: it embeds
    the guidance scale) or 'flux-schnell'; 'sd3-medium' (SD 3.0), 'sd3.5-medium' (dual attention
    layers) or 'sd3.5-large' (qk-norm, no dual attention)."""
    _check_family(family)
    if family == "flux":
        return "flux-dev" if config.get("guidance_embeds") else "flux-schnell"
    if not config.get("qk_norm"):
        return "sd3-medium"
    return "sd3.5-medium" if config.get("dual_attention_layers") else "sd3.5-large"
