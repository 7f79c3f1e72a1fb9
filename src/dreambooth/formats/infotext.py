"""AUTOMATIC1111's `parameters` text: how an image was made, in a PNG text chunk.

The first lines are the prompt, then `Negative prompt: ...` when there is one, then one line
of `key: value` fields (`Steps`, `Sampler`, `CFG scale`, `Seed`, `Size`, `Model hash`,
`Model`, ...) that A1111's "PNG Info" and other tools read back. A LoRA is written as A1111
writes it, `<lora:NAME:WEIGHT>` in the prompt plus `Lora hashes: "NAME: HASH"`, so pasting the
text into A1111 applies it again.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import BinaryIO

# diffusers scheduler class -> AUTOMATIC1111 sampler name. A1111 has no DDPM sampler: DDPM's
# ancestral first-order step is what A1111 calls `Euler a`.
A1111_SAMPLERS = {
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "DDPMScheduler": "Euler a",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
    # The flow-matching samplers of SD 3.x and FLUX.1, by the names A1111/Forge give them.
    "FlowMatchEulerDiscreteScheduler": "Euler",
    "FlowMatchHeunDiscreteScheduler": "Heun",
    "FlowMatchLCMScheduler": "LCM",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_hash_cache: dict[tuple[str, int, int], str] = {}


def a1111_sampler(name: str) -> str:
    """The A1111 sampler name for a diffusers scheduler class name; other names pass through."""
    return A1111_SAMPLERS.get(name, name)


def _sha256_stream(stream: BinaryIO, digest=None):
    digest = digest or hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    return digest


def _sha256_file(path: Path, digest=None):
    with open(path, "rb") as handle:
        return _sha256_stream(handle, digest)


def tensor_data_sha256(stream: BinaryIO) -> str:
    """The sha256 (hex) of a safetensors file's tensor data, after its 8-byte size and JSON
    header: the "addnet" hash A1111 gives LoRAs and kohya stores as `sshs_model_hash`. It does
    not change when only the metadata does."""
    stream.seek(0)
    header_size = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + header_size)
    return _sha256_stream(stream).hexdigest()


def model_hash(model: str | Path) -> str | None:
    """A1111's `Model hash`: the first 10 hex digits of the checkpoint file's sha256 (its
    "AutoV2" hash). A diffusers folder has no one file, so its hash is the sha256 of its
    weight files' bytes, each preceded by its path relative to the folder, in sorted order,
    over the components model_index.json names (a trained output_dir's checkpoints and LoRA
    files are not part of the model). None for anything else (a hub id not on disk). Cached per
    file state: a large model is read once per process."""
    path = Path(model).expanduser()
    if path.is_file():
        files = [path]
    elif (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        files = sorted(file for component, spec in index.items()
                       if isinstance(spec, list) and (path / component).is_dir()
                       for file in (path / component).iterdir()
                       if file.is_file() and file.name.endswith(_WEIGHT_SUFFIXES))
    else:
        return None
    stats = [file.stat() for file in files]
    key = (str(path.resolve()), sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats))
    if key not in _hash_cache:
        if path.is_file():
            digest = _sha256_file(path)
        else:
            digest = hashlib.sha256()
            for file in files:
                digest.update(file.relative_to(path).as_posix().encode() + b"\0")
                _sha256_file(file, digest)
        _hash_cache[key] = digest.hexdigest()[:10]
    return _hash_cache[key]


def lora_hash(path: str | Path) -> str:
    """A1111's LoRA hash in `Lora hashes`: the first 12 hex digits of `tensor_data_sha256`."""
    with open(path, "rb") as handle:
        return tensor_data_sha256(handle)[:12]


def _quote(value: str) -> str:
    # A1111 quotes values that would break the "key: value, ..." line.
    return json.dumps(value) if any(c in value for c in ",:\n\"") else value


def format_parameters(
    *, prompt: str, negative_prompt: str, steps: int, sampler: str, cfg_scale: float, seed: int,
    width: int, height: int, model_name: str, extra: dict[str, object] | None = None,
    model_hash: str | None = None, loras: list[tuple[str, float, str | None]] | None = None,
) -> str:
    """The AUTOMATIC1111 `parameters` text for one image. `sampler`: an A1111 name or a diffusers
    scheduler class name (mapped). `loras`: (name, weight, hash or None) each, written as
    `<lora:name:weight>` after the prompt and in `Lora hashes`. `extra` fields (e.g.
    "Denoising strength") follow the standard ones."""
    for name, weight, _ in loras or []:
        prompt = f"{prompt} <lora:{name}:{weight:g}>"
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields: dict[str, object] = {
        "Steps": steps, "Sampler": a1111_sampler(sampler), "CFG scale": float(cfg_scale),
        "Seed": seed, "Size": f"{width}x{height}",
    }
    if model_hash:
        fields["Model hash"] = model_hash
    fields["Model"] = model_name
    hashes = [f"{name}: {hash_}" for name, _, hash_ in loras or [] if hash_]
    if hashes:
        fields["Lora hashes"] = ", ".join(hashes)
    fields.update(extra or {})
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in fields.items()))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """Read `format_parameters` (or A1111) text back: prompt, negative_prompt and every field."""
    *head, last = text.strip("\n").split("\n")
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in head:
        if negative_lines:
            negative_lines.append(line)
        elif line.startswith("Negative prompt:"):
            negative_lines.append(line.removeprefix("Negative prompt:").lstrip())
        else:
            prompt_lines.append(line)
    result = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    for key, value in _FIELD.findall(last):
        result[key] = json.loads(value) if value.startswith('"') else value.strip()
    return result
