"""A corpus of bad inputs through the command line: each one is answered with one `error:` line
that names what is wrong, exit code 2, no traceback, and nothing written where it should not be.

Each case builds its bad input in a fresh folder; `{model}`, `{photos}` and `{tmp}` in the
arguments are filled in. Add a case here when a user finds a new way to feed us garbage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import write_subject_photos
from dreambooth.cli import main


def _yaml(tmp: Path, content: bytes) -> None:
    (tmp / "config.yaml").write_bytes(content)


def _pickle_checkpoint(tmp: Path) -> None:
    (tmp / "out" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "odd": Path("x")}, tmp / "out" / "checkpoints" / "evil.ckpt")


def _truncated_checkpoint(tmp: Path) -> None:
    folder = tmp / "out" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, folder / "checkpoint-5.ckpt")
    data = (folder / "checkpoint-5.ckpt").read_bytes()
    (folder / "checkpoint-5.ckpt").write_bytes(data[:200])


def _symlink_loops(tmp: Path) -> None:
    (tmp / "loops").mkdir()
    (tmp / "loops" / "a.png").symlink_to(tmp / "loops" / "b.png")
    (tmp / "loops" / "b.png").symlink_to(tmp / "loops" / "a.png")


def _concepts(tmp: Path, **extra) -> None:
    entry = {"instance_data_dir": str(tmp / "photos"), "instance_prompt": "a sks dog", **extra}
    (tmp / "concepts.json").write_text(json.dumps([entry]))


def _kohya_with_stray_folder(tmp: Path) -> None:
    write_subject_photos(tmp / "kohya" / "10_sks dog", count=1)
    (tmp / "kohya" / "extra").mkdir()


def _wrong_size_mask(tmp: Path) -> None:
    Image.new("L", (16, 16), 255).save(tmp / "photos" / "photo-0.mask.png")


TRAIN = ["train", "--pretrained_model_name_or_path", "{model}", "--instance_data_dir",
         "{photos}", "--instance_prompt", "a sks dog", "--output_dir", "{tmp}/out",
         "--resolution", "32", "--accelerator", "cpu", "--report_to", "none"]

CASES = {
    # name: (make the bad input, argv, words the error line must hold)
    "learning rate nan": (None, TRAIN + ["--learning_rate", "nan"], "learning_rate='nan'"),
    "learning rate inf": (None, TRAIN + ["--learning_rate", "inf"], "not a finite number"),
    "max_grad_norm nan": (None, TRAIN + ["--max_grad_norm", "nan"], "max_grad_norm"),
    "huge resolution": (None, TRAIN + ["--resolution", "100000"], "resolution=100000"),
    "resolution beyond the model": (None, TRAIN + ["--resolution", "512"],
                                    "more than twice"),
    "negative batch": (None, TRAIN + ["--train_batch_size", "-3"], "train_batch_size=-3"),
    "text for a number": (None, TRAIN + ["--rank", "four", "--use_lora"], "rank='four'"),
    "yaml with number keys": (lambda t: _yaml(t, b"1: 2\n"),
                              TRAIN + ["--config", "{tmp}/config.yaml"], "keys must be strings"),
    "binary yaml": (lambda t: _yaml(t, b"\x89PNG\r\n\x1a\n\x00\xff"),
                    TRAIN + ["--config", "{tmp}/config.yaml"], "config.yaml"),
    "yaml list": (lambda t: _yaml(t, b"- a\n- b\n"), TRAIN + ["--config", "{tmp}/config.yaml"],
                  "mapping"),
    "config is a folder": (None, TRAIN + ["--config", "{tmp}"], "is a folder"),
    "unknown yaml key": (lambda t: _yaml(t, b"learnign_rate: 1\n"),
                         TRAIN + ["--config", "{tmp}/config.yaml"], "learning_rate"),
    "output_dir is a file": (lambda t: (t / "out").write_text("x"), TRAIN, "is a file"),
    "photos folder missing": (None, TRAIN[:4] + ["{tmp}/none"] + TRAIN[5:], "none"),
    "photos are symlink loops": (_symlink_loops, TRAIN[:4] + ["{tmp}/loops"] + TRAIN[5:],
                                 "no image or no readable file"),
    "model missing": (None, ["train", "--pretrained_model_name_or_path", "{tmp}/nope"]
                      + TRAIN[3:], "nope"),
    "resume truncated": (_truncated_checkpoint,
                         TRAIN + ["--resume_from_checkpoint", "{tmp}/out/checkpoints/"
                                  "checkpoint-5.ckpt"], "truncated or corrupt"),
    "resume latest all broken": (_truncated_checkpoint,
                                 TRAIN + ["--resume_from_checkpoint", "latest"], "loads"),
    "resume pickle": (_pickle_checkpoint,
                      TRAIN + ["--resume_from_checkpoint", "{tmp}/out/checkpoints/evil.ckpt"],
                      "run code"),
    "validation prompts missing": (None, TRAIN + ["--validation_prompts", "{tmp}/p.txt"],
                                   "p.txt' does not exist"),
    "validation prompts binary": (lambda t: (t / "p.txt").write_bytes(b"\x89PNG\r\n\x00\xff"),
                                  TRAIN + ["--validation_prompts", "{tmp}/p.txt"],
                                  "p.txt' is not a text file"),
    "validation prompts only comments": (lambda t: (t / "p.txt").write_text("# none\n\n"),
                                         TRAIN + ["--validation_prompts", "{tmp}/p.txt"],
                                         "p.txt' holds no prompt"),
    "validation prompts too many": (lambda t: (t / "p.txt").write_text("a sks dog\n" * 65),
                                    TRAIN + ["--validation_prompts", "{tmp}/p.txt"],
                                    "65 prompts, more than 64"),
    "validation photos missing": (None, TRAIN + ["--validation_data_dir", "{tmp}/held"],
                                  "--validation_data_dir"),
    "generate zero images": (None, ["generate", "--model", "{model}", "--prompt", "x",
                                    "--num_images", "0", "--output_dir", "{tmp}/g"],
                             "num_images=0"),
    "generate empty prompt": (None, ["generate", "--model", "{model}", "--prompt", " ",
                                     "--output_dir", "{tmp}/g"], "prompt is empty"),
    "generate lora missing": (None, ["generate", "--model", "{model}", "--prompt", "x",
                                     "--lora", "{tmp}/none.safetensors", "--output_dir",
                                     "{tmp}/g"], "none.safetensors"),
    "concepts unknown key": (lambda t: _concepts(t, class_dir="x"),
                             TRAIN[:3] + TRAIN[7:] + ["--concepts", "{tmp}/concepts.json"],
                             "entry 1: unknown key 'class_dir'"),
    "concepts folder missing": (lambda t: _concepts(t, instance_data_dir=str(t / "gone")),
                                TRAIN[:3] + TRAIN[7:] + ["--concepts", "{tmp}/concepts.json"],
                                "gone' does not exist"),
    "concepts beside instance flags": (_concepts, TRAIN + ["--concepts", "{tmp}/concepts.json"],
                                       "give them per concept"),
    "kohya stray subfolder": (_kohya_with_stray_folder,
                              TRAIN[:4] + ["{tmp}/kohya"] + TRAIN[5:], "'extra' is not named"),
    "mask of another size": (_wrong_size_mask, TRAIN + ["--max_train_steps", "1"],
                             "photo-0.mask.png' is 16x16"),
    "metadata.jsonl not json": (lambda t: (t / "photos" / "metadata.jsonl").write_text("{x\n"),
                                TRAIN, "metadata.jsonl' line 1 is not JSON"),
    "buckets off the step grid": (None, TRAIN + ["--aspect_buckets"],
                                  "pass bucket_reso_steps=32"),
    "caption dropout above 1": (None, TRAIN + ["--caption_dropout_rate", "2"],
                                "caption_dropout_rate=2.0"),
    "export pickle output": (None, ["export", "--model", "{model}", "--format", "single-file",
                                    "--output", "{tmp}/m.ckpt"], ".safetensors"),
    "export lora of a full model": (None, ["export", "--model", "{model}", "--format",
                                           "lora-kohya", "--output", "{tmp}/l.safetensors"],
                                    "pytorch_lora_weights.safetensors"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_clear_line(name, tmp_path, tiny_model, capsys):
    make, argv, expected = CASES[name]
    photos = write_subject_photos(tmp_path / "photos")
    if make is not None:
        make(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    filled = [arg.format(model=tiny_model, photos=photos, tmp=tmp_path) for arg in argv]
    code = main(filled)
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(error_lines) == 1 and expected in err, err
    assert "Traceback" not in err
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # Nothing new but what a failed run may leave: logs and checkpoint bookkeeping.
    assert [p for p in after if p not in before and p.parts[:2] != ("out", "logs")] == [], name
