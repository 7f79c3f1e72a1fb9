"""Pretraining the world model: both stages on tiny sizes, export, exact resume, the script."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.world import VOCABULARY, pretrain

ROOT = Path(__file__).resolve().parents[1]


def tiny_pretrain_config(output_dir: Path, **overrides) -> pretrain.PretrainConfig:
    values = dict(output_dir=str(output_dir), vae_channels=(16, 16, 16), unet_channels=(32, 32),
                  text_hidden_size=32, text_layers=1, text_intermediate_size=32, vae_steps=2,
                  decoder_steps=2, vae_batch_size=4, unet_steps=4, unet_batch_size=4,
                  warmup_steps=1, checkpoint_every=2, log_every=1, sample_every=0, num_workers=0,
                  threads=1)
    return pretrain.PretrainConfig(**{**values, **overrides})


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from more threads, and a busy shared CPU slows them a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_word_tokenizer_keeps_every_world_word_whole():
    tokenizer = pretrain.build_word_tokenizer()
    for word in (*VOCABULARY, "sks"):
        assert len(tokenizer.tokenize(word)) == 1, word


def test_pretraining_exports_a_loadable_fp16_pipeline_and_resumes_exactly(tmp_path, one_thread):
    from diffusers import StableDiffusionPipeline

    config = tiny_pretrain_config(tmp_path / "run")
    model = pretrain.pretrain(config)
    assert json.loads((model.parent / "vae" / "report.json").read_text())["psnr_db"] > 0
    assert (model / "vae" / "report.json").read_text() == (
        model.parent / "vae" / "report.json").read_text()  # the exported model keeps its PSNR
    weights = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float16}
    pipeline = StableDiffusionPipeline.from_pretrained(model)  # fp32 by default, all parts
    assert {pipeline.unet.dtype, pipeline.vae.dtype, pipeline.text_encoder.dtype} == {
        torch.float32}
    image = pipeline("a red star on a blue background", num_inference_steps=2,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert pipeline.scheduler.config.clip_sample is False  # DDIM swapped in must not clip

    # Lose the end of stage 2: rerunning resumes from checkpoint-2 to the same weights.
    stage2 = model.parent / "stage2-unet" / "checkpoints"
    assert sorted(p.name for p in stage2.iterdir()) == ["checkpoint-2.ckpt", "checkpoint-4.ckpt"]
    (stage2 / "checkpoint-4.ckpt").unlink()
    shutil.copytree(model, tmp_path / "first")
    resumed = pretrain.pretrain(config)
    first = load_file(tmp_path / "first" / "unet" / "diffusion_pytorch_model.safetensors")
    again = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(first[key], again[key]) for key in first)
    # A checkpoint exports as the finished run does (its EMA weights).
    exported = pretrain.export_checkpoint(config, "checkpoint-4")
    assert exported.name == "model-step-4"
    from_checkpoint = load_file(exported / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(first[key], from_checkpoint[key]) for key in first)
    (stage2 / "checkpoint-4.ckpt").unlink()
    with pytest.raises(ValueError, match="unet_channels: checkpoint has \\[32, 32\\]"):
        pretrain.pretrain(replace(config, unet_channels=(32, 64)))


def test_stage_1b_trains_only_the_decoder_once_per_vae(tmp_path, one_thread):
    from diffusers import AutoencoderKL

    # A VAE saved by stage 1 alone (as runs made before stage 1b existed left it).
    config = tiny_pretrain_config(tmp_path / "run", decoder_steps=0)
    vae_dir = pretrain.pretrain_vae(config)
    before = AutoencoderKL.from_pretrained(vae_dir).state_dict()
    assert "decoder_steps" not in json.loads((vae_dir / "report.json").read_text())

    config = replace(config, decoder_steps=3, decoder_look_probability=1.0)
    pretrain.pretrain_vae(config)
    after = AutoencoderKL.from_pretrained(vae_dir).state_dict()
    changed = {key.split(".")[0] for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"decoder", "post_quant_conv"}  # the encoder, so every latent, is kept
    report = json.loads((vae_dir / "report.json").read_text())
    assert report["decoder_steps"] == 3 and report["stage1_psnr_db"] > 0
    assert list((tmp_path / "run" / "stage1b-decoder" / "checkpoints").glob("checkpoint-*"))

    pretrain.pretrain_vae(config)  # done: nothing trains again
    again = AutoencoderKL.from_pretrained(vae_dir).state_dict()
    assert all(torch.equal(after[key], again[key]) for key in after)
    with pytest.raises(ValueError, match="fine-tuned for 3 steps.*--decoder_steps 5"):
        pretrain.pretrain_vae(replace(config, decoder_steps=5))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="unet_batch_size=0.*look_probability=1.5.*"
                                         "caption_dropout=1.5"):
        replace(pretrain.PretrainConfig(), unet_batch_size=0, caption_dropout=1.5,
                look_probability=1.5)


def test_look_probability_sets_the_share_of_patterned_training_objects():
    from dreambooth.world import PLAIN

    def patterned(look_probability: float) -> int:
        batch = pretrain.RenderBatches(seed=0, batch_size=200, num_steps=1,
                                       look_probability=look_probability)
        return sum(scene.look != PLAIN for scene in batch.scenes(0))

    assert patterned(0.0) == 0
    assert 40 <= patterned(0.3) <= 80
    assert patterned(1.0) == 200


def test_script_builds_the_config_from_its_flags():
    spec = importlib.util.spec_from_file_location("pretrain_script",
                                                  ROOT / "scripts" / "pretrain_world_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    parser = script.build_parser()
    assert "--background" in parser.format_help()
    args = parser.parse_args(["--unet_channels", "32,64", "--unet_steps", "7"])
    assert args.unet_channels == (32, 64) and args.unet_steps == 7
    assert {f.name for f in fields(pretrain.PretrainConfig)} <= set(vars(args))


def test_partial_captions_leave_out_color_background_or_both_in_their_share():
    from dreambooth.world import caption, parse_prompt

    batches = pretrain.RenderBatches(seed=0, batch_size=600, num_steps=1, caption_dropout=0.1,
                                     partial_captions=0.4)
    scenes = batches.scenes(0)
    captions = [batches.caption_for(n, scene) for n, scene in enumerate(scenes)]
    kinds = {"empty": 0, "full": 0, "no color": 0, "no background": 0, "class only": 0}
    for text, scene in zip(captions, scenes):
        asked = set(parse_prompt(text))
        if not text:
            kinds["empty"] += 1
        elif text == caption(scene):
            kinds["full"] += 1
        else:
            assert asked < {"cls", "color", "background"} and parse_prompt(text)["cls"] == scene.cls
            kinds[{frozenset({"cls", "background"}): "no color",
                   frozenset({"cls", "color"}): "no background",
                   frozenset({"cls"}): "class only"}[frozenset(asked)]] += 1
    assert 30 <= kinds["empty"] <= 90  # 10% of 600
    assert 260 <= kinds["full"] <= 390  # 90% x 60%
    for kind in ("no color", "no background", "class only"):  # 90% x 40% / 3 each
        assert 40 <= kinds[kind] <= 110, kinds
    # Without partial captions the stream is what it was: the same empties, the rest full.
    full_only = pretrain.RenderBatches(seed=0, batch_size=600, num_steps=1, caption_dropout=0.1)
    assert [full_only.caption_for(n, s) == "" for n, s in enumerate(scenes)] == [
        not text for text in captions]
    assert all(full_only.caption_for(n, s) in ("", caption(s)) for n, s in enumerate(scenes))


def test_identifier_captions_put_a_rare_word_before_the_class_noun():
    from dreambooth.world import CLASSES, VOCABULARY

    batches = pretrain.RenderBatches(seed=0, batch_size=400, num_steps=1, partial_captions=0.4,
                                     identifier_captions=0.25)
    plain = pretrain.RenderBatches(seed=0, batch_size=400, num_steps=1, partial_captions=0.4)
    rare_words = []
    for n, scene in enumerate(batches.scenes(0)):
        words = batches.caption_for(n, scene).split()
        plain_words = plain.caption_for(n, scene).split()
        extra = [word for word in words if word not in VOCABULARY]
        if extra:
            assert words[words.index(scene.cls) - 1] == extra[0]  # right before the class noun
            assert [word for word in words if word != extra[0]][1:] == plain_words[1:]  # (a/an)
            rare_words.append(extra[0])
        else:
            assert words == plain_words
    assert 60 <= len(rare_words) <= 140  # 25% of 400
    assert 0.3 < rare_words.count("sks") / len(rare_words) < 0.7
    assert all(len(word) == 3 and word.isalpha() for word in rare_words)
    assert not set(rare_words) & set(CLASSES)


def test_init_model_continues_a_finished_model_with_its_vae_and_weights(tmp_path, one_thread):
    first = pretrain.pretrain(tiny_pretrain_config(tmp_path / "first"))
    # Learning rate 0: the continuation's weights are exactly the ones it started from.
    config = tiny_pretrain_config(tmp_path / "second", init_model=str(first), seed=1,
                                  unet_learning_rate=0.0, look_probability=0.6)
    second = pretrain.pretrain(config)
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "model.safetensors"),
                       ("vae", "diffusion_pytorch_model.safetensors")):
        before, after = load_file(first / part / name), load_file(second / part / name)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[key], after[key]) for key in before), part
    assert not (tmp_path / "second" / "stage1-vae").exists()  # the VAE was not retrained
    assert json.loads((second / "pretrain_config.json").read_text())["init_model"] == str(first)
    # With a learning rate it trains on from there: the UNet moves.
    moved = pretrain.pretrain(replace(config, output_dir=str(tmp_path / "third"),
                                      unet_learning_rate=1e-3))
    before = load_file(first / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(moved / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[key], after[key]) for key in before)
    with pytest.raises(ValueError, match="--init_model .* does not fit .*pretrain_config"):
        pretrain.pretrain(replace(config, output_dir=str(tmp_path / "fourth"),
                                  unet_channels=(32, 64)))
    with pytest.raises(ValueError, match="--init_model: model .*nowhere.* not found"):
        pretrain.pretrain(replace(config, output_dir=str(tmp_path / "fifth"),
                                  init_model=str(tmp_path / "nowhere")))


def test_latent_channels_set_the_vae_latent_and_the_unet_that_denoises_it(tmp_path, one_thread):
    from diffusers import StableDiffusionPipeline

    config = tiny_pretrain_config(tmp_path / "run", latent_channels=8, unet_steps=2)
    model = pretrain.pretrain(config)
    pipeline = StableDiffusionPipeline.from_pretrained(model)
    assert pipeline.vae.config.latent_channels == 8
    assert pipeline.unet.config.in_channels == pipeline.unet.config.out_channels == 8
    pixels = torch.zeros(1, 3, 64, 64)
    assert pipeline.vae.encode(pixels).latent_dist.mean.shape == (1, 8, 16, 16)
    latents = pipeline("a red star", num_inference_steps=2, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 8, 16, 16) and torch.isfinite(latents).all()
    # The latent depth is part of the run: a resumed run with another one is refused by name.
    (model.parent / "vae" / "config.json").unlink()  # so stage 1 would resume from its checkpoint
    with pytest.raises(ValueError, match="latent_channels: checkpoint has 8"):
        pretrain.pretrain(replace(config, latent_channels=4))
    with pytest.raises(ValueError, match="latent_channels=0"):
        replace(config, latent_channels=0)
