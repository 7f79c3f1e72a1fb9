"""SD 3.x and FLUX.1 end to end, as a consumer meets them: single files are recognised and load
with their base folder (`--single_file_config`), a LoRA run writes the diffusers and the kohya
file with the run's metadata, and what ComfyUI merges from the kohya file is what diffusers
fuses from the diffusers file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import tiny_config
from dreambooth.cli import main
from dreambooth.families import UnknownArchitectureError, detect_family
from dreambooth.formats.export import export_model
from dreambooth.formats.lora_files import DIFFUSERS_LORA_FILE, kohya_lora_file
from dreambooth.formats.single_file import read_header
from dreambooth.formats.transformer_keys import to_original
from dreambooth.models import load_pipeline, pipeline_class, resolve_model_path
from dreambooth.tiny import build_tiny_pipeline, save_tiny_pipeline
from dreambooth.train.run import train

FAMILIES = ("sd3", "flux")
# What each tiny model is (tiny.py: the SD3 has no qk-norm, the FLUX embeds guidance).
ARCHITECTURE = {"sd3": "stable-diffusion-v3-medium/lora", "flux": "flux-1-dev/lora"}
BASE_MODEL_VERSION = {"sd3": "medium", "flux": "flux1"}
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module", params=FAMILIES)
def flow_base(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    return family, save_tiny_pipeline(tmp_path_factory.mktemp("bases") / f"tiny-{family}",
                                      family=family)


def _comfy_merge(original: dict[str, torch.Tensor], kohya: dict[str, torch.Tensor]):
    """ComfyUI's merge of a kohya-layout LoRA (comfy/lora.py, comfy/utils.py), written anew:
    `lora_unet_<original module, dots as _>` adapts `<module>.weight`, the fused qkv included;
    W += alpha / rank * up @ down."""
    weights = {key[:-len(".weight")].replace(".", "_"): key for key in original
               if key.endswith(".weight")}
    merged = {key: value.clone() for key, value in original.items()}
    for key, down in kohya.items():
        if key.startswith("lora_unet_") and key.endswith(".lora_down.weight"):
            stem = key[:-len(".lora_down.weight")]
            up, alpha = kohya[f"{stem}.lora_up.weight"], kohya[f"{stem}.alpha"].item()
            target = weights[stem.removeprefix("lora_unet_")]
            merged[target] += (alpha / down.shape[0]) * (up.float() @ down.float())
    return merged


# --------------------------------------------------------------------------------------------
# Single files: recognised, and loaded with the base folder
# --------------------------------------------------------------------------------------------

def test_single_files_of_both_families_are_detected(tmp_path, flow_base):
    family, base = flow_base
    path = export_model(base, "single-file", tmp_path / f"{family}.safetensors")
    keys = read_header(path).keys
    # FLUX: BFL's transformer-only file (no prefix); SD3: Stability's whole checkpoint.
    assert any(k.startswith("double_blocks." if family == "flux"
                            else "model.diffusion_model.joint_blocks.") for k in keys)
    assert (family == "sd3") == any(k.startswith("first_stage_model.") for k in keys)
    assert detect_family(keys) == family
    if family == "flux":  # the BFL transformer inside a full checkpoint's prefix
        assert detect_family([f"model.diffusion_model.{k}" for k in keys]) == "flux"


@pytest.mark.parametrize("keys, words", [
    # A LoRA under the original names is not taken for the model itself.
    (["double_blocks.0.img_attn.qkv.lora_A.weight"], ["LoRA"]),
    (["joint_blocks.0.x_block.attn.qkv.lora_down.weight"], ["LoRA"]),
    (["transformer_blocks.0.attn.to_q.weight"], ["diffusers SD3/FLUX transformer"]),
    (["model.diffusion_model.output_blocks.0.0.weight"], ["no UNet", "SD 3.x / FLUX.1"]),
])
def test_what_is_not_a_flow_single_file_is_described(keys, words):
    with pytest.raises(UnknownArchitectureError) as error:
        detect_family(keys)
    for word in words:
        assert word in str(error.value)


def test_a_single_file_without_its_base_folder_gets_one_error_line(tmp_path, flow_base,
                                                                   instance_dir, capsys):
    family, base = flow_base
    path = export_model(base, "single-file", tmp_path / f"{family}.safetensors")
    for argv in (["export", "--model", str(path), "--format", "diffusers", "--output",
                  str(tmp_path / "out")],
                 ["train", f"--pretrained_model_name_or_path={path}",
                  f"--instance_data_dir={instance_dir}", "--instance_prompt=a photo of sks dog",
                  f"--output_dir={tmp_path / 'run'}", "--accelerator=cpu"]):
        capsys.readouterr()
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and error.startswith("error: "), error
        assert "--single_file_config FOLDER" in error and path.name in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()
    capsys.readouterr()
    assert main(["export", "--model", str(path), "--single_file_config", str(path),
                 "--format", "diffusers", "--output", str(tmp_path / "out")]) == 2
    assert "is a file; pass the diffusers folder" in capsys.readouterr().err


def test_a_lora_under_original_names_is_refused_as_a_model(tmp_path, flow_base):
    from safetensors.torch import save_file

    family, base = flow_base
    layer = "double_blocks.0.img_attn.qkv" if family == "flux" \
        else "model.diffusion_model.joint_blocks.0.x_block.attn.qkv"
    path = tmp_path / "lora.safetensors"
    save_file({f"{layer}.lora_A.weight": torch.zeros(2, 8),
               f"{layer}.lora_B.weight": torch.zeros(8, 2)}, str(path))
    with pytest.raises(UnknownArchitectureError, match="lora.safetensors.*looks like a LoRA"):
        resolve_model_path(path, single_file_config=base)


def test_a_run_from_a_single_file_samples_at_its_family_guidance(tmp_path, flow_base,
                                                                  instance_dir):
    from dreambooth.flow import family_module

    family, base = flow_base
    path = export_model(base, "single-file", tmp_path / f"{family}.safetensors")
    config = tiny_config(path, instance_dir, tmp_path / "run", single_file_config=str(base))
    scale = family_module(family).GUIDANCE_SCALE
    assert scale != 7.5
    assert config.validation.validation_guidance_scale == scale
    assert config.prior.class_guidance_scale == scale


def test_generate_and_serve_take_the_base_folder_of_single_files(tmp_path, flow_base, capsys):
    """generate and serve hand their functions the converted folder of a single file (their
    own model loading is theirs); without the flag, one error line says what to pass."""
    from dreambooth.cli import build_parser, resolve_single_files

    family, base = flow_base
    path = export_model(base, "single-file", tmp_path / f"{family}.safetensors")
    for command in ("generate", "serve", "export"):
        parser = build_parser(only=command)
        choices = next(a for a in parser._actions if a.dest == "command").choices
        assert "--single_file_config" in choices[command].format_help(), command
    models = resolve_single_files({"mine": str(path), "other": str(base), "demo": "demo"},
                                  str(base))
    assert models["other"] == str(base) and models["demo"] == "demo"
    assert detect_family(models["mine"]) == family
    assert models["mine"] == resolve_model_path(path, single_file_config=base)  # cached
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--prompt", "a photo of sks dog",
                 "--output_dir", str(tmp_path / "images")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--single_file_config FOLDER" in error, error


def test_a_single_file_loads_with_its_base_folder(tmp_path, flow_base):
    family, base = flow_base
    path = export_model(base, "single-file", tmp_path / f"{family}.safetensors")
    folder = resolve_model_path(path, single_file_config=base)
    assert detect_family(folder) == family
    ours, theirs = (load_pipeline(p, device="cpu") for p in (base, folder))
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# --------------------------------------------------------------------------------------------
# LoRA runs write both files
# --------------------------------------------------------------------------------------------

def test_a_flow_lora_run_writes_both_files_that_merge_alike(tmp_path, flow_base, instance_dir):
    family, base = flow_base
    output = tmp_path / "run"
    train(tiny_config(base, instance_dir, output, use_lora=True, rank=2, lora_alpha=4.0,
                      train_text_encoder=True, max_train_steps=2, learning_rate=5e-2,
                      train_batch_size=1, max_sequence_length=16, output_name="sks-lora"))
    kohya_path = output / "sks-lora.safetensors"
    assert kohya_lora_file(output) == kohya_path
    for path in (output / DIFFUSERS_LORA_FILE, kohya_path):
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        assert metadata["modelspec.architecture"] == ARCHITECTURE[family], path
        assert metadata["ss_base_model_version"] == BASE_MODEL_VERSION[family]
        assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("2", "4.0")
        assert metadata["modelspec.trigger_phrase"] == "a photo of sks dog"
        assert metadata["ss_output_name"] == "sks-lora"
        assert metadata["ss_max_train_steps"] == "2"
    with safe_open(str(output / DIFFUSERS_LORA_FILE), "pt") as handle:
        assert "lora_adapter_metadata" in handle.metadata()  # diffusers' own, kept
    kohya = load_file(kohya_path)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in kohya)
    fused_qkv = "double_blocks_0_img_attn_qkv" if family == "flux" \
        else "joint_blocks_0_x_block_attn_qkv"
    assert f"lora_unet_{fused_qkv}.lora_down.weight" in kohya
    assert all(torch.isfinite(v).all() for v in kohya.values())

    # ComfyUI's merge of the kohya file on the original (fused) weights == diffusers'
    # load_lora_weights + fuse_lora of the diffusers file, under the original names.
    pipeline = load_pipeline(base, device="cpu")
    original = to_original({k: v.clone() for k, v in pipeline.transformer.state_dict().items()},
                           family)
    pipeline.load_lora_weights(str(output), adapter_name="run")
    pipeline.fuse_lora(adapter_names=["run"])
    pipeline.unload_lora_weights()
    expected = to_original(dict(pipeline.transformer.state_dict()), family)
    merged = _comfy_merge(original, kohya)
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6, msg=key)
    qkv = "double_blocks.0.img_attn.qkv.weight" if family == "flux" \
        else "joint_blocks.0.x_block.attn.qkv.weight"
    assert not torch.equal(original[qkv], expected[qkv])  # the LoRA changed the fused layer

    # `dreambooth export --format lora-kohya` of the run gives the run's kohya weights.
    exported = tmp_path / "exported.safetensors"
    assert main(["export", "--model", str(output), "--format", "lora-kohya",
                 "--output", str(exported)]) == 0
    again = load_file(exported)
    assert again.keys() == kohya.keys()
    assert all(torch.equal(again[k], kohya[k]) for k in kohya)


def test_a_lora_that_overflows_its_dtype_is_not_saved(tmp_path):
    """An fp32 weight beyond fp16's range becomes inf in an fp16 save: nothing is written and
    the files already there stay."""
    from dreambooth.train.flow_export import save_flow_lora
    from dreambooth.train.lora import LoraSettings, add_lora_adapters
    from dreambooth.train.module import NonFiniteError

    transformer = build_tiny_pipeline(family="flux").transformer
    settings = LoraSettings(rank=2, alpha=2.0, dropout=0.0, use_dora=False,
                            unet_target_modules=("to_q",), text_encoder_target_modules=())
    add_lora_adapters(transformer, [], settings, train_text_encoder=False)
    with torch.no_grad():
        next(p for n, p in transformer.named_parameters() if "lora_B" in n).fill_(1e6)
    output = tmp_path / "run"
    output.mkdir()
    (output / DIFFUSERS_LORA_FILE).write_bytes(b"the previous run")
    with pytest.raises(NonFiniteError, match="NaN or infinite in float16"):
        save_flow_lora(output, "flux", transformer, [], settings=settings, dtype=torch.float16,
                       text_encoder_names=[], metadata={}, output_name="run")
    assert sorted(p.name for p in output.iterdir()) == [DIFFUSERS_LORA_FILE]
    assert (output / DIFFUSERS_LORA_FILE).read_bytes() == b"the previous run"


def test_a_dora_lora_keeps_its_diffusers_file_and_says_why_there_is_no_kohya_one(tmp_path,
                                                                                caplog):
    from dreambooth.train.flow_export import save_flow_lora
    from dreambooth.train.lora import LoraSettings, add_lora_adapters

    transformer = build_tiny_pipeline(family="flux").transformer
    settings = LoraSettings(rank=2, alpha=2.0, dropout=0.0, use_dora=True,
                            unet_target_modules=("to_q", "to_k", "to_v"),
                            text_encoder_target_modules=())
    add_lora_adapters(transformer, [], settings, train_text_encoder=False)
    paths = save_flow_lora(tmp_path, "flux", transformer, [], settings=settings,
                           dtype=torch.float32, text_encoder_names=[],
                           metadata={"ss_network_dim": "2"}, output_name="dora")
    assert paths == (tmp_path / DIFFUSERS_LORA_FILE,)
    assert not (tmp_path / "dora.safetensors").exists()
    assert "no kohya-layout file written" in caplog.text and "DoRA" in caplog.text
    state = load_file(paths[0])
    assert any(k.endswith("lora_magnitude_vector") for k in state)
    pipeline = build_tiny_pipeline(family="flux")
    pipeline.load_lora_weights(str(tmp_path))  # diffusers takes the file back


# --------------------------------------------------------------------------------------------
# A stranger's session, command by command
# --------------------------------------------------------------------------------------------

def _dreambooth(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "dreambooth", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_flux_train_export_and_load_back_from_the_command_line(tmp_path, instance_dir):
    base = save_tiny_pipeline(tmp_path / "tiny-flux", family="flux")
    common = [f"--pretrained_model_name_or_path={base}", f"--instance_data_dir={instance_dir}",
              "--instance_prompt=a photo of sks dog", "--resolution=32", "--train_batch_size=1",
              "--max_train_steps=2", "--learning_rate=5e-2", "--max_sequence_length=16",
              "--accelerator=cpu", "--num_threads=1", "--report_to=none", "--seed=3"]
    _dreambooth("train", *common, "--use_lora", "--rank=2", f"--output_dir={tmp_path / 'lora'}",
                cwd=tmp_path)
    _dreambooth("train", *common, f"--output_dir={tmp_path / 'full'}", cwd=tmp_path)
    single, kohya = tmp_path / "full.safetensors", tmp_path / "kohya.safetensors"
    _dreambooth("export", "--model", str(tmp_path / "full"), "--format", "single-file",
                "--output", str(single), cwd=tmp_path)
    _dreambooth("export", "--model", str(tmp_path / "lora"), "--format", "lora-kohya",
                "--output", str(kohya), cwd=tmp_path)
    assert load_file(kohya).keys() == load_file(kohya_lora_file(tmp_path / "lora")).keys()

    # The single file back through the command line, completed by the base folder.
    _dreambooth("export", "--model", str(single), "--single_file_config", str(base),
                "--format", "diffusers", "--output", str(tmp_path / "back"), cwd=tmp_path)
    trained = pipeline_class("flux").from_pretrained(tmp_path / "full")
    back = pipeline_class("flux").from_pretrained(tmp_path / "back")
    untouched = pipeline_class("flux").from_pretrained(base)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(trained, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    changed = untouched.transformer.state_dict()
    assert any(not torch.equal(changed[k], v) for k, v in trained.transformer.state_dict().items())

    # ...and a LoRA run can start from it.
    _dreambooth("train", *[f"--pretrained_model_name_or_path={single}" if a.startswith(
        "--pretrained_model_name_or_path=") else a for a in common],
        f"--single_file_config={base}", "--use_lora", "--rank=2", "--max_train_steps=1",
        f"--output_dir={tmp_path / 'from-single'}", cwd=tmp_path)
    assert kohya_lora_file(tmp_path / "from-single") is not None
