"""The command line: diffusers' flags, YAML config with overrides, errors, generate, DDP, and
the flags generated from the functions' signatures."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from dreambooth import cli
from dreambooth.cli import COMMANDS, build_parser, call, command_parameters, main
from dreambooth.config import option
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
    def load(folder):
        return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")

    a, b, base = load(tmp_path / "one"), load(tmp_path / "two"), load(tiny_model)
    def distance(x, y):
        return sum(((x[k] - y[k]).double() ** 2).sum() for k in x).sqrt().item()
    assert distance(a, b) < 0.02 * distance(a, base)
    # Class images were split across the two processes, each written once.
    assert len(list((tmp_path / "class").glob("class-*.png"))) == 4


# ------------------------------------------------------------------- generated flags
TARGETS = {"generate": ("dreambooth.generate", "generate"),
           "serve": ("dreambooth.serve.app", "run_server"),
           "export": ("dreambooth.formats.export", "export_model"),
           "eval": ("dreambooth.world.dreambench", "evaluate_model"),
           "demo": ("dreambooth.world.demo", "run_demo_preset")}


@pytest.fixture
def calls(monkeypatch):
    """Each command's function replaced by a stand-in (same signature and docstring) that
    records its keyword arguments."""
    recorded = {}
    # Import every command's modules first: a module imported while a stand-in is in place
    # (dreambooth.world.demo imports evaluate_model) would keep the stand-in for good.
    for load in COMMANDS.values():
        load()
    for name, (module, attribute) in TARGETS.items():
        real = getattr(importlib.import_module(module), attribute)

        @functools.wraps(real)
        def stand_in(*args, _name=name, **kwargs):
            assert not args, "the command line passes every argument by name"
            recorded[_name] = kwargs

        monkeypatch.setattr(f"{module}.{attribute}", stand_in)
    return recorded


def run_command(name: str, flags: list[str], calls: dict) -> dict:
    args = build_parser().parse_args([name, *flags])
    call(COMMANDS[name](), args)
    return calls[name]


def signature_defaults(command: cli.Command) -> dict:
    return {parameter.name: parameter.default for parameter, _ in command_parameters(command)
            if parameter.default is not parameter.empty}


REQUIRED_ONLY = {
    "generate": ["--model", "m", "--prompt", "p", "--output_dir", "out"],
    "serve": ["--model", "dog=models/dog"],
    "export": ["--model", "m", "--format", "diffusers", "--output", "out"],
    "eval": ["--model", "m", "--reference_dir", "refs", "--class_noun", "ball",
             "--output_dir", "out"],
    "demo": [],
}


@pytest.mark.parametrize("name", TARGETS)
def test_unset_flags_pass_the_functions_own_defaults(name, calls, monkeypatch):
    monkeypatch.delenv("DREAMBOOTH_API_KEY", raising=False)
    passed = run_command(name, REQUIRED_ONLY[name], calls)
    command = COMMANDS[name]()
    assert set(passed) == {parameter.name for parameter, _ in command_parameters(command)}
    defaults = signature_defaults(command)
    if name == "generate":
        del defaults["output_dir"]  # required on the command line: it writes the images
    if name == "serve":  # converted: NAME=PATH flags -> {name: path}, the key from the env
        assert passed.pop("loras") == {} and passed.pop("api_key") is None
        del defaults["loras"], defaults["api_key"]
    for key, default in defaults.items():
        assert passed[key] == default and type(passed[key]) is type(default), key


def test_flag_defaults_in_the_parser_are_the_signatures(calls):
    parser = build_parser()
    subparsers = next(action for action in parser._actions if action.dest == "command").choices
    for name in TARGETS:
        command = COMMANDS[name]()
        actions = {action.dest: action for action in subparsers[name]._actions}
        for parameter, _ in command_parameters(command):
            flag = command.flags.get(parameter.name, cli.Flag())
            action = actions[flag.name or parameter.name]
            assert action.help, f"{name} --{action.dest} has no help: add it to Args:"
            if parameter.default is parameter.empty or flag.required:
                assert action.required, (name, parameter.name)
            else:
                assert action.default == parameter.default, (name, parameter.name)


def test_every_flag_of_the_handwritten_parsers_still_means_the_same(tmp_path, calls,
                                                                    monkeypatch):
    """Each command with every flag it had before the flags were generated."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two\na sks ball\na red sks ball\n")
    monkeypatch.setenv("DREAMBOOTH_API_KEY", "from-env")
    assert run_command("generate", [
        "--model", "m", "--prompt", "p", "--negative_prompt", "blurry", "--num_images", "2",
        "--num_inference_steps", "3", "--guidance_scale", "5", "--seed", "9", "--height", "64",
        "--width", "48", "--scheduler", "euler_a", "--batch_size", "2", "--device", "cpu",
        "--dtype", "fp16", "--output_dir", "out", "--lora", "l.safetensors",
        "--lora_scale", "0.5"], calls) == dict(
        model="m", prompt="p", negative_prompt="blurry", num_images=2, num_inference_steps=3,
        guidance_scale=5.0, seed=9, height=64, width=48, scheduler="euler_a", output_dir="out",
        batch_size=2, device="cpu", dtype="fp16", lora="l.safetensors", lora_scale=0.5)
    assert run_command("serve", [
        "--model", "a=x", "--model", "b=y", "--lora", "s=l.safetensors", "--host", "0.0.0.0",
        "--port", "9000", "--device", "cpu", "--dtype", "bf16", "--max_queue", "3",
        "--max_batch", "2", "--batch_wait_ms", "5", "--max_upload_mb", "1.5",
        "--max_image_size", "512", "--max_steps", "20", "--max_work", "64",
        "--max_batch_megapixels", "2", "--max_client_requests", "4",
        "--shutdown_timeout_s", "1", "--state_dir", "jobs-state", "--max_queued_jobs", "3",
        "--job_retention_days", "7.5", "--jobs_database", "sqlite:///j.db", "--cors_origin", "https://ui.example",
        "--cors_origin", "http://localhost:3000"], calls) == dict(
        models={"a": "x", "b": "y"}, loras={"s": "l.safetensors"}, host="0.0.0.0", port=9000,
        api_key="from-env", device="cpu", dtype="bf16", max_queue=3, max_batch=2,
        batch_wait_ms=5.0, max_upload_mb=1.5, max_image_size=512, max_steps=20,
        max_work=64.0, max_batch_megapixels=2.0, max_client_requests=4, shutdown_timeout_s=1.0,
        state_dir="jobs-state", max_queued_jobs=3, job_retention_days=7.5,
        jobs_database="sqlite:///j.db", cors_origins=("https://ui.example", "http://localhost:3000"))
    assert run_command("serve", ["--model", "a=x", "--api_key", "k"], calls)["api_key"] == "k"
    assert run_command("export", [
        "--model", "m", "--format", "single-file", "--output", "o.safetensors", "--dtype",
        "fp16", "--merge_lora", "l", "--lora_scale", "0.5", "--prediction_type",
        "v_prediction"], calls) == dict(
        model="m", fmt="single-file", output="o.safetensors", dtype="fp16",
        merge_lora_path="l", lora_scale=0.5, prediction_type="v_prediction",
        single_file_config=None)
    assert run_command("eval", [
        "--model", "m", "--reference_dir", "r", "--identifier", "zwx", "--class_noun", "ball",
        "--prompts", str(prompts), "--images_per_prompt", "3", "--num_inference_steps", "5",
        "--guidance_scale", "2", "--seed", "4", "--device", "cpu", "--output_dir", "o",
        "--batch_size", "6"],
        calls) == dict(
        model="m", reference_dir="r", identifier="zwx", class_noun="ball",
        prompts=["a sks ball", "a red sks ball"], images_per_prompt=3, num_inference_steps=5,
        guidance_scale=2.0, seed=4, device="cpu", output_dir="o", batch_size=6)
    assert run_command("demo", ["--output_dir", "d", "--fast", "--max_train_steps", "7"],
                       calls) == dict(output_dir="d", fast=True, max_train_steps=7)
    for bad in (["generate", "--model", "m", "--prompt", "p", "--output_dir", "o",
                 "--scheduler", "nope"],
                ["generate", "--model", "m", "--prompt", "p"],  # --output_dir is required
                ["export", "--model", "m", "--format", "zip", "--output", "o"],
                ["eval", "--model", "m", "--reference_dir", "r", "--output_dir", "o"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


def test_demo_flags_pick_the_settings(monkeypatch):
    from dreambooth.world import demo

    ran = []
    monkeypatch.setattr(demo, "run_demo", lambda output_dir, settings: ran.append(settings))
    demo.run_demo_preset("d")
    demo.run_demo_preset("d", fast=True, max_train_steps=7)
    assert ran == [demo.DemoSettings(), dataclasses.replace(demo.FAST, max_train_steps=7)]


def test_a_command_whose_extra_is_missing_says_so_and_the_rest_still_run(monkeypatch, capsys):
    def missing_extra():
        raise ImportError("`dreambooth serve` needs the `serve` extra: pip install ...")

    monkeypatch.setitem(COMMANDS, "serve", missing_extra)
    assert main(["serve", "--model", "dog=x", "--port", "0"]) == 2
    assert "needs the `serve` extra" in capsys.readouterr().err
    assert main(["train", "--pretrained_model_name_or_path=m", "--instance_data_dir=d",
                 "--instance_prompt=a sks dog", "--print_config"]) == 0


def test_docstring_args_read_google_style_sections():
    def function(alpha, beta=1, **options):
        """Summary.

        Args:
            alpha: First line
                continued here.
            beta: One line.
            **options: Passed on.

        Returns:
            gamma: not an argument.
        """

    assert cli.docstring_args(function) == {"alpha": "First line continued here.",
                                            "beta": "One line.", "options": "Passed on."}
    assert cli.docstring_args(lambda: None) == {}


def test_dataclass_flags_typed_with_the_fields_defaults():
    @dataclasses.dataclass
    class Settings:
        channels: tuple[int, ...] = option((8, 16), "Block channels.")
        rate: float = option(0.5, "A share (50%).")
        ema: bool = option(True, "Keep an EMA.")

    parser = cli.argparse.ArgumentParser()
    hints = {"channels": tuple[int, ...], "rate": float, "ema": bool}
    cli.add_dataclass_flags(parser, [(f, hints[f.name]) for f in dataclasses.fields(Settings)])
    assert vars(parser.parse_args([])) == {"channels": (8, 16), "rate": 0.5, "ema": True}
    assert vars(parser.parse_args(["--channels", "4,8,8", "--rate", "1", "--no-ema"])) == {
        "channels": (4, 8, 8), "rate": 1.0, "ema": False}
    assert "A share (50%). (default: 0.5)" in " ".join(parser.format_help().split())
