"""Writing the trained model as a diffusers pipeline folder that describes itself.

`output_dir` ends up with what `StableDiffusionPipeline.from_pretrained(output_dir)` loads
(weights only, safetensors, no optimizer state), plus `training_config.yaml` (the resolved
configuration, loadable with `--config`) and `versions.json` (library versions).
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from dreambooth.files import atomic_write_text
from dreambooth.models import TRAINING_CONFIG_FILE, DiffusionComponents

VERSIONS_FILE = "versions.json"
_LIBRARIES = ("dreambooth", "torch", "diffusers", "transformers", "lightning", "safetensors", "peft")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def save_trained_pipeline(components: DiffusionComponents, output_dir: str | Path, *,
                          config_yaml: str) -> Path:
    """Save base pipeline + trained UNet/text encoder into `output_dir` as a diffusers folder.

    The parts training did not touch (scheduler, safety checker ...) are taken from the base
    pipeline as it is on disk. The new folder is written beside the old files first and moved
    into place entry by entry, so a crash mid-save leaves either the old or the new entries.
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
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=output_dir))
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        for entry in sorted(staging.iterdir()):
            target = output_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            entry.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_run_files(output_dir, config_yaml)
    return output_dir


def write_run_files(output_dir: Path, config_yaml: str) -> None:
    """The resolved configuration and library versions, beside the weights."""
    atomic_write_text(output_dir / TRAINING_CONFIG_FILE, config_yaml)
    atomic_write_text(output_dir / VERSIONS_FILE, json.dumps(library_versions(), indent=2) + "\n")
