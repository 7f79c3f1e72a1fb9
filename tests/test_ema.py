"""EMA of the trained weights: the average's math, what validation samples and the export save,
checkpoints and exact resume with it, and its options."""

from __future__ import annotations

import io

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from dreambooth.cli import build_parser, resolve_train_config
from dreambooth.config import ConfigError
from dreambooth.formats.lora_files import DIFFUSERS_LORA_FILE
from dreambooth.train.checkpointing import list_checkpoints
from dreambooth.train.ema import EMAWeights, ExponentialMovingAverage, ema_decay_at
from dreambooth.train.run import train
from test_resume import InterruptAt


# ------------------------------------------------------------------------------ the math
def test_ema_decay_warmup_and_state_round_trip():
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = ExponentialMovingAverage({"w": weight}, decay=0.5, warmup=False)
    with torch.no_grad():
        weight.fill_(1.0)
    for k in range(1, 6):  # constant weights: theta_ema = 1 - d^k (exact in binary for d=1/2)
        assert ema.update({"w": weight}) == 0.5
        assert torch.equal(ema.shadow["w"], torch.full((3,), 1 - 0.5 ** k))
    slow = ExponentialMovingAverage({"w": torch.zeros(2, dtype=torch.float64)}, decay=0.9,
                                    warmup=False)
    for _ in range(100):  # approaches the weights as 1 - d^k
        slow.update({"w": torch.ones(2, dtype=torch.float64)})
    assert torch.allclose(1 - slow.shadow["w"], torch.tensor(0.9 ** 100, dtype=torch.float64),
                          rtol=1e-9)

    # diffusers' warmup: d_1 = 0 (the average starts at the weights after step 1), then
    # (1 + s) / (10 + s) with s = t - 1, never above ema_decay.
    assert [ema_decay_at(t, decay=0.9, warmup=True) for t in (1, 2, 3)] == [0.0, 2 / 11, 3 / 12]
    assert ema_decay_at(100, decay=0.9, warmup=True) == 0.9
    assert ema_decay_at(1, decay=0.9, warmup=False) == 0.9
    warm = ExponentialMovingAverage({"w": torch.zeros(2)}, decay=0.999, warmup=True)
    warm.update({"w": torch.full((2,), 3.0)})
    assert torch.equal(warm.shadow["w"], torch.full((2,), 3.0))

    # A state saved mid-run and loaded into a fresh average continues it bit for bit.
    generator = torch.Generator().manual_seed(0)
    steps = [{"w": torch.randn(4, generator=generator)} for _ in range(6)]
    whole = ExponentialMovingAverage({"w": torch.zeros(4)}, decay=0.99, warmup=True)
    first = ExponentialMovingAverage({"w": torch.zeros(4)}, decay=0.99, warmup=True)
    for step in steps:
        whole.update(step)
    for step in steps[:3]:
        first.update(step)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = ExponentialMovingAverage({"w": torch.zeros(4)}, decay=0.99, warmup=True)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert second.num_updates == 3
    for step in steps[3:]:
        second.update(step)
    assert torch.equal(second.shadow["w"], whole.shadow["w"])

    # Swapping twice gives back the live weights bit for bit.
    live = torch.nn.Parameter(torch.randn(4, generator=generator))
    before = live.detach().clone()
    whole.swap({"w": live})
    assert torch.equal(live.detach(), second.shadow["w"])
    whole.swap({"w": live})
    assert torch.equal(live.detach(), before)
    with pytest.raises(ValueError, match="ema_decay=1"):
        ExponentialMovingAverage({"w": torch.zeros(1)}, decay=1.0, warmup=True)


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("decay", ["0", "1", "1.5", "-0.1"])
def test_ema_decay_outside_zero_one_is_one_clear_line(tmp_path, decay):
    with pytest.raises(ConfigError) as error:
        tiny_config(tmp_path, tmp_path, tmp_path / "out", use_ema=True, ema_decay=decay)
    assert error.value.problems == [
        f"ema_decay={float(decay)} must be between 0 and 1 (exclusive), e.g. 0.999"]


def test_ema_options_on_the_command_line_and_their_errors(capsys):
    base = ["train", "--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
            "--instance_prompt", "a sks dog"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    train_help = capsys.readouterr().out
    for flag in ("--use_ema", "--ema_decay", "--ema_warmup", "--ema_on_cpu",
                 "--export_raw_weights"):
        assert flag in train_help
    config = resolve_train_config(build_parser().parse_args(
        base + ["--use_ema", "--ema_decay", "0.99", "--no-ema_warmup", "--ema_on_cpu",
                "--export_raw_weights"]))
    assert (config.ema.use_ema, config.ema.ema_decay, config.ema.ema_warmup,
            config.ema.ema_on_cpu, config.ema.export_raw_weights) == (True, 0.99, False, True, True)
    # Options of the EMA without --use_ema: an error (they would silently do nothing).
    with pytest.raises(ConfigError) as error:
        resolve_train_config(build_parser().parse_args(base + ["--ema_on_cpu",
                                                                "--export_raw_weights"]))
    assert error.value.problems == [
        "ema_on_cpu applies only with use_ema: add --use_ema or drop --ema_on_cpu",
        "export_raw_weights applies only with use_ema: add --use_ema or drop --export_raw_weights"]


# --------------------------------------------------------------------- end to end, SD1 full
def _ema(checkpoint_path) -> dict:
    return torch.load(checkpoint_path, weights_only=True)["callbacks"]["EMAWeights"]


def _checkpoint(output_dir, step: int) -> dict:
    return torch.load(output_dir / "checkpoints" / f"checkpoint-{step}.ckpt", weights_only=True)


def _saved_pipeline_weights(output_dir) -> dict[str, torch.Tensor]:
    """The saved UNet and text encoder, by the module's parameter names (`unet.`, ...)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(output_dir)
    return {f"{prefix}.{name}": parameter.detach() for prefix in ("unet", "text_encoder")
            for name, parameter in getattr(pipeline, prefix).named_parameters()}


def _same(expected: dict, actual: dict) -> bool:
    return all(torch.equal(value, actual[key]) for key, value in expected.items())


def test_full_finetune_saves_and_validates_the_ema_weights(tmp_path, tiny_model, instance_dir,
                                                            monkeypatch):
    import dreambooth.generate

    sampled = []  # the UNet's weights each time validation samples
    original = dreambooth.generate.sample_images

    def recording(pipeline, *args, **kwargs):
        sampled.append({f"unet.{name}": p.detach().clone()
                        for name, p in pipeline.unet.named_parameters()})
        return original(pipeline, *args, **kwargs)

    monkeypatch.setattr(dreambooth.generate, "sample_images", recording)
    # One thread in every run compared: the default follows the machine's load (other sums).
    common = dict(use_ema=True, train_text_encoder=True, max_train_steps=4, checkpointing_steps=2,
                  num_threads=1)
    run = train(tiny_config(tiny_model, instance_dir, tmp_path / "ema",
                            validation_prompt="a photo of sks dog", validation_steps=2,
                            num_validation_images=1, **common))
    at_2, at_4 = _checkpoint(run, 2), _checkpoint(run, 4)
    ema_2, ema_4 = at_2["callbacks"]["EMAWeights"], at_4["callbacks"]["EMAWeights"]
    assert ema_4["num_updates"] == 4
    # Exactly the trained parameters (UNet and text encoder), as the checkpoint holds them.
    assert ema_4["shadow"].keys() == at_4["state_dict"].keys()
    assert any(key.startswith("text_encoder.") for key in ema_4["shadow"])

    # Validation at steps 2 and 4 sampled the average, not the live weights.
    assert len(sampled) == 2
    for seen, checkpoint, ema in ((sampled[0], at_2, ema_2), (sampled[1], at_4, ema_4)):
        assert _same(seen, ema["shadow"])
        assert not _same(seen, checkpoint["state_dict"])
    # The saved model is the average, which is not the live weights.
    saved = _saved_pipeline_weights(run)
    assert _same(ema_4["shadow"], saved)
    assert not _same(at_4["state_dict"], saved)
    assert yaml.safe_load((run / "training_config.yaml").read_text())["use_ema"] is True

    # The same run with the average in CPU memory, no validation and --export_raw_weights:
    # the saved model is the first run's live weights (validation put them back bit for bit,
    # and the EMA never touches training), and the average is the same.
    raw = train(tiny_config(tiny_model, instance_dir, tmp_path / "raw", ema_on_cpu=True,
                            export_raw_weights=True, **common))
    assert _same(at_4["state_dict"], _saved_pipeline_weights(raw))
    assert _same(ema_4["shadow"], _ema(raw / "checkpoints" / "checkpoint-4.ckpt")["shadow"])


# ------------------------------------------------------------------ end to end, LoRA, families
def _lora_file_weights(output_dir) -> dict[str, torch.Tensor]:
    """The diffusers LoRA file by the module's parameter names without peft's adapter level."""
    weights = load_file(output_dir / DIFFUSERS_LORA_FILE)
    return {_plain(key): value for key, value in weights.items()}


def _plain(name: str) -> str:
    return name.replace(".default", "").replace("text_model.", "")


def test_lora_saves_the_ema_weights_for_every_family(tmp_path, family_model, instance_dir):
    family, model = family_model
    run = train(tiny_config(model, instance_dir, tmp_path / "lora", use_lora=True,
                            train_text_encoder=True, use_ema=True, max_train_steps=3,
                            checkpointing_steps=3))
    checkpoint = _checkpoint(run, 3)
    ema = checkpoint["callbacks"]["EMAWeights"]
    assert ema["shadow"].keys() == checkpoint["state_dict"].keys()
    assert all("lora_" in key for key in ema["shadow"])  # only the adapters are averaged
    encoders = {"text_encoder", "text_encoder_2"} if family == "sdxl" else {"text_encoder"}
    assert {key.split(".")[0] for key in ema["shadow"]} == {"unet", *encoders}
    saved = _lora_file_weights(run)
    average = {_plain(key): value for key, value in ema["shadow"].items()}
    live = {_plain(key): value for key, value in checkpoint["state_dict"].items()}
    assert saved.keys() == average.keys()
    assert _same(average, saved)
    assert not _same(live, saved)


# ----------------------------------------------------------------------------- exact resume
def _interrupt_before_ema_update(monkeypatch, batch_index: int) -> None:
    """Ctrl-C after micro-batch `batch_index`'s optimizer step, before its EMA update."""
    update = EMAWeights.on_train_batch_end

    def interrupted(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == batch_index:
            raise KeyboardInterrupt
        update(self, trainer, pl_module, outputs, batch, batch_idx)

    monkeypatch.setattr(EMAWeights, "on_train_batch_end", interrupted)


@pytest.mark.parametrize("case", ["full-before-its-ema-update", "lora-mid-accumulation"])
def test_interrupted_and_resumed_run_ends_bit_identical_with_ema(tmp_path, tiny_model,
                                                                 instance_dir, monkeypatch, case):
    lora = case.startswith("lora")
    common = dict(use_ema=True, train_text_encoder=True, gradient_accumulation_steps=2,
                  max_train_steps=6, checkpointing_steps=2, use_lora=lora, ema_on_cpu=lora,
                  lr_scheduler="cosine", lr_warmup_steps=2, num_threads=1)
    reference = train(tiny_config(tiny_model, instance_dir, tmp_path / "reference", **common))

    interrupted = tmp_path / "interrupted"
    if lora:  # micro-batch 6: the first half of step 4; its checkpoint is step 3's state
        callbacks, expected = [InterruptAt(6)], [2, 3]
    else:  # micro-batch 7 ends step 4, whose EMA update the interrupt prevents
        callbacks, expected = [], [2, 4]
        _interrupt_before_ema_update(monkeypatch, 7)
    with pytest.raises(SystemExit):
        train(tiny_config(tiny_model, instance_dir, interrupted, **common), callbacks=callbacks)
    monkeypatch.undo()
    assert [step for step, _ in list_checkpoints(interrupted / "checkpoints")] == expected
    last = _ema(interrupted / "checkpoints" / f"checkpoint-{expected[-1]}.ckpt")
    assert last["num_updates"] == 3  # step 3's state, or step 4's before its EMA update
    resumed = train(tiny_config(tiny_model, instance_dir, interrupted,
                                resume_from_checkpoint="latest", **common))

    final_reference = _ema(reference / "checkpoints" / "checkpoint-6.ckpt")
    final_resumed = _ema(resumed / "checkpoints" / "checkpoint-6.ckpt")
    assert final_reference["num_updates"] == final_resumed["num_updates"] == 6  # optimizer steps
    assert _same(final_reference["shadow"], final_resumed["shadow"])
    if lora:
        assert _same(_lora_file_weights(reference), _lora_file_weights(resumed))
    else:
        assert _same(_saved_pipeline_weights(reference), _saved_pipeline_weights(resumed))


def test_non_finite_average_is_never_checkpointed():
    from types import SimpleNamespace

    from dreambooth.train.module import NonFiniteError

    keeper = EMAWeights(decay=0.9, warmup=True, on_cpu=False)
    keeper.ema = ExponentialMovingAverage({"unet.w": torch.tensor([1.0, float("nan")])},
                                          decay=0.9, warmup=True)
    with pytest.raises(NonFiniteError, match="EMA of weight 'unet.w'"):
        keeper.on_save_checkpoint(SimpleNamespace(global_step=3), None, {})


# ---------------------------------------------------------------------------- two processes
DDP_SCRIPT = '''
import sys
from pathlib import Path

import lightning as L
import torch

sys.path[:0] = [{src!r}, {tests!r}]  # the dreambooth under test, conftest
from conftest import tiny_config
from dreambooth.train.ema import EMAWeights
from dreambooth.train.run import train


class SaveEachRanksAverage(L.Callback):
    def on_train_end(self, trainer, pl_module):
        keeper = next(c for c in trainer.callbacks if isinstance(c, EMAWeights))
        torch.save(keeper.ema.state_dict(), Path({out!r}) / f"ema-rank{{trainer.global_rank}}.pt")


train(tiny_config(Path({model!r}), Path({photos!r}), Path({out!r}), use_ema=True,
                  use_lora=True, strategy="ddp", devices="2", train_batch_size=1,
                  max_train_steps=3, checkpointing_steps=3, validation_prompt="a sks dog",
                  validation_steps=2, num_validation_images=1),
      callbacks=[SaveEachRanksAverage()])
'''


@pytest.mark.slow  # two processes: ~45 s on a busy 2-core CPU
def test_every_ddp_rank_holds_the_same_average_and_rank_zero_saves_it(tmp_path, tiny_model,
                                                                        instance_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    script = tmp_path / "train_ddp.py"
    import dreambooth

    script.write_text(DDP_SCRIPT.format(src=str(Path(dreambooth.__file__).parents[1]),
                                        tests=str(Path(__file__).parent), out=str(out),
                                        model=str(tiny_model), photos=str(instance_dir)))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    rank_0 = torch.load(out / "ema-rank0.pt", weights_only=True)
    rank_1 = torch.load(out / "ema-rank1.pt", weights_only=True)
    assert rank_0["num_updates"] == rank_1["num_updates"] == 3
    assert _same(rank_0["shadow"], rank_1["shadow"])
    saved = _lora_file_weights(out)
    assert _same({_plain(key): value for key, value in rank_0["shadow"].items()}, saved)
