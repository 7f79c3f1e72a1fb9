"""Bad input gets a clear error or warning that names the file or key, and loses nothing."""

from __future__ import annotations

import pytest
from PIL import Image

from conftest import tiny_config, write_subject_photos
from dreambooth.cli import main
from dreambooth.config import ConfigError
from dreambooth.images import ImageFolderError
from dreambooth.models import ModelLoadError
from dreambooth.train.run import train


def test_missing_instance_folder_is_named(tmp_path, tiny_model):
    with pytest.raises(ImageFolderError, match="does-not-exist"):
        train(tiny_config(tiny_model, tmp_path / "does-not-exist", tmp_path / "out"))


def test_empty_instance_folder_is_an_error(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"junk")
    with pytest.raises(ImageFolderError, match="empty"):
        train(tiny_config(tiny_model, tmp_path / "empty", tmp_path / "out"))


def test_broken_and_odd_files_are_skipped_with_warnings_and_training_runs(tmp_path, tiny_model):
    folder = write_subject_photos(tmp_path / "photos", count=3)
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated.png").write_bytes((folder / "photo-0.png").read_bytes()[:60])
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "photo-0-checkpoint.png").write_bytes(b"x")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.new("I;16", (40, 40), 40000).save(folder / "sixteen-bit.png")
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(folder / "transparent.png")
    Image.new("RGB", (16, 16), "green").save(folder / "tiny.png")
    with pytest.warns(UserWarning) as record:
        output = train(tiny_config(tiny_model, folder, tmp_path / "out", max_train_steps=1))
    messages = "\n".join(str(w.message) for w in record)
    assert "notes.txt" in messages and "truncated.png" in messages
    assert "tiny.png" in messages  # smaller than the resolution
    assert "ipynb_checkpoints" not in messages
    assert (output / "model_index.json").exists()


@pytest.mark.parametrize("overrides, key", [
    ({"resolution": 36}, "resolution=36 is not a multiple of 8"),
    ({"class_prompt": "a photo of sks dog", "with_prior_preservation": True,
      "class_data_dir": "c"}, "class_prompt equals instance_prompt"),
    ({"with_prior_preservation": True}, "class_data_dir is required"),
    ({"pre_compute_text_embeddings": True, "train_text_encoder": True},
     "pre_compute_text_embeddings cannot be used with train_text_encoder"),
    ({"report_to": "tensorboard,neptune"}, "unknown tracker(s) neptune"),
])
def test_invalid_settings_name_the_key(tmp_path, tiny_model, instance_dir, overrides, key):
    with pytest.raises(ConfigError) as error:
        tiny_config(tiny_model, instance_dir, tmp_path / "out", **overrides)
    assert key in str(error.value)


def test_instance_prompt_without_identifier_warns(tmp_path, tiny_model, instance_dir):
    config = tiny_config(tiny_model, instance_dir, tmp_path / "out", max_train_steps=1,
                         instance_prompt="a photo of dog", class_prompt="a photo of a dog")
    with pytest.warns(UserWarning, match="no word that class_prompt"):
        train(config)


@pytest.mark.parametrize("make_folder, expected", [
    (lambda p: p.mkdir(), "model_index.json is missing"),
    (lambda p: p.write_text("x"), "is a file"),
    (lambda p: None, "no such folder"),
])
def test_model_that_is_not_a_diffusers_pipeline(tmp_path, instance_dir, make_folder, expected):
    model = tmp_path / "model"
    make_folder(model)
    with pytest.raises(ModelLoadError, match=expected):
        train(tiny_config(model, instance_dir, tmp_path / "out"))


def test_uncached_hub_id_explains_how_to_fetch(tmp_path, instance_dir, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        train(tiny_config("someone/not-cached", instance_dir, tmp_path / "out"))


def test_8bit_adam_fails_clearly_where_it_cannot_run(tmp_path, tiny_model, instance_dir):
    with pytest.raises((ImportError, RuntimeError), match="use_8bit_adam"):
        train(tiny_config(tiny_model, instance_dir, tmp_path / "out", use_8bit_adam=True))


def test_cli_reports_bad_input_without_traceback(tmp_path, tiny_model, capsys):
    code = main(["train", f"--pretrained_model_name_or_path={tiny_model}",
                 f"--instance_data_dir={tmp_path / 'nowhere'}", "--instance_prompt=a sks dog",
                 f"--output_dir={tmp_path / 'out'}", "--resolution=32"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


def test_failed_run_keeps_earlier_output(tmp_path, tiny_model, instance_dir):
    output = train(tiny_config(tiny_model, instance_dir, tmp_path / "out", max_train_steps=1))
    before = (output / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(ImageFolderError):
        train(tiny_config(tiny_model, tmp_path / "gone", output, max_train_steps=1))
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before


def test_cached_hub_id_resolves_offline(tmp_path, tiny_model, monkeypatch):
    """A hub id in the local Hugging Face cache loads without the network."""
    import shutil

    from dreambooth.models import resolve_model_path

    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-sd"
    commit = "0" * 40
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    resolved = resolve_model_path("someone/tiny-sd")
    assert (resolved / "model_index.json").exists()
    assert resolved.name == commit


def test_tracker_without_its_extra_names_the_extra(tmp_path, tiny_model, instance_dir):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:  # an optional extra; needs it absent
        pytest.skip("wandb is installed here")
    with pytest.raises(ImportError, match=r"dreambooth\[wandb\]"):
        train(tiny_config(tiny_model, instance_dir, tmp_path / "out", report_to="wandb"))


def test_unsupported_diffusers_flags_are_refused_with_alternatives(tmp_path, capsys):
    code = main(["train", "--pretrained_model_name_or_path=m", "--instance_data_dir=d",
                 "--instance_prompt=a sks dog", "--dataset_name=someone/photos",
                 "--do_edm_style_training", "--print_config"])
    assert code == 2
    err = capsys.readouterr().err
    assert "dataset_name is not supported" in err and "--instance_data_dir" in err
    assert "do_edm_style_training is not supported" in err


def test_prodigy_without_its_package_names_it(tmp_path, tiny_model, instance_dir):
    import importlib.util

    if importlib.util.find_spec("prodigyopt") is not None:
        pytest.skip("prodigyopt is installed here")
    with pytest.raises(ImportError, match="prodigyopt"):
        train(tiny_config(tiny_model, instance_dir, tmp_path / "out", optimizer="prodigy"))
