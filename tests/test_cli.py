"""The command line: diffusers' flags, YAML config with overrides, errors, generate, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from dreambooth.cli import main
from dreambooth.formats.infotext import parse_parameters
from dreambooth.images import read_png_text


def diffusers_command(model: Path, instance: Path, output: Path) -> list[str]:
    """A command line as users run diffusers' train_dreambooth.py (tiny sizes)."""
    return [
        "train", f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={instance}",
        "--instance_prompt", "a photo of sks dog", "--with_prior_preservation",
        "--prior_loss_weight=1.0", f"--class_data_dir={output.parent / 'class'}",
        "--class_prompt", "a photo of dog", "--num_class_images", "2", "--sample_batch_size", "2",
        "--resolution=32", "--center_crop", "--train_batch_size=1",
        "--gradient_accumulation_steps=1", "--gradient_checkpointing", "--learning_rate=5e-6",
        "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=2",
        "--checkpointing_steps=1", "--checkpoints_total_limit=1", "--mixed_precision=no",
        "--seed=0", "--report_to=tensorboard", f"--output_dir={output}", "--offset_noise",
        "--snr_gamma=5.0", "--max_grad_norm=1.0", "--scale_lr", "--validation_steps=100",
        "--num_validation_images=1", "--enable_xformers_memory_efficient_attention",
        "--pre_compute_text_embeddings", "--class_inference_steps=2", "--accelerator=cpu",
    ]


def test_diffusers_command_line_runs_unchanged(tmp_path, tiny_model, instance_dir, capsys):
    output = tmp_path / "out"
    assert main(diffusers_command(tiny_model, instance_dir, output)) == 0
    assert (output / "model_index.json").exists()
    assert [p.name for p in (output / "checkpoints").iterdir()] == ["checkpoint-2.ckpt"]
    saved = yaml.safe_load((output / "training_config.yaml").read_text())
    assert saved["gradient_checkpointing"] is True and saved["snr_gamma"] == 5.0


def test_yaml_config_with_flag_overrides_and_print_config(tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({
        "pretrained_model_name_or_path": "some/model", "instance_data_dir": "photos",
        "instance_prompt": "a photo of sks dog", "resolution": 256, "train_text_encoder": True,
        "learning_rate": 2e-6}))
    code = main(["train", "--config", str(config_file), "--resolution", "512",
                 "--no-train_text_encoder", "--print_config"])
    assert code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["resolution"] == 512  # flag overrides the file
    assert printed["train_text_encoder"] is False
    assert printed["learning_rate"] == 2e-6  # file overrides the default
    assert printed["lr_scheduler"] == "constant"  # default


def test_unknown_keys_and_bad_values_reported_at_once(tmp_path, capsys):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml.safe_dump({
        "pretrained_model_name_or_path": "m", "instance_data_dir": "d",
        "instance_prompt": "a sks dog", "learning_rte": 1e-6, "resolution": "big",
        "mixed_precision": "fp8", "train_batch_size": 0}))
    code = main(["train", "--config", str(config_file), "--max_train_steps", "many"])
    assert code == 2
    err = capsys.readouterr().err
    for expected in ("unknown key 'learning_rte'; did you mean 'learning_rate'?",
                     "resolution='big' is not an integer", "mixed_precision='fp8'",
                     "train_batch_size=0", "max_train_steps='many' is not an integer",
                     str(config_file)):
        assert expected in err, err


def test_missing_config_file_is_named(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_generate_command_writes_pngs_with_parameters(tmp_path, tiny_model, capsys):
    code = main(["generate", "--model", str(tiny_model), "--prompt", "a photo of sks dog",
                 "--negative_prompt", "blurry", "--num_images", "2", "--num_inference_steps", "2",
                 "--guidance_scale", "5", "--seed", "11", "--scheduler", "euler_a",
                 "--height", "32", "--width", "32", "--output_dir", str(tmp_path / "gen")])
    assert code == 0
    pngs = sorted((tmp_path / "gen").glob("0*.png"))
    assert len(pngs) == 2 and list((tmp_path / "gen").glob("grid-*.png"))
    fields = parse_parameters(read_png_text(pngs[1])["parameters"])
    assert fields["prompt"] == "a photo of sks dog"
    assert fields["negative_prompt"] == "blurry"
    assert fields["Seed"] == "12" and fields["Sampler"] == "Euler a"
    assert fields["Steps"] == "2" and fields["CFG scale"] == "5.0" and fields["Size"] == "32x32"


def test_generate_with_bad_model_folder_fails_cleanly(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    code = main(["generate", "--model", str(tmp_path / "notamodel"), "--prompt", "x",
                 "--output_dir", str(tmp_path / "gen")])
    assert code == 2
    assert "model_index.json" in capsys.readouterr().err


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "dreambooth", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_two_process_cpu_ddp_matches_one_process_with_same_global_batch(
        tmp_path, tiny_model, instance_dir):
    """strategy=ddp, devices=2, batch 1 per process == 1 process with batch 2.

    Same samples and noise by construction; the gradients agree to float rounding (different
    batch shapes in the kernels and the all-reduce order), which Adam can magnify for weights
    whose gradient is ~0. Tolerance: the two runs' weights differ by under 2% of how far
    training moved them.
    """
    common = [
        "train", f"--pretrained_model_name_or_path={tiny_model}",
        f"--instance_data_dir={instance_dir}", "--instance_prompt=a photo of sks dog",
        "--with_prior_preservation", f"--class_data_dir={tmp_path / 'class'}",
        "--class_prompt=a photo of dog", "--num_class_images=4", "--class_inference_steps=2",
        "--resolution=32", "--max_train_steps=3", "--learning_rate=1e-3", "--lr_warmup_steps=0",
        "--seed=3", "--accelerator=cpu", "--report_to=none",
    ]
    two = _run_cli(common + [f"--output_dir={tmp_path / 'two'}", "--strategy=ddp",
                             "--devices=2", "--train_batch_size=1"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _run_cli(common + [f"--output_dir={tmp_path / 'one'}", "--devices=1",
                             "--train_batch_size=2"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    load = lambda d: load_file(d / "unet" / "diffusion_pytorch_model.safetensors")
    a, b, base = load(tmp_path / "one"), load(tmp_path / "two"), load(tiny_model)
    def distance(x, y):
        return sum(((x[k] - y[k]).double() ** 2).sum() for k in x).sqrt().item()
    assert distance(a, b) < 0.02 * distance(a, base)
    # Class images were split across the two processes, each written once.
    assert len(list((tmp_path / "class").glob("class-*.png"))) == 4
