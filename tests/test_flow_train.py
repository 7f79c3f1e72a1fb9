"""SD 3.x and FLUX.1: the family layer, the flow-matching objective and training on it."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from dreambooth.cli import main
from dreambooth.families import FLOW_MATCHING_FAMILIES, UnknownArchitectureError, detect_family
from dreambooth.flow import sampling
from dreambooth.flow.objective import FlowSettings
from dreambooth.models import load_components, load_pipeline, pipeline_class
from dreambooth.tiny import build_tiny_pipeline, save_tiny_pipeline
from dreambooth.train.checkpointing import list_checkpoints
from dreambooth.train.flow_matching import FlowMatchingModule
from dreambooth.train.quantize import is_quantized
from dreambooth.train.run import check_resolution, train
from test_resume import InterruptAt

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@pytest.fixture(scope="session", params=FLOW_MATCHING_FAMILIES)
def flow_model(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    return family, save_tiny_pipeline(tmp_path_factory.mktemp("models") / f"tiny-{family}",
                                      family=family)


def test_each_flow_family_is_detected_and_loads_as_its_diffusers_pipeline(flow_model):
    family, folder = flow_model
    assert detect_family(folder) == family
    assert pipeline_class(family).__name__ == PIPELINES[family]
    pipeline = load_pipeline(folder, device="cpu")
    assert type(pipeline).__name__ == PIPELINES[family]
    images = pipeline("a photo of sks dog", num_inference_steps=2, height=32, width=32,
                      max_sequence_length=16, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(images)).all()
    components = load_components(folder)
    assert components.unet is None and components.denoiser is components.transformer
    assert components.prediction_type == "flow_matching"
    assert components.vae.config.latent_channels == 16


def test_tiny_flow_builds_are_seeded_and_the_t5_tokenizer_is_local():
    first, second = (build_tiny_pipeline(family="flux", seed=3) for _ in range(2))
    for a, b in zip(first.transformer.parameters(), second.transformer.parameters()):
        assert torch.equal(a, b)
    ids = first.tokenizer_2("a photo of sks dog", padding="max_length", max_length=8).input_ids
    assert len(ids) == 8 and ids[5] == first.tokenizer_2.eos_token_id
    assert first.tokenizer_2.unk_token_id not in ids


def test_a_transformer_pipeline_of_another_kind_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "X"]}))
    with pytest.raises(UnknownArchitectureError, match="PixArtAlphaPipeline"):
        detect_family(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "X"],
         "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(UnknownArchitectureError, match="text_encoder_2"):
        detect_family(tmp_path)


# ----------------------------------------------------------------------------- the objective
def reference_sigma(family: str, seed: int, scheme: str, *, logit_mean=0.0, logit_std=1.0,
                    mode_scale=1.29) -> tuple[torch.Tensor, float]:
    """(noise, sigma) of one sample, from diffusers' formulas written out here: noise first, then
    u from the same generator; sigma = the schedule's value at floor(1000 u), the schedule
    1 - i/1000 (i = 0 .. 999), shifted s' = 3s / (1 + 2s) for SD3 (FLUX.1's dynamic
    shifting leaves the training table unshifted)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((16, 8, 8), generator=generator)
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(logit_mean, logit_std, (1,), generator=generator))
    elif scheme == "mode":
        u = torch.rand((1,), generator=generator)
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        u = torch.rand((1,), generator=generator)
    index = min(int(u.item() * 1000), 999)
    s = (1000 - index) / 1000
    if family == "sd3":
        s = 3 * s / (1 + 2 * s)
    return noise, s


def reference_prediction(pipeline, family: str, x_t: torch.Tensor, sigma: float, prompt: str,
                         guidance: float, max_sequence_length: int) -> torch.Tensor:
    """The transformer's output for x_t, called the way diffusers' pipelines call it."""
    if family == "sd3":
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompt, prompt, prompt, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length)
        return pipeline.transformer(hidden_states=x_t[None], timestep=torch.tensor([sigma * 1000]),
                                    encoder_hidden_states=embeds, pooled_projections=pooled
                                    ).sample[0]
    embeds, pooled, text_ids = pipeline.encode_prompt(prompt, None,
                                                      max_sequence_length=max_sequence_length)
    packed = pipeline._pack_latents(x_t[None], 1, 16, 8, 8)
    image_ids = pipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    out = pipeline.transformer(hidden_states=packed, timestep=torch.tensor([sigma]),
                               guidance=torch.tensor([guidance]), pooled_projections=pooled,
                               encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids
                               ).sample
    return pipeline._unpack_latents(out, 32, 32, pipeline.vae_scale_factor)[0]


@pytest.mark.parametrize("family,scheme,precondition", [
    ("sd3", "logit_normal", True), ("sd3", "mode", False),
    ("flux", "sigma_sqrt", False), ("flux", "cosmap", False)])
def test_loss_is_the_flow_matching_objective_written_independently(family, scheme, precondition,
                                                                   tmp_path):
    folder = save_tiny_pipeline(tmp_path / family, family=family)
    pipeline = load_pipeline(folder, device="cpu")
    components = load_components(folder)
    flow = FlowSettings(weighting_scheme=scheme, precondition_outputs=precondition,
                        guidance_scale=2.5, max_sequence_length=12)
    prompts = ["a photo of sks dog", "a photo of dog"]
    module = FlowMatchingModule(components, prompts=prompts, prior_loss_weight=0.7,
                                optim=tiny_config(folder, tmp_path, tmp_path).optim,
                                max_train_steps=1, flow=flow)
    module.optimizers = lambda: SimpleNamespace(param_groups=[{"lr": 0.0}])
    module.table_prompts()
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    seeds = torch.tensor([11, 12345])
    batch = {"latents": latents, "seeds": seeds, "prompts": prompts,
             "is_prior": torch.tensor([False, True]), "weights": torch.ones(2, 1, 8, 8),
             "loss_weights": torch.ones(2)}
    with torch.no_grad():
        loss = module.training_step(batch, 0)

        per_sample = []
        for x0, seed, prompt in zip(latents, seeds.tolist(), prompts):
            noise, sigma = reference_sigma(family, seed, scheme)
            x_t = (1 - sigma) * x0 + sigma * noise
            v_hat = reference_prediction(pipeline, family, x_t, sigma, prompt, 2.5, 12)
            if precondition:
                error = (x_t - sigma * v_hat) - x0
            else:
                error = v_hat - (noise - x0)
            weight = {"sigma_sqrt": sigma ** -2.0,
                      "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))}.get(scheme, 1.0)
            per_sample.append(weight * (error ** 2).mean())
    expected = per_sample[0] + 0.7 * per_sample[1]
    assert torch.isfinite(loss) and loss.item() > 0
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item(), (loss, expected)


# ------------------------------------------------------------------------------- training
class KeepModule(L.Callback):
    def on_train_end(self, trainer, pl_module):
        self.module = pl_module


def flow_config(model: Path, instance: Path, output_dir: Path, **overrides):
    values = dict(with_prior_preservation=True, class_prompt="a photo of dog",
                  class_data_dir=str(output_dir.parent / f"class-{output_dir.name}"),
                  num_class_images=2, train_batch_size=1, max_sequence_length=16)
    values.update(overrides)
    return tiny_config(model, instance, output_dir, **values)


def live_images(module, prompt: str, family: str) -> np.ndarray:
    from dreambooth.models import assemble_pipeline

    pipeline = assemble_pipeline(module._components)
    with torch.no_grad():
        images = sampling.sample_images(pipeline, prompt, seeds=[3], num_inference_steps=2,
                                        guidance_scale=1.0, height=32, width=32,
                                        max_sequence_length=16,
                                        conditioning=module.text_conditioning)
    return np.asarray(images[0], dtype=np.float32)


def test_lora_with_prior_saves_a_file_diffusers_restores_exactly(flow_model, tmp_path,
                                                                  instance_dir):
    family, folder = flow_model
    keep = KeepModule()
    output = train(flow_config(folder, instance_dir, tmp_path / "out", use_lora=True, rank=2,
                               train_text_encoder=True, learning_rate=5e-2,
                               validation_prompt="a photo of sks dog", validation_steps=2,
                               num_validation_images=1), callbacks=[keep])
    assert len(list((tmp_path / "class-out").glob("class-*.png"))) == 2
    assert (output / "validation").is_dir() and (output / "training_config.yaml").exists()
    state = load_file(output / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("transformer.") and k.endswith("lora_A.weight") for k in state)
    assert any(k.startswith("text_encoder.") for k in state)  # CLIP trained, T5 never
    assert not any(k.startswith("text_encoder_3." if family == "sd3" else "text_encoder_2.")
                   for k in state)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert keep.module._t5[1] is None  # T5 released after its embeddings were tabled

    live = live_images(keep.module, "a photo of sks dog", family)
    pipeline = load_pipeline(folder, device="cpu")
    base = np.asarray(sampling.sample_images(
        pipeline, "a photo of sks dog", seeds=[3], num_inference_steps=2, guidance_scale=1.0,
        height=32, width=32, max_sequence_length=16)[0], dtype=np.float32)
    pipeline.load_lora_weights(output)
    reloaded = np.asarray(sampling.sample_images(
        pipeline, "a photo of sks dog", seeds=[3], num_inference_steps=2, guidance_scale=1.0,
        height=32, width=32, max_sequence_length=16)[0], dtype=np.float32)
    assert np.abs(live - base).max() > 2  # training changed the images ...
    assert np.abs(live - reloaded).max() <= 1  # ... and the file restores them (8-bit pixels)


def test_full_fine_tune_with_prior_saves_a_pipeline_diffusers_loads(flow_model, tmp_path,
                                                                   instance_dir):
    family, folder = flow_model
    output = train(flow_config(folder, instance_dir, tmp_path / "out", learning_rate=1e-3,
                               use_ema=True, ema_decay=0.5, ema_warmup=False))
    assert detect_family(output) == family
    reloaded = pipeline_class(family).from_pretrained(output)
    base = pipeline_class(family).from_pretrained(folder)
    changed = [not torch.equal(a, b) for a, b in zip(reloaded.transformer.parameters(),
                                                     base.transformer.parameters())]
    assert any(changed)
    for name in ("vae", "text_encoder"):  # frozen parts are the base model's
        for a, b in zip(getattr(reloaded, name).parameters(), getattr(base, name).parameters()):
            assert torch.equal(a, b)
    saved = yaml.safe_load((output / "training_config.yaml").read_text())
    assert saved["max_sequence_length"] == 16


def test_shuffled_captions_keep_t5_for_prompts_no_table_holds(tmp_path, instance_dir):
    folder = save_tiny_pipeline(tmp_path / "flux", family="flux")
    for index, photo in enumerate(sorted(instance_dir.glob("*.png"))):
        photo.with_suffix(".txt").write_text(f"[trigger], red, ball {index}, on the beach")
    keep = KeepModule()
    output = train(flow_config(folder, instance_dir, tmp_path / "out", use_lora=True, rank=2,
                               shuffle_caption=True, keep_tokens=1, max_train_steps=3),
                   callbacks=[keep])
    assert keep.module._t5[1] is not None  # shuffled tags make new prompts every step
    assert (output / "pytorch_lora_weights.safetensors").exists()


# ---------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("family,use_lora", [("sd3", False), ("flux", True)])
def test_resume_in_a_fresh_process_matches_an_uninterrupted_run(family, use_lora, tmp_path,
                                                                 instance_dir):
    folder = save_tiny_pipeline(tmp_path / family, family=family)
    common = dict(max_train_steps=4, checkpointing_steps=2, gradient_accumulation_steps=2,
                  use_lora=use_lora, rank=2, train_text_encoder=True, lr_scheduler="cosine",
                  weighting_scheme="logit_normal", caption_dropout_rate=0.3)
    reference = train(flow_config(folder, instance_dir, tmp_path / "reference", **common))
    interrupted = tmp_path / "interrupted"
    with pytest.raises(SystemExit):  # micro-batch 4: the first half of step 3
        train(flow_config(folder, instance_dir, interrupted, **common),
              callbacks=[InterruptAt(4)])
    assert [step for step, _ in list_checkpoints(interrupted / "checkpoints")] == [2]
    assert not (interrupted / "model_index.json").exists()
    config = flow_config(folder, instance_dir, interrupted, resume_from_checkpoint="latest",
                         **common)
    config_file = tmp_path / "resume.yaml"
    config_file.write_text(yaml.safe_dump({k: v for k, v in config.to_flat_dict().items()
                                           if v is not None}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "dreambooth", "train", "--config",
                           str(config_file)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr and "checkpoint-2" in done.stderr  # no fresh start

    def weights(output: Path) -> dict[str, torch.Tensor]:
        if use_lora:
            return load_file(output / "pytorch_lora_weights.safetensors")
        return {**load_file(output / "transformer" / "diffusion_pytorch_model.safetensors"),
                **{f"te.{k}": v for k, v in load_file(
                    output / "text_encoder" / "model.safetensors").items()}}

    a, b = weights(reference), weights(interrupted)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-5, f"resumed weights differ by {worst}"


# ------------------------------------------------------------------- diffusers' commands
def readme_command(script: str, model: Path, instance: Path, output: Path) -> list[str]:
    """The README command of diffusers' train_dreambooth_lora_{sd3,flux}.py, with --use_lora
    added and sizes made tiny (model, resolution, steps, tracker: wandb is not installed)."""
    command = [
        "train", f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={instance}",
        f"--output_dir={output}", "--instance_prompt=a photo of sks dog", "--resolution=32",
        "--train_batch_size=1", "--gradient_accumulation_steps=2", "--report_to=tensorboard",
        "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=2",
        "--validation_prompt=A photo of sks dog in a bucket", "--validation_epochs=25",
        "--seed=0", "--push_to_hub", "--use_lora", "--accelerator=cpu", "--rank=4",
        "--with_prior_preservation", f"--class_data_dir={output.parent / 'class'}",
        "--class_prompt=a photo of dog", "--num_class_images=2", "--sample_batch_size=2",
        "--weighting_scheme=logit_normal", "--logit_mean=0.0", "--logit_std=1.0",
        "--mode_scale=1.29", "--cache_latents", "--upcast_before_saving",
        "--max_sequence_length=16", "--train_text_encoder", "--text_encoder_lr=5e-6",
        "--prior_generation_precision=fp32", "--lora_layers=attn.to_k,attn.to_q,attn.to_v",
        "--lora_blocks=0", "--gradient_checkpointing", "--adam_beta1=0.9",
        "--adam_beta2=0.999", "--adam_weight_decay=1e-04", "--adam_epsilon=1e-08",
        "--max_grad_norm=1.0", "--lr_num_cycles=1", "--lr_power=1.0",
        "--dataloader_num_workers=0", "--checkpointing_steps=500", "--allow_tf32",
    ]
    if script == "sd3":
        return command + ["--mixed_precision=no", "--learning_rate=4e-4",
                          "--precondition_outputs=1"]
    return command + ["--mixed_precision=bf16", "--guidance_scale=1", "--optimizer=AdamW",
                      "--learning_rate=1e-4"]


def test_diffusers_sd3_and_flux_command_lines_run_unchanged(flow_model, tmp_path, instance_dir,
                                                             capsys):
    family, folder = flow_model
    output = tmp_path / "out"
    assert main(readme_command(family, folder, instance_dir, output)) == 0, \
        capsys.readouterr().err
    state = load_file(output / "pytorch_lora_weights.safetensors")
    assert {v.dtype for v in state.values()} == {torch.float32}  # upcast_before_saving
    blocks = {k.split(".")[2] for k in state if k.startswith("transformer.")}
    assert blocks == {"0"}  # --lora_blocks
    saved = yaml.safe_load((output / "training_config.yaml").read_text())
    assert saved["weighting_scheme"] == "logit_normal"
    assert saved["prior_generation_precision"] == "fp32"


def test_options_that_cannot_apply_are_refused_with_what_to_do(flow_model, tmp_path,
                                                               instance_dir, capsys):
    family, folder = flow_model
    with pytest.raises(ValueError, match="snr_gamma.*weighting_scheme"):
        train(flow_config(folder, instance_dir, tmp_path / "a", snr_gamma=5.0))
    transformer = SimpleNamespace(config={})  # FLUX.1's config names no sample size
    real_flux = SimpleNamespace(family="flux", is_flow_matching=True, vae_scale_factor=8,
                                transformer=transformer, denoiser=transformer)
    with pytest.raises(ValueError, match="multiple of 16 .*e.g. 512"):  # 2x2 patches of /8
        check_resolution(520, real_flux)
    check_resolution(512, real_flux)
    with pytest.raises(ValueError, match="lora_layers"):
        train(flow_config(folder, instance_dir, tmp_path / "b", use_lora=True,
                          lora_unet_target_modules="to_q"))
    if importlib.util.find_spec("prodigyopt") is None:
        code = main(["train", f"--pretrained_model_name_or_path={folder}",
                     f"--instance_data_dir={instance_dir}", "--instance_prompt=a sks dog",
                     "--optimizer=prodigy", f"--output_dir={tmp_path / 'c'}"])
        assert code != 0 and "dreambooth[prodigy]" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_flow_keys_on_a_unet_model_are_refused(tiny_model, tmp_path, instance_dir):
    with pytest.raises(ValueError, match="weighting_scheme.*SD 3.x and FLUX.1"):
        train(tiny_config(tiny_model, instance_dir, tmp_path / "out",
                          weighting_scheme="logit_normal"))


# torchao is the optional 'quantize' extra: installed, it is imported by diffusers in every
# process and prints warnings there, so the default run goes without it and .ci/run installs it
# for the tests marked `quantize` alone. Without it these tests fail (diffusers' quantizer).
@pytest.mark.quantize
@pytest.mark.parametrize("kind,precision", [("int8", "bf16"), ("int4", "no")])
def test_lora_on_a_quantized_base_trains_and_saves_a_full_precision_lora(kind, precision,
                                                                        tmp_path, instance_dir):
    folder = save_tiny_pipeline(tmp_path / "flux", family="flux")
    keep = KeepModule()
    output = train(flow_config(folder, instance_dir, tmp_path / "out", use_lora=True, rank=2,
                               quantize_base=kind, learning_rate=5e-2,
                               mixed_precision=precision, upcast_before_saving=True),
                   callbacks=[keep])
    transformer = keep.module.transformer
    assert {p.dtype for p in transformer.parameters() if p.requires_grad} == {torch.float32}
    frozen = {p.dtype for p in transformer.parameters()  # biases, norms, embeddings
              if not p.requires_grad and not is_quantized(p)}
    assert frozen == {torch.bfloat16 if precision == "bf16" else torch.float32}
    to_q = transformer.transformer_blocks[0].attn.to_q
    assert type(to_q.base_layer.weight.data).__name__ in ("Int8Tensor",
                                                           "IntxUnpackedToInt8Tensor")
    state = load_file(output / "pytorch_lora_weights.safetensors")
    assert state and {v.dtype for v in state.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in state.values())
    pipeline = load_pipeline(folder, device="cpu")  # the LoRA applies to the full base
    pipeline.load_lora_weights(output)
    image = sampling.sample_images(pipeline, "a photo of sks dog", seeds=[0],
                                   num_inference_steps=2, guidance_scale=1.0, height=32,
                                   width=32, max_sequence_length=16)[0]
    assert np.asarray(image).std() > 0
    with pytest.raises(Exception, match="needs use_lora"):
        flow_config(folder, instance_dir, tmp_path / "x", quantize_base=kind)
