#!/usr/bin/env python
r"""Rebuild the project's base model of the procedural world from scratch.

The bundled model `demo` is this script's default run continued for 1500 stage-2 steps with
three times as many patterned objects: the continuation's stage-2 EMA weights at its end
(BENCHMARKS.md, "The world model"):

    .venv/bin/python scripts/pretrain_world_model.py --output_dir runs/world-model
    .venv/bin/python scripts/pretrain_world_model.py --output_dir runs/world-model-cont \
        --init_model runs/world-model/model --seed 1 --look_probability 0.3 \
        --unet_steps 1500 --unet_learning_rate 2e-4 --warmup_steps 100 --checkpoint_every 250

Stage 1 trains the VAE (AutoencoderKL, ~0.7M parameters, 64x64x3 -> 16x16x4), stage 1b its
decoder alone on finely patterned objects, stage 2 the CLIP text encoder (~0.9M) and the UNet
(~6.7M) on an endless stream of captioned renders (`dreambooth.world.pretrain`). Every stage
checkpoints every `--checkpoint_every` steps and on Ctrl-C; running the same command again
resumes where the run stopped, with the same result as an uninterrupted run. Progress goes to
`OUTPUT_DIR/pretrain.log` (loss, steps/s, time left; every `--sample_every` steps a grid of
held-out prompts and its prompt fidelity), CSV metrics to `OUTPUT_DIR/stage*/logs`. The result,
`OUTPUT_DIR/model`, is a diffusers folder with fp16 safetensors that
`StableDiffusionPipeline.from_pretrained` loads.

`--init_model MODEL` continues a finished model (`demo`, or a run's `model/`), as the second
command above does: its VAE as it is (stages 1 and 1b are skipped), stage 2 from its text
encoder and UNet with this run's stage-2 flags.

`--background` starts the run detached from the terminal and returns at once (stop it with
`kill PID`: it writes a checkpoint first). Every PretrainConfig field is a flag; tuples are
comma-separated (`--unet_channels 64,128,128`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import subprocess
import sys
import typing
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from dreambooth.cli import add_dataclass_flags
    from dreambooth.world.pretrain import PretrainConfig

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--background", action="store_true",
                        help="Run detached; output goes to OUTPUT_DIR/pretrain.out.")
    parser.add_argument("--export_checkpoint", metavar="CHECKPOINT", default=None,
                        help="Only export a stage-2 checkpoint ('latest', 'checkpoint-N') of the "
                             "run in OUTPUT_DIR as a model (OUTPUT_DIR/model-step-N), then exit.")
    hints = typing.get_type_hints(PretrainConfig)
    add_dataclass_flags(parser, [(field, hints[field.name])
                                 for field in dataclasses.fields(PretrainConfig)])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir)
    if args.background:
        output_dir.mkdir(parents=True, exist_ok=True)
        out = output_dir / "pretrain.out"
        child_args = [arg for arg in argv if arg != "--background"]
        with open(out, "ab") as handle:
            process = subprocess.Popen([sys.executable, __file__, *child_args], stdout=handle,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        print(f"pretraining in the background: pid {process.pid}\n"
              f"  progress: tail -f {output_dir / 'pretrain.log'}\n"
              f"  stop:     kill {process.pid}   (checkpoints first; rerun the command to resume)")
        return 0

    import signal

    import torch

    from dreambooth.world.pretrain import PretrainConfig, export_checkpoint, pretrain

    # `kill PID` behaves like Ctrl-C: Lightning's interrupt handling writes a checkpoint.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    values = {key: value for key, value in vars(args).items()
              if key not in ("background", "export_checkpoint")}
    try:
        config = PretrainConfig(**values)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(config.threads)
    try:
        if args.export_checkpoint:
            model = export_checkpoint(config, args.export_checkpoint)
        else:
            model = pretrain(config)
    except ValueError as error:  # a checkpoint that does not fit this configuration
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"base model: {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
