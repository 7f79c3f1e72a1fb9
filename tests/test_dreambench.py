"""`dreambooth eval` on a tiny model: every file, metrics in range, and errors named."""

from __future__ import annotations

import json

import pytest

from dreambooth.cli import main
from dreambooth.world import photos
from dreambooth.world.dreambench import default_prompts, evaluate_model


@pytest.fixture
def reference_dir(tmp_path):
    folder = tmp_path / "refs"
    folder.mkdir()
    for index, image in enumerate(photos("polka_ball", n=4)):
        image.save(folder / f"{index}.png")
    return folder


def test_eval_command_writes_metrics_grids_and_report(tmp_path, tiny_model, reference_dir,
                                                      capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na sks ball on the grass\na red sks ball\n")
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tiny_model), "--reference_dir", str(reference_dir),
                 "--class_noun", "ball", "--prompts", str(prompts), "--images_per_prompt", "2",
                 "--num_inference_steps", "2", "--device", "cpu", "--output_dir", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_prompts"] == 2 and metrics["images_per_prompt"] == 2
    assert -1 <= metrics["subject_fidelity"] <= 1 and -1 <= metrics["pres"] <= 1
    assert 0 <= metrics["prompt_fidelity"] <= 1 and 0 <= metrics["div"] <= 1
    assert len(list((out / "prompts").glob("*.png"))) == 2
    report = (out / "report.html").read_text()
    assert "prompts/000.png" in report and "a sks ball on the grass" in report
    assert (out / "references.png").exists() and (out / "class-prompt.png").exists()


def test_a_model_that_reproduces_the_subject_scores_high(tmp_path, reference_dir, monkeypatch):
    """Stand in a perfect personalized model (it returns the subject's photos): subject
    fidelity is high and the prompt "a sks ball" is fulfilled."""
    from PIL import Image

    import dreambooth.world.dreambench as dreambench

    refs = [Image.open(p).convert("RGB") for p in sorted(reference_dir.glob("*.png"))]
    monkeypatch.setattr(dreambench, "sample_images",
                        lambda pipeline, prompt, seeds, **kwargs: refs[:len(seeds)])
    result = evaluate_model(object(), reference_dir, identifier="sks", class_noun="ball",
                            output_dir=tmp_path / "perfect", prompts=["a sks ball"],
                            images_per_prompt=2)
    assert result.subject_fidelity > 0.8 and result.prompt_fidelity == 1.0
    assert result.pres > 0.8  # its class images are the subject too: maximal drift


def test_default_prompts_cover_backgrounds_and_colors():
    prompts = default_prompts("sks", "star")
    assert "a sks star on the grass" in prompts and "a red sks star" in prompts


def test_eval_errors_name_what_is_wrong(tmp_path, tiny_model, reference_dir, capsys):
    assert main(["eval", "--model", str(tiny_model), "--reference_dir", str(tmp_path / "none"),
                 "--class_noun", "ball", "--output_dir", str(tmp_path / "o")]) == 2
    assert "none" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model), "--reference_dir", str(reference_dir),
                 "--class_noun", "ball", "--prompts", str(tmp_path / "missing.txt"),
                 "--output_dir", str(tmp_path / "o")]) == 2
    assert "missing.txt" in capsys.readouterr().err
