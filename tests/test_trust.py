"""A failed or bad run never damages what the user has; bad input gets one clear line.

Each test here was written against a failure a user met (issue "Trust"): it fails without the
fix it guards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import tiny_config
from dreambooth.cli import main
from dreambooth.config import ConfigError, load_yaml_config
from dreambooth.files import DiskFullError, atomic_folder, atomic_path, atomic_write_bytes
from dreambooth.train import checkpointing
from dreambooth.train.module import NonFiniteError
from dreambooth.train.run import train


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "checkpoints" not in p.parts
            and "logs" not in p.parts}


@pytest.fixture(scope="module")
def good_model(tmp_path_factory, tiny_model):
    """A finished training output folder (the model a user already has)."""
    from conftest import write_subject_photos

    root = tmp_path_factory.mktemp("good")
    photos = write_subject_photos(root / "photos")
    output = train(tiny_config(tiny_model, photos, root / "out", max_train_steps=2))
    return output, photos


@pytest.mark.parametrize("key", ["learning_rate", "max_grad_norm", "prior_loss_weight",
                                 "adam_epsilon", "text_encoder_lr", "snr_gamma"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(tmp_path, tiny_model, instance_dir, key, value):
    with pytest.raises(ConfigError, match=f"{key}={value!r} is not a finite number"):
        tiny_config(tiny_model, instance_dir, tmp_path / "out", **{key: value})


class _PoisonWeights(L.Callback):
    """Puts NaN into one trained weight after optimizer step `step` (an fp16 overflow would)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(p for p in pl_module.unet.parameters() if p.requires_grad).fill_(float("nan"))


@pytest.mark.parametrize("poison_step, steps", [(1, 3), (2, 2)])
def test_non_finite_run_stops_and_keeps_the_existing_model(tmp_path, good_model, tiny_model,
                                                           poison_step, steps):
    output, photos = good_model
    before = _digests(output)
    config = tiny_config(tiny_model, photos, output, max_train_steps=steps,
                         instance_prompt="a photo of zzq dog", checkpointing_steps=1)
    with pytest.raises(NonFiniteError, match="step"):
        train(config, callbacks=[_PoisonWeights(poison_step)])
    assert _digests(output) == before  # weights and training_config.yaml untouched
    for _, path in checkpointing.list_checkpoints(output / "checkpoints"):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path


class _Crash(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        raise RuntimeError("simulated crash mid-run")


def test_failed_run_does_not_rewrite_the_models_config(tmp_path, good_model, tiny_model):
    output, photos = good_model
    before = _digests(output)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(tiny_model, photos, output, instance_prompt="a photo of zzq dog"),
              callbacks=[_Crash()])
    assert _digests(output) == before  # the trigger phrase recorded is still the model's


def test_resolution_is_bounded(tmp_path, tiny_model, instance_dir):
    with pytest.raises(ConfigError, match="resolution=100000"):
        tiny_config(tiny_model, instance_dir, tmp_path / "out", resolution=100000)


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755),
                                                        (0o077, 0o600, 0o700)])
def test_written_files_respect_the_umask(tmp_path, tiny_model, instance_dir, umask, file_mode,
                                         folder_mode):
    old = os.umask(umask)
    try:
        output = train(tiny_config(tiny_model, instance_dir, tmp_path / "out", max_train_steps=1,
                                   use_lora=True))
        train(tiny_config(tiny_model, instance_dir, tmp_path / "full", max_train_steps=1))
    finally:
        os.umask(old)
    written = [output / "pytorch_lora_weights.safetensors", output / "training_config.yaml",
               tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors"]
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    assert stat.S_IMODE((tmp_path / "full" / "unet").stat().st_mode) == folder_mode


def test_truncated_newest_checkpoint_falls_back_to_an_older_one(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"step": 2}, folder / "checkpoint-2.ckpt")
    torch.save({"step": 4, "pad": torch.zeros(1000)}, folder / "checkpoint-4.ckpt")
    data = (folder / "checkpoint-4.ckpt").read_bytes()
    (folder / "checkpoint-4.ckpt").write_bytes(data[: len(data) // 2])
    (folder / ".checkpoint-6.ckpt.abc123.tmp").write_bytes(b"half")
    with caplog.at_level("WARNING"):
        path = checkpointing.resolve_resume_path("latest", folder)
    assert path == folder / "checkpoint-2.ckpt"
    assert "checkpoint-4.ckpt" in caplog.text
    assert not list(folder.glob("*.tmp"))  # leftovers of killed writes are cleaned


@pytest.mark.parametrize("content, expected", [
    (b"1: 2\n", "keys must be strings"),
    (b"\x00\x01\xff\xfe binary", "config.yaml"),
])
def test_bad_yaml_names_the_file(tmp_path, content, expected):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected):
        load_yaml_config(path)


def test_config_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_yaml_config(tmp_path)


@pytest.mark.parametrize("argv_extra, expected", [
    (["--max_grad_norm", "nan"], "max_grad_norm"),
    (["--resolution", "100000"], "resolution"),
])
def test_cli_bad_numbers_give_one_line(tmp_path, tiny_model, instance_dir, capsys, argv_extra,
                                       expected):
    code = main(["train", "--pretrained_model_name_or_path", str(tiny_model),
                 "--instance_data_dir", str(instance_dir), "--instance_prompt", "a sks dog",
                 "--output_dir", str(tmp_path / "out"), *argv_extra])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err


def test_output_dir_that_is_a_file_gives_one_line(tmp_path, tiny_model, instance_dir, capsys):
    (tmp_path / "out").write_text("a file")
    code = main(["train", "--pretrained_model_name_or_path", str(tiny_model),
                 "--instance_data_dir", str(instance_dir), "--instance_prompt", "a sks dog",
                 "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1",
                 "--resolution", "32", "--accelerator", "cpu", "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "output_dir" in err and "Traceback" not in err


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB file system (tmpfs) to fill up; skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_full_disk_is_one_line_naming_the_path_and_keeps_the_old_file(tiny_disk):
    target = tiny_disk / "model.safetensors"
    atomic_write_bytes(target, b"the model the user had")
    from safetensors.torch import save_file

    with pytest.raises(DiskFullError, match=f"no space left on the device of '{target}'"):
        with atomic_path(target) as tmp:
            save_file({"w": torch.zeros(1_000_000)}, str(tmp))  # 4 MB
    with pytest.raises(DiskFullError, match="checkpoint-3.ckpt"):
        checkpointing.AtomicCheckpointIO().save_checkpoint(
            {"state_dict": {"w": torch.zeros(1_000_000)}}, tiny_disk / "checkpoint-3.ckpt")
    folder = tiny_disk / "pipeline"
    atomic_write_bytes(folder / "model_index.json", b"{}")
    with pytest.raises(DiskFullError, match="pipeline"):  # a model folder's final save
        with atomic_folder(folder, existing="merge") as staging:
            save_file({"w": torch.zeros(1_000_000)}, str(staging / "weights.safetensors"))
    assert target.read_bytes() == b"the model the user had"
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["model.safetensors", "pipeline"]
    assert [p.name for p in folder.iterdir()] == ["model_index.json"]


def test_full_disk_message_without_a_real_disk(tmp_path, monkeypatch):
    """The same report from torch's own wording of a full disk, on any machine."""
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))

    def failing_save(obj, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                           "failed writing file data/3: file write failed")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(DiskFullError, match="no space left"):
        checkpointing.AtomicCheckpointIO().save_checkpoint({}, tmp_path / "checkpoint-1.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_trained_folder_loads_in_transformers_4(good_model):
    """transformers 4.x finds a CLIP text model's weights only under `text_model.`; without it
    it loads a random encoder with a mere warning (benchmarks/older_stacks.py shows it)."""
    from safetensors import safe_open
    from transformers import CLIPTextModel

    output, _ = good_model
    with safe_open(str(output / "text_encoder" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(key.startswith("text_model.") for key in keys)
    reloaded = CLIPTextModel.from_pretrained(output / "text_encoder").state_dict()
    with safe_open(str(output / "text_encoder" / "model.safetensors"), framework="pt") as f:
        for key, value in reloaded.items():
            stored = key if key.startswith("text_model.") else "text_model." + key
            if stored in f.keys():
                assert torch.equal(f.get_tensor(stored), value), key
