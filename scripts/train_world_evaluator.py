#!/usr/bin/env python
"""Train the world evaluator that ships in the package, or measure a saved one.

    .venv/bin/python scripts/train_world_evaluator.py --train                # a few minutes
    .venv/bin/python scripts/train_world_evaluator.py --held_out_accuracy

`--train` renders fresh pairs of objects and trains the evaluator (`dreambooth.world.evaluator`)
into `--output_dir` (default: the package's own folder, replacing the shipped evaluator);
`--held_out_accuracy` scores a saved evaluator on a fresh held-out render set. Every
EvaluatorTrainConfig field is a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing


def build_parser() -> argparse.ArgumentParser:
    from dreambooth.cli import add_dataclass_flags
    from dreambooth.world.evaluator import ASSET_DIR, EvaluatorTrainConfig

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--train", action="store_true",
                        help="Train the evaluator on fresh renders and save it.")
    action.add_argument("--held_out_accuracy", action="store_true",
                        help="Accuracy of a saved evaluator on a fresh held-out render set.")
    parser.add_argument("--output_dir", default=str(ASSET_DIR),
                        help="Evaluator folder (default: the package's shipped one).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    hints = typing.get_type_hints(EvaluatorTrainConfig)
    add_dataclass_flags(parser, [(field, hints[field.name])
                                 for field in dataclasses.fields(EvaluatorTrainConfig)])
    return parser


def main(argv: list[str] | None = None) -> int:
    import torch

    from dreambooth.world.evaluator import (
        EvaluatorTrainConfig,
        held_out_accuracy,
        load_evaluator,
        train_evaluator,
    )

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train:
        config = EvaluatorTrainConfig(**{field.name: getattr(args, field.name)
                                         for field in dataclasses.fields(EvaluatorTrainConfig)})
        result = train_evaluator(args.output_dir, config)
    else:
        result = held_out_accuracy(load_evaluator(args.output_dir))
    print(json.dumps({key: round(value, 4) for key, value in result.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
