"""`dreambooth` command line: a thin layer over the Python API (train, generate, serve).

`dreambooth train` takes the flags of diffusers' examples/dreambooth/train_dreambooth.py,
generated from the typed config (config.py), plus `--config FILE` (flat YAML, flags override it)
and `--print_config` (print the resolved YAML and exit).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from dreambooth.config import (IGNORED_FLAGS, UNSUPPORTED_FLAGS, ConfigError, dump_yaml, field_type, leaf_fields,
                     load_yaml_config, parse_train_config)


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML file of config keys; flags override it.")
    parser.add_argument("--print_config", action="store_true",
                        help="Print the resolved configuration as YAML and exit.")
    for section, leaf in leaf_fields():
        base, _ = field_type(section, leaf)
        flag = f"--{leaf.name}"
        help_text = leaf.metadata.get("help", "")
        choices = leaf.metadata.get("choices")
        if base is bool:
            # `--flag` as in diffusers, `--no-flag` to override a YAML `true`.
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            # Values stay strings here; config.py converts and reports every bad one at once.
            shown = [str(choice) for choice in choices or () if choice is not None]
            metavar = "{" + ",".join(shown) + "}" if shown else base.__name__.upper()
            parser.add_argument(flag, default=argparse.SUPPRESS, metavar=metavar,
                                help=f"{help_text} (default: {leaf.default})")
    for name, reason in IGNORED_FLAGS.items():
        parser.add_argument(f"--{name}", nargs="?", const=True, default=argparse.SUPPRESS,
                            help=f"Ignored: {reason}.")
    for name, reason in UNSUPPORTED_FLAGS.items():
        parser.add_argument(f"--{name}", nargs="?", const=True, default=argparse.SUPPRESS,
                            help=f"Refused: {reason}.")


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    from dreambooth.generate import SCHEDULERS
    from dreambooth.models import DTYPES

    parser.add_argument("--model", required=True,
                        help="A training output_dir, a diffusers folder, a cached hub id, a "
                             "single-file checkpoint or 'demo' (the bundled world model).")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative_prompt", default="")
    parser.add_argument("--num_images", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=30)
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="Classifier-free guidance scale (1 disables guidance; default: the "
                             "model's own, 3 for 'demo' and models trained from it, else 7.5).")
    parser.add_argument("--seed", type=int, default=0, help="Image i uses seed + i.")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), default=None,
                        help="Sampler (default: the model's own scheduler).")
    parser.add_argument("--batch_size", type=int, default=None, help="Images per UNet batch.")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available).")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto = fp16 on CUDA, fp32 elsewhere.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--lora", default=None, metavar="FILE",
                        help="LoRA .safetensors (diffusers/peft or kohya format) or a folder "
                             "holding pytorch_lora_weights.safetensors.")
    parser.add_argument("--lora_scale", type=float, default=1.0,
                        help="LoRA strength (0 = off, 1 = as trained).")


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from dreambooth.models import DTYPES

    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="A model to serve as NAME (repeatable): a training output_dir, a "
                             "diffusers folder, a cached hub id or 'demo' (the bundled world "
                             "model). Without NAME=, the folder's "
                             "name (or the hub id) is the name. The first is the default model.")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                        help="A LoRA file or folder requests may name in `lora` (repeatable).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to bind (default: loopback only; 0.0.0.0 exposes it).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=None,
                        help="Require 'Authorization: Bearer KEY' on every route but /healthz "
                             "(default: the DREAMBOOTH_API_KEY environment variable, which "
                             "keeps the key out of the process list).")
    parser.add_argument("--device", default=None,
                        help="cuda, cpu, ... (default: cuda if available).")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto = fp16 on CUDA, fp32 elsewhere.")
    parser.add_argument("--max_queue", type=int, default=64,
                        help="Requests that may wait per model; one more gets 429.")
    parser.add_argument("--max_batch", type=int, default=8, help="Images per UNet batch.")
    parser.add_argument("--batch_wait_ms", type=float, default=10.0,
                        help="How long a worker waits for compatible requests to fill a batch.")
    parser.add_argument("--max_upload_mb", type=float, default=20.0,
                        help="Largest request body (uploads); larger gets 413.")
    parser.add_argument("--max_image_size", type=int, default=2048,
                        help="Largest image side in pixels.")
    parser.add_argument("--max_steps", type=int, default=150,
                        help="Most denoising steps a request may ask for.")


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    from dreambooth.formats.export import FORMATS
    from dreambooth.models import DTYPES

    parser.add_argument("--model", required=True,
                        help="A diffusers folder (training output_dir), a cached hub id, a "
                        ".safetensors/.ckpt single file, or for lora-* formats a LoRA run's "
                        "output_dir or LoRA .safetensors.")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="export_format",
                        help="diffusers folder, single-file checkpoint (A1111/ComfyUI), or LoRA "
                        "in the kohya or diffusers layout.")
    parser.add_argument("--output", required=True,
                        help="Folder for diffusers, .safetensors file otherwise; written "
                        "atomically, an existing diffusers folder must be empty.")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="Weight dtype written (default: as the model is stored).")
    parser.add_argument("--merge_lora", default=None, metavar="LORA",
                        help="Fuse this LoRA (.safetensors or LoRA output_dir) into the model "
                        "before exporting.")
    parser.add_argument("--lora_scale", type=float, default=1.0,
                        help="Strength of the merged LoRA (W + scale * alpha/r * BA).")
    parser.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default=None,
                        help="For a single-file SD 2.x --model whose type the file does not tell "
                        "(768-v models use v_prediction).")


def parse_named_paths(values: list[str], flag: str) -> dict[str, str]:
    """`NAME=PATH` (or a bare PATH, named after its folder) flags as {name: path}."""
    named: dict[str, str] = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator:
            path = value
            name = Path(value).name if Path(value).exists() else value
        if not name or not path:
            raise ValueError(f"{flag} '{value}' must be NAME=PATH")
        if name in named:
            raise ValueError(f"{flag} names '{name}' twice; give each a different NAME=")
        named[name] = path
    return named


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreambooth", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_arguments(commands.add_parser(
        "train", help="Personalize a Stable Diffusion model on a few subject photos."))
    _add_generate_arguments(commands.add_parser("generate", help="Generate images with a model."))
    _add_serve_arguments(commands.add_parser(
        "serve", help="Serve models over OpenAI's Images API, OpenRouter and A1111 (HTTP)."))
    _add_export_arguments(commands.add_parser(
        "export", help="Write a model as diffusers, single-file (A1111/ComfyUI) or LoRA files."))
    evaluation = commands.add_parser(
        "eval", help="Score a model against reference photos (subject/prompt fidelity, PRES, DIV).")
    evaluation.add_argument("--model", required=True, help="A training output_dir or pipeline.")
    evaluation.add_argument("--reference_dir", required=True, help="The subject's photos.")
    evaluation.add_argument("--identifier", default="sks")
    evaluation.add_argument("--class_noun", required=True, help="e.g. star, ball, dog.")
    evaluation.add_argument("--prompts", default=None,
                            help="File with one prompt a line (default: DreamBench-style set).")
    evaluation.add_argument("--images_per_prompt", type=int, default=4)
    evaluation.add_argument("--num_inference_steps", type=int, default=25)
    evaluation.add_argument("--guidance_scale", type=float, default=None,
                            help="Default: the model's own (3 for the world model), else 7.5.")
    evaluation.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--device", default=None)
    evaluation.add_argument("--output_dir", required=True)
    demo = commands.add_parser(
        "demo", help="The whole DreamBooth job on the bundled world model (minutes on a CPU).")
    demo.add_argument("--output_dir", default="runs/demo")
    demo.add_argument("--fast", action="store_true",
                      help="Every stage and file with minimal work (a smoke run).")
    demo.add_argument("--max_train_steps", type=int, default=None,
                      help="DreamBooth steps (default 400; 4 with --fast).")
    return parser


def resolve_train_config(args: argparse.Namespace):
    """YAML file -> command-line overrides -> validated TrainConfig."""
    overrides = {key: value for key, value in vars(args).items()
                 if key not in ("command", "config", "print_config")}
    values = load_yaml_config(args.config) if args.config else {}
    source = f"configuration ({args.config} + command line)" if args.config else "command line"
    return parse_train_config({**values, **overrides}, source=source)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    try:
        if args.command == "train":
            config = resolve_train_config(args)
            if args.print_config:
                print(dump_yaml(config), end="")
                return 0
            from dreambooth.train.run import train

            output_dir = train(config)
            print(f"trained pipeline: {output_dir}")
        elif args.command == "generate":
            from dreambooth.generate import generate

            result = generate(args.model, args.prompt, negative_prompt=args.negative_prompt,
                              num_images=args.num_images,
                              num_inference_steps=args.num_inference_steps,
                              guidance_scale=args.guidance_scale, seed=args.seed,
                              height=args.height, width=args.width, scheduler=args.scheduler,
                              output_dir=args.output_dir, batch_size=args.batch_size,
                              device=args.device, dtype=args.dtype, lora=args.lora,
                              lora_scale=args.lora_scale)
            for path in result.paths:
                print(path)
            if result.grid_path:
                print(result.grid_path)
        elif args.command == "serve":
            from dreambooth.serve.app import API_KEY_ENV, run_server

            run_server(parse_named_paths(args.model, "--model"),
                       loras=parse_named_paths(args.lora, "--lora"), host=args.host,
                       port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV),
                       device=args.device, dtype=args.dtype, max_queue=args.max_queue,
                       max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                       max_upload_mb=args.max_upload_mb, max_image_size=args.max_image_size,
                       max_steps=args.max_steps)
        elif args.command == "export":
            from dreambooth.formats.export import export_model

            print(export_model(args.model, args.export_format, args.output, dtype=args.dtype,
                               merge_lora_path=args.merge_lora, lora_scale=args.lora_scale,
                               prediction_type=args.prediction_type))
        elif args.command == "eval":
            import json
            from dataclasses import asdict

            from dreambooth.world.dreambench import evaluate_model, read_prompts

            result = evaluate_model(
                args.model, args.reference_dir, identifier=args.identifier,
                class_noun=args.class_noun, output_dir=args.output_dir,
                prompts=read_prompts(args.prompts) if args.prompts else None,
                images_per_prompt=args.images_per_prompt,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale, seed=args.seed, device=args.device)
            print(json.dumps(asdict(result), indent=2))
        elif args.command == "demo":
            from dataclasses import replace

            from dreambooth.world.demo import FAST, DemoSettings, run_demo

            settings = FAST if args.fast else DemoSettings()
            if args.max_train_steps is not None:
                settings = replace(settings, max_train_steps=args.max_train_steps)
            run_demo(Path(args.output_dir), settings)
    except (ConfigError, ValueError, FileNotFoundError, ImportError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
