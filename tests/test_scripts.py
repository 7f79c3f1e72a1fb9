"""The maintainer scripts parse their flags from the configs they fill (no defaults restated)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

from dreambooth.world.evaluator import EvaluatorTrainConfig
from dreambooth.world.pretrain import PretrainConfig

SCRIPTS = Path(__file__).parent.parent / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_defaults_are_the_configs_own():
    evaluator = load_script("train_world_evaluator").build_parser().parse_args(["--train"])
    for field in dataclasses.fields(EvaluatorTrainConfig):
        assert getattr(evaluator, field.name) == getattr(EvaluatorTrainConfig(), field.name)
    pretrain = load_script("pretrain_world_model").build_parser().parse_args([])
    for field in dataclasses.fields(PretrainConfig):
        assert getattr(pretrain, field.name) == getattr(PretrainConfig(), field.name), field.name


def test_train_world_evaluator_writes_an_evaluator(tmp_path, capsys):
    script = load_script("train_world_evaluator")
    assert script.main(["--train", "--output_dir", str(tmp_path), "--num_pairs", "24",
                        "--epochs", "1", "--batch_pairs", "8", "--seed", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"cls", "color", "background"}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["training"]["num_pairs"] == 24 and saved["training"]["seed"] == 3
