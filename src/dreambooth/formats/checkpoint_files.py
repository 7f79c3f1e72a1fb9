"""Reading checkpoint files safely: tensor names without the weights, state dicts, the cache.

The lowest layer of formats/: single_file.py (SD 1.x/2.x/SDXL) and transformer_checkpoints.py
(SD 3.x/FLUX.1) both read files through it. `.safetensors` headers are parsed without loading
tensors; pickles (`.ckpt`, `.pt`, `.pth`, `.bin`) are opened only with
`torch.load(weights_only=True)`, so opening a model never runs a program. Converted pipelines
are cached under `cache_root()`, keyed by the file's sha256 (`file_sha256`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dreambooth.families import UnknownArchitectureError
from dreambooth.files import atomic_write_text

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CACHE_ENV = "DREAMBOOTH_CACHE"
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIXES = {  # family -> {diffusers component: key prefix in the single file}
    "sd1": {"text_encoder": "cond_stage_model.transformer.text_model."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.text_model.",
             "text_encoder_2": "conditioner.embedders.1.model."},
}


class SingleFileError(ValueError):
    """A single-file checkpoint that cannot be used; the message names the file."""


class UnreadableCheckpointError(SingleFileError):
    """Truncated or corrupted file, or a pickle that needs code to load."""


class MismatchedWeightsError(SingleFileError):
    """Tensors missing or shaped differently from the architecture the file claims."""


@dataclass
class CheckpointHeader:
    """Names, shapes and dtypes of a checkpoint's tensors, without reading their data."""

    path: Path
    tensors: dict[str, torch.Tensor]  # meta tensors: shape and dtype only
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors string metadata

    @property
    def keys(self) -> list[str]:
        return list(self.tensors)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() in SAFETENSORS_SUFFIXES


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise SingleFileError(
            f"'{path}' is not a checkpoint file this tool reads: expected .safetensors or .ckpt "
            f"(also .pt/.pth/.bin pickles), got '{path.suffix or '(no suffix)'}'.")
    if not path.is_file():
        raise SingleFileError(f"checkpoint '{path}' does not exist or is not a file.")


def _corrupt(path: Path, error: BaseException) -> UnreadableCheckpointError:
    return UnreadableCheckpointError(
        f"'{path}' is not a readable {'safetensors' if _is_safetensors(path) else 'PyTorch'} "
        f"file ({type(error).__name__}: {error}). It is probably truncated or corrupted (an "
        "interrupted download or copy): fetch it again and compare its size / sha256.")


def _torch_load(path: Path, *, mmap: bool):
    """`torch.load(weights_only=True)`: a pickle may hold only tensors and plain containers."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as error:
            if mmap and "mmap" in str(error):  # legacy (non-zip) format: no memory map
                return torch.load(path, map_location="cpu", weights_only=True)
            raise
    except pickle.UnpicklingError as error:
        if "weights_only" not in str(error) and "Weights only load failed" not in str(error):
            raise _corrupt(path, error) from error
        needed = ""
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            needed = f" It references {', '.join(unsafe[:5])}."
        except Exception:  # older formats cannot be inspected without running them
            pass
        raise UnreadableCheckpointError(
            f"'{path}' is a pickle that needs code to load, and this tool loads pickles only with "
            f"torch.load(weights_only=True) so that opening a model cannot run a program.{needed} "
            "Use a .safetensors version of the model, or, only if you trust the file, convert it "
            "once: torch.load(path, weights_only=False)['state_dict'] -> "
            "safetensors.torch.save_file(...).") from error
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError) as error:
        raise _corrupt(path, error) from error


def _unwrap_state_dict(loaded, path: Path) -> dict[str, torch.Tensor]:
    """Lightning/CompVis checkpoints nest the weights under 'state_dict' (sometimes twice)."""
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise UnknownArchitectureError(
            f"'{path}' holds a {type(loaded).__name__}, not a state dict of named tensors.")
    return {key: value for key, value in loaded.items()
            if isinstance(key, str) and isinstance(value, torch.Tensor)}


def read_header(path: str | Path) -> CheckpointHeader:
    """Tensor names, shapes and dtypes (as meta tensors) and metadata, reading no weights.

    For safetensors only the JSON header is parsed; a `.ckpt` is memory-mapped where its format
    allows. Raises UnreadableCheckpointError for truncated/corrupted files or unsafe pickles.
    """
    from safetensors import safe_open

    path = Path(path)
    _check_suffix(path)
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {}
                for key in handle.keys():
                    view = handle.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(view.get_dtype(), torch.float32)
                    tensors[key] = torch.empty(view.get_shape(), dtype=dtype, device="meta")
        except Exception as error:  # SafetensorError is not exported under a stable name
            raise _corrupt(path, error) from error
        return CheckpointHeader(path, tensors, metadata)
    state = _unwrap_state_dict(_torch_load(path, mmap=True), path)
    return CheckpointHeader(path, {key: value.to("meta") for key, value in state.items()})


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` or `.ckpt` file, on the CPU.

    `.ckpt` (and .pt/.pth/.bin) files are read with `torch.load(weights_only=True)` and unwrapped
    from their `state_dict` key; a pickle that needs code raises UnreadableCheckpointError.
    """
    from safetensors.torch import load_file

    path = Path(path)
    _check_suffix(path)
    if _is_safetensors(path):
        try:
            return load_file(str(path))
        except Exception as error:
            raise _corrupt(path, error) from error
    return _unwrap_state_dict(_torch_load(path, mmap=False), path)


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    if _is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)
    return _unwrap_state_dict(_torch_load(path, mmap=True), path)[key]


def cache_root() -> Path:
    """`$DREAMBOOTH_CACHE`, else `$XDG_CACHE_HOME/dreambooth`, else `~/.cache/dreambooth`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dreambooth"


def _tree_digest(folder: Path, suffixes=(".json", ".txt")) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes):
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) under the cache."""
    stat = path.stat()
    memo_key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    memo = cache_root() / "single-file" / "sha256" / f"{memo_key}.json"
    stamp = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        saved = json.loads(memo.read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    atomic_write_text(memo, json.dumps({**stamp, "sha256": digest.hexdigest()}))
    return digest.hexdigest()


@contextlib.contextmanager
def quiet_dtype_deprecation():
    """Recent diffusers deprecate `torch_dtype` in favour of `dtype`; every version we support
    takes `torch_dtype`, so we pass that and hide the notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated",
                                category=FutureWarning)
        yield
