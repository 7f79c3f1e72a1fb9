"""DreamBooth training throughput and peak memory, through the public `train(config)` API.

Usage (from the repository root, with the package installed):

    python benchmarks/train_speed.py                  # tiny-cpu suite on a CPU-only machine
    python benchmarks/train_speed.py                  # sd15-gpu suite when CUDA is available
    python benchmarks/train_speed.py --suite all      # both suites (GPU machine)
    python benchmarks/train_speed.py --sd15           # SD-1.5-size suite even without CUDA
    python benchmarks/train_speed.py --suite flux-gpu # FLUX.1-dev-size LoRA (GPU, ~80 GB)

Suites (every model has random weights built in-process; nothing is downloaded):

- tiny-cpu: the tiny pipeline of `dreambooth.tiny` at 32 px (the baseline: UNet only), the
  same with the text encoder trained, and the UNet only at 64 px. Batch 2 instance + 2 prior
  samples, 4 class images generated with 2 denoising steps before timing. fp32.
- sd15-gpu: a Stable Diffusion 1.5-size architecture (UNet 320/640/1280/1280, VAE
  128/256/512/512, 12-layer 768-wide CLIP text model) at 512 px, batch 1 instance + 1 prior,
  UNet + text encoder trained, bf16-mixed, gradient checkpointing off and on. The tokenizer is
  the tiny one of `dreambooth.tiny.build_tiny_tokenizer()` (~600 tokens), so the text model is
  SD-1.5-sized except for its token-embedding table (~0.5M instead of 38M parameters).
- tiny-cpu also has the tiny SD 3.x and FLUX.1 pipelines (transformer only and LoRA r4, T5
  prompts of 16 tokens).
- sd35m-gpu / flux-gpu (opt-in: `--suite`): SD 3.5-medium (MMDiT-X, 24 blocks of 1536, CLIP-L,
  CLIP-G, T5-XXL) and FLUX.1-dev (19 double + 38 single blocks of 3072, guidance embedding,
  CLIP-L, T5-XXL) architectures at 1024 px, random weights built on the GPU in bf16 and saved
  once (~35 GB of disk for FLUX), LoRA rank 16 on diffusers' default targets, bf16-mixed,
  gradient checkpointing, batch 1 instance + 1 prior; T5 over the tiny T5 vocabulary (its
  embedding table is all that is smaller than the real one). FLUX trains with
  guidance_scale 1 (diffusers' README), also on an int8 and an int4 base (`--quantize_base`,
  torchao).

Each configuration runs `train(config, callbacks=[StepTimer])` in its own child process, so
peak memory is that configuration's alone. The timer stamps `time.perf_counter()` at the end
of every optimizer step (after `torch.cuda.synchronize()` on a GPU); the first `--warmup`
steps are discarded and throughput is (steps - warmup) / (last stamp - stamp of the last
warm-up step). Peak memory is the process-wide peak resident set size (`ru_maxrss`) on CPU,
and `torch.cuda.max_memory_allocated()` since the start of the training loop on a GPU (the
weights are already resident then; class-image generation and latent caching are not
counted). Each row is also given as a ratio to the suite's baseline row of the same invocation:
compare ratios across machines, absolute numbers only on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"
NUM_CLASS_IMAGES = 4
CLASS_INFERENCE_STEPS = 2
NUM_INSTANCE_PHOTOS = 4


@dataclass(frozen=True)
class Configuration:
    """One benchmarked training setup; `overrides` are flat TrainConfig keys."""

    name: str
    suite: str
    model: str  # key of MODEL_BUILDERS
    resolution: int
    train_batch_size: int  # instance samples per step; as many prior samples are added
    overrides: dict = field(default_factory=dict)
    baseline: bool = False

    @property
    def trained(self) -> str:
        flow = self.model.startswith(("tiny-sd3", "tiny-flux", "sd35m", "flux"))
        denoiser = "transformer" if flow else "UNet"
        parts = (f"{denoiser} + text encoder" if self.overrides.get("train_text_encoder")
                 else denoiser)
        if self.overrides.get("use_lora"):
            return f"LoRA r{self.overrides.get('rank', 4)} on {parts}"
        return parts


CONFIGURATIONS = (
    Configuration("tiny-32-unet", "tiny-cpu", "tiny-32", 32, 2, baseline=True),
    Configuration("tiny-32-unet+te", "tiny-cpu", "tiny-32", 32, 2,
                  {"train_text_encoder": True}),
    Configuration("tiny-64-unet", "tiny-cpu", "tiny-64", 64, 2),
    Configuration("tiny-32-lora", "tiny-cpu", "tiny-32", 32, 2, {"use_lora": True, "rank": 4}),
    Configuration("tiny-32-lora+te", "tiny-cpu", "tiny-32", 32, 2,
                  {"use_lora": True, "rank": 4, "train_text_encoder": True}),
    Configuration("tiny-sdxl-32-unet", "tiny-cpu", "tiny-sdxl-32", 32, 2),
    Configuration("tiny-sdxl-32-lora", "tiny-cpu", "tiny-sdxl-32", 32, 2,
                  {"use_lora": True, "rank": 4}),
    Configuration("tiny-sd3-32", "tiny-cpu", "tiny-sd3-32", 32, 2, {"max_sequence_length": 16}),
    Configuration("tiny-sd3-32-lora", "tiny-cpu", "tiny-sd3-32", 32, 2,
                  {"use_lora": True, "rank": 4, "max_sequence_length": 16}),
    Configuration("tiny-flux-32", "tiny-cpu", "tiny-flux-32", 32, 2, {"max_sequence_length": 16}),
    Configuration("tiny-flux-32-lora", "tiny-cpu", "tiny-flux-32", 32, 2,
                  {"use_lora": True, "rank": 4, "max_sequence_length": 16}),
    Configuration("sd15-512-unet+te", "sd15-gpu", "sd15", 512, 1,
                  {"train_text_encoder": True, "mixed_precision": "bf16",
                   "gradient_checkpointing": False}, baseline=True),
    Configuration("sd15-512-unet+te-gc", "sd15-gpu", "sd15", 512, 1,
                  {"train_text_encoder": True, "mixed_precision": "bf16",
                   "gradient_checkpointing": True}),
    Configuration("sd15-512-lora", "sd15-gpu", "sd15", 512, 1,
                  {"use_lora": True, "rank": 16, "mixed_precision": "bf16"}),
    Configuration("sdxl-1024-lora", "sdxl-gpu", "sdxl", 1024, 1,
                  {"use_lora": True, "rank": 16, "mixed_precision": "bf16",
                   "gradient_checkpointing": True}, baseline=True),
    Configuration("sdxl-1024-lora+te", "sdxl-gpu", "sdxl", 1024, 1,
                  {"use_lora": True, "rank": 16, "train_text_encoder": True,
                   "mixed_precision": "bf16", "gradient_checkpointing": True}),
    Configuration("sd35m-1024-lora", "sd35m-gpu", "sd35m", 1024, 1,
                  {"use_lora": True, "rank": 16, "mixed_precision": "bf16",
                   "gradient_checkpointing": True}, baseline=True),
    Configuration("flux-dev-1024-lora", "flux-gpu", "flux-dev", 1024, 1,
                  {"use_lora": True, "rank": 16, "mixed_precision": "bf16",
                   "gradient_checkpointing": True, "guidance_scale": 1.0}, baseline=True),
    Configuration("flux-dev-1024-lora-int8", "flux-gpu", "flux-dev", 1024, 1,
                  {"use_lora": True, "rank": 16, "mixed_precision": "bf16",
                   "gradient_checkpointing": True, "guidance_scale": 1.0,
                   "quantize_base": "int8"}),
    Configuration("flux-dev-1024-lora-int4", "flux-gpu", "flux-dev", 1024, 1,
                  {"use_lora": True, "rank": 16, "mixed_precision": "bf16",
                   "gradient_checkpointing": True, "guidance_scale": 1.0,
                   "quantize_base": "int4"}),
)
SUITES = ("tiny-cpu", "sd15-gpu", "sdxl-gpu", "sd35m-gpu", "flux-gpu")


# ----------------------------------------------------------------------------- models and data
def build_sd15_pipeline(seed: int):
    """An SD-1.5-size StableDiffusionPipeline with random weights (no download).

    Same architecture as runwayml/stable-diffusion-v1-5 (UNet ~860M, VAE ~84M parameters); the
    CLIP text model has SD 1.5's 12 layers x 768 width but the tiny tokenizer's vocabulary, so
    its embedding table is ~600 x 768 instead of 49408 x 768 (~85M instead of ~123M parameters).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, latent_channels=4, sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    # The scheduler config of dreambooth.tiny (SD 1.x's): training reads its DDPM parameters.
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1, beta_start=0.00085,
                              beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type="epsilon")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_sdxl_pipeline(seed: int):
    """An SDXL-base-size pipeline with random weights: UNet ~2.6B parameters (blocks 320/640/1280,
    transformer depths 1/2/10, 2048-wide cross-attention, text_time added embedding), SD's VAE,
    CLIP-L and a bigG-size second text encoder (32 layers x 1280) over the tiny tokenizer."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
        layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, latent_channels=4, sample_size=1024, scaling_factor=0.13025,
        force_upcast=True,
    )
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=77,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu", projection_dim=768, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        hidden_act="gelu", projection_dim=1280, **common))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", num_train_timesteps=1000,
                                       steps_offset=1, prediction_type="epsilon")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=build_tiny_tokenizer(), unet=unet, scheduler=scheduler)


def _full_size_text_parts():
    """CLIP-L and a T5-XXL-size encoder over the tiny tokenizers (full-size flow suites)."""
    from transformers import CLIPTextConfig, T5Config, T5EncoderModel

    from dreambooth.tiny import build_tiny_t5_tokenizer, build_tiny_tokenizer

    tokenizer, t5_tokenizer = build_tiny_tokenizer(), build_tiny_t5_tokenizer()
    clip = dict(vocab_size=len(tokenizer), max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768,
                            **clip)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
        num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id))
    return tokenizer, t5_tokenizer, clip, clip_l, t5


def _flow_vae(shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, latent_channels=16, sample_size=1024, shift_factor=shift_factor,
        scaling_factor=scaling_factor, use_quant_conv=False, use_post_quant_conv=False)


def build_sd35m_pipeline(seed: int):
    """An SD 3.5-medium-size StableDiffusion3Pipeline with random weights (~2.5B transformer:
    24 MMDiT-X blocks of 1536 with dual attention in the first 13 and RMS q/k norms)."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from dreambooth.tiny import build_tiny_tokenizer

    torch.manual_seed(seed)
    tokenizer, t5_tokenizer, clip, clip_l, t5 = _full_size_text_parts()
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                            **clip)
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=_flow_vae(0.0609, 1.5305),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection(clip_l), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_g), tokenizer_2=build_tiny_tokenizer(),
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)


def build_flux_dev_pipeline(seed: int):
    """A FLUX.1-dev-size FluxPipeline with random weights (~12B transformer: 19 double and 38
    single blocks of 24 x 128, guidance embedding, RoPE axes 16/56/56)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer, t5_tokenizer, _, clip_l, t5 = _full_size_text_parts()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, vae=_flow_vae(0.1159, 0.3611),
                        scheduler=scheduler, text_encoder=CLIPTextModel(clip_l),
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)


def _save_full_size(build, path: Path, seed: int) -> Path:
    """Build on the GPU in bf16 (minutes on a CPU, and 2x the memory) and save in bf16."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            pipeline = build(seed)
    finally:
        torch.set_default_dtype(previous)
    pipeline.save_pretrained(path)
    del pipeline
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def save_model(key: str, path: Path, seed: int) -> Path:
    from dreambooth.tiny import save_tiny_pipeline

    if key == "tiny-32":
        return save_tiny_pipeline(path, seed=seed, sample_size=32, block_channels=(32, 64))
    if key == "tiny-64":
        return save_tiny_pipeline(path, seed=seed, sample_size=64, block_channels=(32, 64))
    if key == "tiny-sdxl-32":
        return save_tiny_pipeline(path, seed=seed, family="sdxl", sample_size=32)
    if key in ("tiny-sd3-32", "tiny-flux-32"):
        return save_tiny_pipeline(path, seed=seed, family=key.split("-")[1], sample_size=32)
    if key == "sd35m":
        return _save_full_size(build_sd35m_pipeline, path, seed)
    if key == "flux-dev":
        return _save_full_size(build_flux_dev_pipeline, path, seed)
    if key == "sd15":
        build_sd15_pipeline(seed).save_pretrained(path)
        return path
    if key == "sdxl":
        build_sdxl_pipeline(seed).save_pretrained(path)
        return path
    raise ValueError(f"unknown model key {key!r}")


def write_subject_photos(folder: Path, size: int, count: int = NUM_INSTANCE_PHOTOS) -> Path:
    """`count` size x size photos of a made-up subject (as in tests/conftest.py, scaled)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    s = size / 40
    for index in range(count):
        image = Image.new("RGB", (size, size), (200, 60 + 30 * index, 50))
        draw = ImageDraw.Draw(image)
        o = 3 * index
        draw.ellipse([o * s, o * s, (o + 26) * s, (o + 26) * s], fill=(20, 40, 220))
        draw.rectangle([(o + 4) * s, (o + 11) * s, (o + 22) * s, (o + 15) * s], fill=(250, 220, 0))
        image.save(folder / f"photo-{index}.png")
    return folder


# ------------------------------------------------------------------------------ child process
def machine_busy_s() -> float | None:
    """CPU seconds all processes on this machine have used since boot (/proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def make_step_timer(synchronize: bool):
    import lightning as L
    import torch

    class StepTimer(L.Callback):
        """perf_counter() stamp at the end of every optimizer step; CUDA peak since fit start."""

        def __init__(self):
            self.stamps: list[float] = []
            self.cpu_marks: list[tuple[float | None, float]] = []  # (machine busy, own CPU) s
            self._last_step = -1
            self.cuda_peak_bytes: int | None = None

        def on_train_start(self, trainer, pl_module) -> None:
            if synchronize:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == self._last_step:  # a micro-batch inside accumulation
                return
            self._last_step = trainer.global_step
            if synchronize:
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            self.cpu_marks.append((machine_busy_s(), own_cpu_s()))

        def on_train_end(self, trainer, pl_module) -> None:
            if synchronize:
                torch.cuda.synchronize()
                self.cuda_peak_bytes = torch.cuda.max_memory_allocated()

    return StepTimer()


def run_child(spec_path: Path, result_path: Path) -> int:
    """Run one configuration as described by the spec file; write the result JSON."""
    spec = json.loads(spec_path.read_text())
    result: dict = {"name": spec["name"]}
    started = time.perf_counter()
    try:
        import torch

        from dreambooth.config import parse_train_config
        from dreambooth.train.run import train

        on_gpu = spec["accelerator"] == "gpu"
        steps, warmup = spec["steps"], spec["warmup"]
        work = Path(spec["workdir"])
        values = dict(
            pretrained_model_name_or_path=spec["model_path"],
            instance_data_dir=spec["instance_dir"], instance_prompt=INSTANCE_PROMPT,
            with_prior_preservation=True, class_prompt=CLASS_PROMPT,
            class_data_dir=str(work / "class"), num_class_images=NUM_CLASS_IMAGES,
            class_inference_steps=CLASS_INFERENCE_STEPS, sample_batch_size=NUM_CLASS_IMAGES,
            resolution=spec["resolution"], train_batch_size=spec["train_batch_size"],
            max_train_steps=steps, checkpointing_steps=steps + 1, learning_rate=1e-6,
            lr_warmup_steps=0, seed=spec["seed"], output_dir=str(work / "output"),
            report_to="none", accelerator=spec["accelerator"], devices="1",
        )
        values.update(spec["overrides"])
        config = parse_train_config(values)
        timer = make_step_timer(synchronize=on_gpu)
        train(config, callbacks=[timer])

        stamps = timer.stamps
        if len(stamps) != steps:
            raise RuntimeError(f"timer saw {len(stamps)} optimizer steps, expected {steps}")
        measured = stamps[warmup:]
        elapsed = measured[-1] - stamps[warmup - 1]
        step_times = [b - a for a, b in zip(stamps[warmup - 1:], measured)]
        # CPU time other processes used during the timed window, in cores: a busy machine
        # (tests running beside the benchmark) slows CPU training a lot, so say so.
        (busy0, own0), (busy1, own1) = timer.cpu_marks[warmup - 1], timer.cpu_marks[-1]
        foreign_cores = (None if busy0 is None or busy1 is None
                         else max(0.0, (busy1 - busy0) - (own1 - own0)) / elapsed)
        result.update(
            foreign_cpu_cores=foreign_cores,
            ok=True, steps_per_s=len(measured) / elapsed, measured_steps=len(measured),
            measured_s=elapsed, step_times_s=step_times,
            peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        )
        if on_gpu:
            result.update(cuda_peak_allocated_mib=timer.cuda_peak_bytes / 2**20,
                          cuda_peak_reserved_mib=torch.cuda.max_memory_reserved() / 2**20)
        code = 0
    except BaseException as error:  # noqa: BLE001 - report every failure, then exit non-zero
        result.update(ok=False, error=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc())
        code = 1
    result["wall_s"] = time.perf_counter() - started
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return code


# ----------------------------------------------------------------------------- parent process
def describe_machine() -> dict:
    import torch

    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    machine = {
        "host": socket.gethostname(), "cpu_model": cpu_model, "cpu_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    from dreambooth.formats.export import library_versions

    machine["versions"] = library_versions()
    return machine


def machine_line(machine: dict) -> str:
    versions = machine["versions"]
    libs = ", ".join(f"{k} {versions[k]}" for k in ("torch", "diffusers", "transformers",
                                                     "lightning") if k in versions)
    return (f"CPU: {machine['cpu_model']}, {machine['cpu_cores']} cores "
            f"({machine['usable_cores']} usable, {machine['torch_threads']} torch threads); "
            f"GPU: {machine['gpu'] or 'none'}; Python {machine['python']}; {libs}")


def table_header(on_gpu: bool) -> str:
    memory = "peak CUDA alloc (MiB)" if on_gpu else "peak RSS (MiB)"
    return ("| config | res | batch (inst+prior) | trained | precision | grad ckpt | steps/s "
            f"| median step (ms) | ratio to baseline | {memory} | other CPU load |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(config: Configuration, result: dict, baseline_speed: float | None) -> str:
    precision = {"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(
        config.overrides.get("mixed_precision", "no"), "fp32")
    checkpointing = "on" if config.overrides.get("gradient_checkpointing") else "off"
    batch = f"{config.train_batch_size}+{config.train_batch_size}"
    prefix = (f"| {config.name} | {config.resolution} | {batch} | {config.trained} | {precision} "
              f"| {checkpointing} |")
    if not result.get("ok"):
        return f"{prefix} failed | - | - | - | - |"
    speed = result["steps_per_s"]
    ratio = f"{speed / baseline_speed:.2f}" if baseline_speed else "-"
    memory = result.get("cuda_peak_allocated_mib", result["peak_rss_mib"])
    foreign = result.get("foreign_cpu_cores")
    load = "?" if foreign is None else f"{foreign:.2f} cores"
    median_ms = 1000 * statistics.median(result["step_times_s"])
    return f"{prefix} {speed:.2f} | {median_ms:.1f} | {ratio} | {memory:,.0f} | {load} |"


def run_configuration(config: Configuration, *, model_path: Path, instance_dir: Path,
                      accelerator: str, args, scratch: Path) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"{config.name}-", dir=scratch))
    spec = dict(name=config.name, model_path=str(model_path), instance_dir=str(instance_dir),
                resolution=config.resolution, train_batch_size=config.train_batch_size,
                overrides=config.overrides, steps=args.steps, warmup=args.warmup,
                seed=args.seed, accelerator=accelerator, workdir=str(workdir))
    spec_path, result_path = workdir / "spec.json", workdir / "result.json"
    log_path = workdir / "child.log"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, str(Path(__file__).resolve()), "--child-spec", str(spec_path),
               "--child-result", str(result_path)]
    try:
        with open(log_path, "w") as log:
            sink = None if args.verbose else log
            completed = subprocess.run(command, stdout=sink,
                                       stderr=subprocess.STDOUT if sink else None)
        if result_path.exists():
            result = json.loads(result_path.read_text())
        else:
            result = {"name": config.name, "ok": False,
                      "error": f"child process exited with code {completed.returncode} "
                               "without writing a result (killed, e.g. out of memory?)"}
        if not result.get("ok") and log_path.exists():
            result["log_tail"] = log_path.read_text()[-4000:]
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def selected_suites(args, cuda: bool) -> list[str]:
    if args.sd15:
        return ["sd15-gpu"] if args.suite in (None, "sd15-gpu") else list(SUITES)
    if args.suite is None:
        return ["sd15-gpu", "sdxl-gpu"] if cuda else ["tiny-cpu"]
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    if any(suite.endswith("-gpu") for suite in suites) and not cuda:
        raise SystemExit("the sd15-gpu suite needs CUDA (torch.cuda.is_available() is False); "
                         "pass --sd15 to run it anyway (very slow on a CPU)")
    return suites


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="DreamBooth training throughput (steps/s) and peak memory via train().")
    parser.add_argument("--suite", choices=SUITES + ("all",), default=None,
                        help="Which configurations to run (default: sd15-gpu with CUDA, else "
                             "tiny-cpu).")
    parser.add_argument("--sd15", action="store_true",
                        help="Run the SD-1.5-size suite even without CUDA.")
    parser.add_argument("--steps", type=int, default=None,
                        help="Optimizer steps per configuration, warm-up included (default: 20 "
                             "on CPU, 30 on GPU).")
    parser.add_argument("--warmup", type=int, default=3,
                        help="Leading steps left out of the timing (at least 1).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for weights, data and noise.")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None,
                        help="Run only these configuration names (the baseline is always run).")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results file (default: benchmarks/results/"
                             "train_speed-<host>.json).")
    parser.add_argument("--verbose", action="store_true",
                        help="Show the training runs' own output instead of hiding it.")
    parser.add_argument("--child-spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_spec:
        return run_child(args.child_spec, args.child_result)

    import torch

    cuda = torch.cuda.is_available()
    accelerator = "gpu" if cuda else "cpu"
    args.steps = args.steps or (30 if cuda else 20)
    if args.warmup < 1 or args.steps <= args.warmup:
        raise SystemExit(f"need 1 <= --warmup < --steps (got warmup={args.warmup}, "
                         f"steps={args.steps})")
    suites = selected_suites(args, cuda)
    unknown = sorted(set(args.only or ()) - {c.name for c in CONFIGURATIONS})
    if unknown:
        raise SystemExit(f"--only: unknown configuration(s) {', '.join(unknown)}; choose from "
                         + ", ".join(c.name for c in CONFIGURATIONS))
    machine = describe_machine()
    output = args.output or RESULTS_DIR / f"train_speed-{machine['host']}.json"
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print(f"machine: {machine_line(machine)}")
    print(f"command: {command}")
    busy_before = machine_busy_s()
    time.sleep(1.0)
    busy_after = machine_busy_s()
    if busy_before is not None and busy_after is not None:
        machine["busy_cores_at_start"] = busy_after - busy_before
        print(f"CPU cores busy with other work at start: {busy_after - busy_before:.2f}")
        if busy_after - busy_before > 0.2:
            print("warning: the machine is not idle; CPU timings will be disturbed",
                  file=sys.stderr)
    print(f"accelerator: {accelerator}; steps {args.steps} per configuration, first "
          f"{args.warmup} not timed; seed {args.seed}\n")

    report = {"machine": machine, "command": command,
              "settings": {"accelerator": accelerator, "steps": args.steps,
                           "warmup": args.warmup, "seed": args.seed, "suites": suites},
              "results": []}
    failures = 0
    with tempfile.TemporaryDirectory(prefix="train-speed-") as scratch_name:
        scratch = Path(scratch_name)
        for suite in suites:
            configs = [c for c in CONFIGURATIONS if c.suite == suite
                       and (args.only is None or c.baseline or c.name in args.only)]
            models: dict[str, Path] = {}
            photos: dict[int, Path] = {}
            print(f"## {suite}\n\n{table_header(cuda)}", flush=True)
            baseline_speed = None
            for config in configs:
                if config.model not in models:
                    models[config.model] = save_model(config.model, scratch / config.model,
                                                      args.seed)
                if config.resolution not in photos:
                    photos[config.resolution] = write_subject_photos(
                        scratch / f"instance-{config.resolution}", config.resolution)
                result = run_configuration(config, model_path=models[config.model],
                                           instance_dir=photos[config.resolution],
                                           accelerator=accelerator, args=args, scratch=scratch)
                if config.baseline and result.get("ok"):
                    baseline_speed = result["steps_per_s"]
                if result.get("ok") and baseline_speed:
                    result["ratio_to_baseline"] = result["steps_per_s"] / baseline_speed
                result.update(suite=suite, configuration=asdict(config))
                report["results"].append(result)
                print(table_row(config, result, baseline_speed), flush=True)
                if (result.get("foreign_cpu_cores") or 0) > 0.2:
                    print(f"warning: other processes kept {result['foreign_cpu_cores']:.2f} CPU "
                          f"cores busy while {config.name} was timed; its steps/s is not "
                          "trustworthy, rerun on a quiet machine", file=sys.stderr, flush=True)
                if not result.get("ok"):
                    failures += 1
                    print(f"\n{config.name} failed: {result['error']}\n"
                          f"{result.get('traceback') or result.get('log_tail', '')}",
                          file=sys.stderr, flush=True)
            for path in models.values():
                shutil.rmtree(path, ignore_errors=True)
            print()
    memory_note = ("peak RSS: process-wide peak resident set size (ru_maxrss) of the child "
                   "process that ran the configuration, model loading and class-image "
                   "generation included")
    if cuda:
        memory_note += ("; peak CUDA alloc: torch.cuda.max_memory_allocated() from the start of "
                        "the training loop to its end")
    report["memory_note"] = memory_note
    print("other CPU load: CPU time used by other processes on this machine during the timed "
          "steps, in cores (from /proc/stat); above ~0.2 the CPU figures are disturbed")
    print(memory_note)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
