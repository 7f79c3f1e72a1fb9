"""`dreambooth eval`: every file on a tiny model, metrics that tell good models from broken
ones, and errors named."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from dreambooth.cli import main
from dreambooth.images import load_image_folder
from dreambooth.world import (
    PLAIN,
    SUBJECTS,
    Scene,
    parse_prompt,
    photos,
    render,
    sample_pose,
    scene_rng,
)
from dreambooth.world import metrics as world_metrics
from dreambooth.world.dreambench import default_prompts, evaluate_model, prompt_set_ceiling


def _photo_folder(folder, subject: str):
    folder.mkdir()
    for index, image in enumerate(photos(subject, n=4)):
        image.save(folder / f"{index}.png")
    return folder


@pytest.fixture
def reference_dir(tmp_path):
    return _photo_folder(tmp_path / "refs", "polka_ball")


def _tiles(grid_path, count: int) -> list:
    """The `count` images of a one-row grid."""
    grid = Image.open(grid_path).convert("RGB")
    side = grid.height
    return [grid.crop((index * side, 0, (index + 1) * side, side)) for index in range(count)]


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
    assert len(list((out / "prompts").glob("*.png"))) == 2
    # metrics.json holds the metrics of the images the grids show (prompt by prompt, then the
    # class prompt's), scored against the reference photos.
    groups = [_tiles(out / "prompts" / f"{index:03d}.png", 2) for index in range(2)]
    class_images = _tiles(out / "class-prompt.png", 2)
    references = [image for _, image in load_image_folder(reference_dir)]
    generated = groups[0] + groups[1]
    expected = {
        "subject_fidelity": world_metrics.subject_fidelity(generated, references),
        "prompt_fidelity": world_metrics.prompt_fidelity(
            generated, ["a sks ball on the grass"] * 2 + ["a red sks ball"] * 2),
        "pres": world_metrics.pres(class_images, references),
        "div": world_metrics.div(groups)}
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, abs=1e-6)
    report = (out / "report.html").read_text()
    assert "prompts/000.png" in report and "a sks ball on the grass" in report
    assert (out / "references.png").exists() and (out / "class-prompt.png").exists()


def test_a_model_that_reproduces_the_subject_scores_high(tmp_path, reference_dir, monkeypatch):
    """Stand in a perfect personalized model (it returns the subject's photos): subject
    fidelity is high and the prompt "a sks ball" is fulfilled."""
    import dreambooth.world.dreambench as dreambench

    refs = [Image.open(p).convert("RGB") for p in sorted(reference_dir.glob("*.png"))]
    monkeypatch.setattr(dreambench, "sample_images",
                        lambda pipeline, prompt, seeds, **kwargs: refs[:len(seeds)])
    result = evaluate_model(object(), reference_dir, identifier="sks", class_noun="ball",
                            output_dir=tmp_path / "perfect", prompts=["a sks ball"],
                            images_per_prompt=2)
    assert result.subject_fidelity > 0.8 and result.prompt_fidelity == 1.0
    assert result.pres > 0.8  # its class images are the subject too: maximal drift


def _stand_in_model(*, follows_prompts: bool, overfit: bool):
    """`sample_images` of a model of the polka ball drawn by the renderer. A faithful one draws
    what each prompt asks (the subject for "sks", plain balls of other colors for "a ball") in a
    new pose per seed; an overfit one draws the subject in one pose on white for every prompt
    and seed, the paper's failure mode (no prompt fidelity, no diversity, class collapse)."""
    subject = SUBJECTS["polka_ball"]

    def sample_images(pipeline, prompt, seeds, **kwargs):
        prompts = [prompt] * len(seeds) if isinstance(prompt, str) else prompt
        images = []
        for prompt, seed in zip(prompts, seeds):  # one prompt a seed, as sample_images takes
            asked = parse_prompt(prompt) if follows_prompts else {}
            pose = sample_pose(scene_rng(0 if overfit else seed))
            is_subject = overfit or "sks" in prompt
            default_color = subject.color if is_subject else ("red", "green", "purple")[seed % 3]
            images.append(render(Scene(
                subject.cls, asked.get("color", default_color), asked.get("background", "white"),
                look=subject.look if is_subject else PLAIN, **pose)))
        return images
    return sample_images


def test_metrics_tell_a_faithful_model_from_an_overfit_one(tmp_path, reference_dir, monkeypatch):
    import dreambooth.world.dreambench as dreambench

    prompts = ["a sks ball on the grass", "a sks ball on the beach",
               "a sks ball on a pink background", "a red sks ball", "a green sks ball"]

    def evaluate(name, references, **model):
        monkeypatch.setattr(dreambench, "sample_images", _stand_in_model(**model))
        return evaluate_model(object(), references, identifier="sks", class_noun="ball",
                              output_dir=tmp_path / name, prompts=prompts, images_per_prompt=3)

    faithful = evaluate("faithful", reference_dir, follows_prompts=True, overfit=False)
    other_subject = evaluate("other", _photo_folder(tmp_path / "other-refs", "cyclops_star"),
                             follows_prompts=True, overfit=False)
    overfit = evaluate("overfit", reference_dir, follows_prompts=False, overfit=True)
    # Subject fidelity: the subject's own photos, not another subject's (measured: 0.69, 0.02).
    assert faithful.subject_fidelity > other_subject.subject_fidelity + 0.3, (
        faithful, other_subject)
    # Prompt fidelity: every prompt asks a background or a color the overfit model never draws.
    assert faithful.prompt_fidelity >= 0.9 and overfit.prompt_fidelity <= 0.1, (faithful, overfit)
    # PRES: plain balls of other colors score low, "a ball" images that are the subject (class
    # collapse) high. Measured here: 0.01 and 0.92.
    assert faithful.pres <= 0.3 and overfit.pres >= 0.7, (faithful, overfit)
    # DIV: one image per prompt whatever the seed has none; new poses have some.
    assert overfit.div == pytest.approx(0.0, abs=1e-6) and faithful.div > 0.05, (faithful,
                                                                                 overfit)
    # Recoloring reads as another object to the identity embedding: the faithful model's
    # recolored subject scores far below its recontextualized one.
    assert (faithful.recontextualization_subject_fidelity
            > faithful.property_subject_fidelity + 0.2), faithful


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


class _LosslessVAE(torch.nn.Module):
    """encode/decode as identities: `vae_round_trip` returns the renders themselves."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode(self, pixels):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=pixels))

    def decode(self, latents):
        return SimpleNamespace(sample=latents)


def test_prompt_set_ceiling_scores_what_each_prompt_asks():
    """A perfect model's score on each kind of prompt: the subject in a new background scores
    like new photos of it; recolored (look kept) it scores far lower, and a prompt set with
    many color prompts cannot reach its photos' own fidelity."""
    subject = SUBJECTS["polka_ball"]
    references = photos(subject, n=5)
    backgrounds = ["a sks ball on the grass", "a sks ball on a pink background"]
    colors = ["a red sks ball", "a yellow sks ball"]
    ceiling = prompt_set_ceiling(_LosslessVAE(), subject, backgrounds + colors, references)
    recontext = ceiling["recontextualization_subject_fidelity"]
    recolor = ceiling["property_subject_fidelity"]
    assert recontext > 0.8 and recolor < recontext - 0.3, ceiling
    assert ceiling["subject_fidelity"] == pytest.approx((recontext + recolor) / 2, abs=1e-6)
    only_backgrounds = prompt_set_ceiling(_LosslessVAE(), subject, backgrounds, references)
    assert only_backgrounds["property_subject_fidelity"] is None
    assert only_backgrounds["subject_fidelity"] == pytest.approx(recontext, abs=1e-6)
    # "a blue ball on a blue background" would not show: rendered on gray instead, not raised
    assert prompt_set_ceiling(_LosslessVAE(), subject, ["a blue sks ball on a blue background"],
                              references)["subject_fidelity"] > 0.8


def test_dreambench_mini_benchmark_runs_seeds_and_merges(tmp_path):
    """benchmarks/dreambench_mini.py end to end on a tiny random model (its numbers mean
    nothing): two seeds of a held-out subject with the prior, then the merge of two files."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "dreambench_mini.py"

    def run(*args):
        done = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--base_model", "tiny", "--quick", "--steps", "2", "--subject_set", "held_out",
              "--arms", "with_prior", "--no-base_eval"]
    run(*common, "--seeds", "0", "--output", str(first))
    run(*common, "--seeds", "1", "--output", str(second))
    report = json.loads(first.read_text())
    (row,) = report["subjects"]
    assert row["subject"].startswith("held_out_0") and list(row["with_prior"]) == ["0"]
    # --quick keeps 3 prompts, all recontextualization ones
    assert row["ceiling"]["recontextualization_subject_fidelity"] is not None
    assert row["with_prior"]["0"]["property_subject_fidelity"] is None
    out = run("--merge", str(first), str(second), "--output", str(tmp_path / "merged.json"))
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert list(merged["subjects"][0]["with_prior"]) == ["0", "1"]
    assert merged["settings"]["seeds"] == [0, 1]
    assert "ceiling (each prompt rendered, through the VAE)" in out and " [" in out  # a range
