"""`train(config)`: one DreamBooth run from a validated TrainConfig to a saved pipeline.

Wires the pieces together and hands the loop to Lightning's Trainer: DreamBoothModule (loss,
what is trained), DreamBoothDataModule (images -> cached latents -> batches), callbacks (class
images, validation samples, checkpoints) and loggers. Nothing here computes a loss.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

import dreambooth.train.checkpointing as checkpointing
from dreambooth import cpu
from dreambooth.config import TrainConfig, dump_yaml, instance_prompt_warnings, parse_train_config
from dreambooth.formats.export import save_trained_pipeline, write_run_files
from dreambooth.formats.lora_files import (
    default_output_name,
    lora_metadata,
    save_lora_files,
    tag_frequency,
)
from dreambooth.images import load_image_folder
from dreambooth.models import load_components
from dreambooth.prompts import read_prompt_file
from dreambooth.train.callbacks import ClassImageGeneration, ValidationSamples
from dreambooth.train.data import DreamBoothDataModule, steps_for_epochs
from dreambooth.train.ema import EMAWeights
from dreambooth.train.lora import LoraSettings
from dreambooth.train.module import DreamBoothModule, optimizer_class
from dreambooth.train.validation import ValidationLoss

log = logging.getLogger(__name__)

PRECISION = {"no": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}
CONFIG_KEY = "dreambooth_config"  # where a checkpoint holds its run's resolved configuration
THREADS_KEY = "torch_threads"  # and the CPU thread count it trained with (see dreambooth.cpu)
MAX_VALIDATION_PROMPTS = 64  # each prompt costs a sampling run at every validation
# Keys that must match between a checkpoint and the run resuming it for an exact resume.
RESUME_INVARIANTS = ("pretrained_model_name_or_path", "train_text_encoder", "train_batch_size",
                     "gradient_accumulation_steps", "with_prior_preservation", "resolution",
                     "center_crop", "random_flip", "seed", "use_lora", "rank", "lora_alpha",
                     "lora_unet_target_modules", "lora_text_encoder_target_modules",
                     "use_ema", "ema_decay", "ema_warmup")


class RunMetadata(L.Callback):
    """Stores the resolved configuration (and the torch thread count) in every checkpoint."""

    def __init__(self, config: TrainConfig):
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[CONFIG_KEY] = self.config.to_flat_dict()
        checkpoint[THREADS_KEY] = torch.get_num_threads()


def resolve_config(config: TrainConfig, saved: Mapping[str, Any] | None = None) -> TrainConfig:
    """The run's configuration with nothing left open, validated once.

    `saved` is the configuration stored in the checkpoint a run resumes: an unset seed is the
    checkpoint's (else a random one, recorded in the outputs); an unset max_train_steps is
    num_train_epochs over the instance (and class) images; unset guidance scales are the base
    model's own (`parse_train_config` fills them).
    """
    values = config.to_flat_dict()
    if values["seed"] is None:
        values["seed"] = (saved or {}).get("seed")
    if values["seed"] is None:
        values["seed"] = secrets.randbelow(2**31)
    if values["max_train_steps"] is None:
        values["max_train_steps"] = steps_for_epochs(
            config.data.instance_data_dir, num_class_images=config.prior.num_class_images,
            with_prior=config.prior.with_prior_preservation,
            num_train_epochs=config.optim.num_train_epochs,
            train_batch_size=config.optim.train_batch_size,
            gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
            repeats=config.optim.repeats)
    return parse_train_config(values)


def _loggers(config: TrainConfig, output_dir: Path) -> list:
    from lightning.pytorch import loggers

    extras = {"wandb": "wandb", "mlflow": "mlflow"}
    result = []
    for name in config.trackers:
        if name in extras:
            try:
                __import__(extras[name])
            except ImportError as error:
                raise ImportError(f"report_to={name} needs the '{name}' extra: "
                                  f"pip install 'dreambooth[{name}]'") from error
        if name == "tensorboard":
            result.append(loggers.TensorBoardLogger(output_dir, name=config.tracking.logging_dir,
                                                    version="", default_hp_metric=False))
        elif name == "csv":
            result.append(loggers.CSVLogger(output_dir, name=config.tracking.logging_dir,
                                            version="csv"))
        elif name == "wandb":
            result.append(loggers.WandbLogger(project=config.tracking.tracker_project_name,
                                              save_dir=str(output_dir)))
        elif name == "mlflow":
            result.append(loggers.MLFlowLogger(
                experiment_name=config.tracking.tracker_project_name,
                tracking_uri=(output_dir / "mlruns").resolve().as_uri()))
    for logger in result:
        logger.log_hyperparams({k: v for k, v in config.to_flat_dict().items() if v is not None})
    return result


def _devices(text: str) -> int | str:
    return int(text) if text.strip().lstrip("-").isdigit() else text


def _compatibility_notes(config: TrainConfig) -> None:
    for message in instance_prompt_warnings(config):
        warnings.warn(message, UserWarning, stacklevel=3)
    if config.hardware.enable_xformers_memory_efficient_attention:
        log.warning("enable_xformers_memory_efficient_attention: not needed; diffusers uses "
                    "PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels)")
    if config.hardware.dataloader_num_workers:
        log.info("dataloader_num_workers ignored: batches come from latents cached in memory")


def train(config: TrainConfig, *, callbacks: list | None = None) -> Path:
    """Run DreamBooth training as configured; returns the output folder (a diffusers pipeline).

    `callbacks` are extra Lightning callbacks (tests use them to interrupt a run).
    """
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    try:
        return _train(config, callbacks or [], cpu.LoadMeter())
    finally:
        torch.set_num_threads(threads)
        # An interrupt between a step's start and end hooks skips the module's restore (Lightning
        # calls no module hook on Ctrl-C): a later run in this process would convolve otherwise.
        torch.backends.mkldnn.enabled = mkldnn


def _on_cpu(config: TrainConfig) -> bool:
    accelerator = config.hardware.accelerator
    if accelerator == "auto":
        return not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return accelerator == "cpu"


def _choose_threads(config: TrainConfig, meter: cpu.LoadMeter, resumed: int | None) -> None:
    """Set torch's threads for a CPU run: `num_threads`, else the count of the checkpoint
    resumed (the same float sums as before the interruption), else OMP_NUM_THREADS, else one
    per core other processes leave idle (see dreambooth.cpu)."""
    if not _on_cpu(config):
        return
    threads = config.hardware.num_threads or resumed
    if threads is None and cpu.threads_chosen_by_user():
        threads = torch.get_num_threads()
    elif threads is None:
        others, cores = meter.other_cores(), len(cpu.usable_cores())
        threads = cpu.threads_beside(others, cores)
        if threads < cores:
            log.info("other processes keep %.1f of %d cores busy: training with %d torch "
                     "thread(s) (num_threads sets the count)", others, cores, threads)
    torch.set_num_threads(threads)


def _train(config: TrainConfig, callbacks: list, meter: cpu.LoadMeter) -> Path:
    output_dir = Path(config.checkpoint.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir '{output_dir}' is a file; pass a folder (a new one, or a "
                         "model folder this run may replace)")
    _compatibility_notes(config)
    optimizer_class(config.optim)  # fail before loading models if it cannot run
    resume_path = checkpointing.resolve_resume_path(config.checkpoint.resume_from_checkpoint,
                                                    checkpoint_dir)
    saved, resumed_threads = None, None
    if resume_path is not None:
        stored = checkpointing.read_checkpoint(resume_path)
        saved, resumed_threads = stored.get(CONFIG_KEY, {}), stored.get(THREADS_KEY)
        del stored
    config = resolve_config(config, saved)
    if resume_path is not None:
        checkpointing.check_resume(resume_path, saved, config.to_flat_dict(), RESUME_INVARIANTS,
                                   advice="Use the checkpoint's values or start anew.")
    if config.hardware.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed, max_steps = config.optim.seed, config.optim.max_train_steps

    # Fail before loading models.
    num_train_images = len(load_image_folder(config.data.instance_data_dir, role="instance"))
    validation_prompts = []
    if config.validation.validation_prompt:
        validation_prompts.append(config.validation.validation_prompt)
    if config.validation.validation_prompts:
        validation_prompts += read_prompt_file(config.validation.validation_prompts,
                                               flag="--validation_prompts",
                                               limit=MAX_VALIDATION_PROMPTS)
    if config.validation.validation_data_dir:
        load_image_folder(config.validation.validation_data_dir, role="validation")
    # Seeded before the models exist: LoRA layers are initialised from the global RNG.
    L.seed_everything(seed, workers=True, verbose=False)
    components = load_components(
        config.model.pretrained_model_name_or_path, config.model.revision,
        vae_name_or_path=config.model.pretrained_vae_model_name_or_path,
        variant=config.model.variant, prediction_type=config.model.prediction_type)
    check_resolution(config.data.resolution, components)
    _choose_threads(config, meter, resumed_threads)  # the load measured while models loaded
    with_prior = config.prior.with_prior_preservation
    lora = lora_settings(config)
    module = DreamBoothModule(
        components, instance_prompt=config.data.instance_prompt,
        class_prompt=config.data.class_prompt if with_prior else None,
        prior_loss_weight=config.prior.prior_loss_weight, optim=config.optim,
        max_train_steps=max_steps,
        pre_compute_text_embeddings=config.hardware.pre_compute_text_embeddings, lora=lora)
    datamodule = DreamBoothDataModule(
        instance_data_dir=config.data.instance_data_dir,
        class_data_dir=config.data.class_data_dir if with_prior else None,
        num_class_images=config.prior.num_class_images, resolution=config.data.resolution,
        center_crop=config.data.center_crop, random_flip=config.data.random_flip,
        train_batch_size=config.optim.train_batch_size,
        gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
        max_train_steps=max_steps, seed=seed, vae=components.vae)

    run_callbacks: list = [
        RunMetadata(config),
        checkpointing.periodic_checkpoints(checkpoint_dir, config.checkpoint.checkpointing_steps,
                                           config.checkpoint.checkpoints_total_limit),
        checkpointing.InterruptCheckpoint(checkpoint_dir, config.optim.gradient_accumulation_steps),
    ]
    # Before ValidationSamples and the checkpoints: a step's samples and checkpoint see its update.
    ema = EMAWeights(decay=config.ema.ema_decay, warmup=config.ema.ema_warmup,
                     on_cpu=config.ema.ema_on_cpu) if config.ema.use_ema else None
    run_callbacks += [ema] if ema is not None else []
    if with_prior and config.prior.num_class_images > 0:
        run_callbacks.append(ClassImageGeneration(
            components, class_data_dir=config.data.class_data_dir,
            class_prompt=config.data.class_prompt, num_class_images=config.prior.num_class_images,
            seed=seed, sample_batch_size=config.prior.sample_batch_size,
            num_inference_steps=config.prior.class_inference_steps,
            guidance_scale=config.prior.class_guidance_scale, resolution=config.data.resolution))
    if validation_prompts:
        run_callbacks.append(ValidationSamples(
            components, prompts=validation_prompts,
            every_n_steps=config.validation.validation_steps,
            num_images=config.validation.num_validation_images,
            num_inference_steps=config.validation.validation_inference_steps,
            guidance_scale=config.validation.validation_guidance_scale, seed=seed,
            resolution=config.data.resolution, output_dir=output_dir / "validation"))
    if config.validation.validation_data_dir:
        run_callbacks.append(ValidationLoss(
            config.validation.validation_data_dir, instance_prompt=config.data.instance_prompt,
            every_n_steps=config.validation.validation_steps, resolution=config.data.resolution,
            center_crop=config.data.center_crop, seed=seed,
            batch_size=2 * config.optim.train_batch_size))
    run_callbacks += callbacks

    trainer = L.Trainer(
        accelerator=config.hardware.accelerator, devices=_devices(config.hardware.devices),
        num_nodes=config.hardware.num_nodes, strategy=config.hardware.strategy,
        precision=PRECISION[config.optim.mixed_precision],
        max_steps=max_steps, max_epochs=-1,
        accumulate_grad_batches=config.optim.gradient_accumulation_steps,
        gradient_clip_val=config.optim.max_grad_norm or None, gradient_clip_algorithm="norm",
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
        callbacks=run_callbacks, logger=_loggers(config, output_dir) or False,
        plugins=[checkpointing.AtomicCheckpointIO()], default_root_dir=output_dir,
        log_every_n_steps=1, enable_model_summary=False)
    # Nothing is written into output_dir before the run has a model to put there: an existing
    # model (and its training_config.yaml) stays as it was if this run fails.
    with warnings.catch_warnings():
        # The frozen VAE (and text encoder) stay in eval mode on purpose.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)
    if ema is not None and not config.ema.export_raw_weights:
        ema.copy_to_module()  # the model (or LoRA) saved is the average
    module.check_finite_weights()  # NonFiniteError: an existing model is never replaced by NaN
    if trainer.is_global_zero:
        if lora is None:
            save_trained_pipeline(components, output_dir, config_yaml=dump_yaml(config))
            log.info("trained pipeline saved to %s", output_dir)
        else:
            output_name = config.checkpoint.output_name or default_output_name(output_dir)
            optim = config.optim
            metadata = lora_metadata(
                settings=lora, base_model=str(config.model.pretrained_model_name_or_path),
                trigger_phrase=config.data.instance_prompt, output_name=output_name,
                resolution=config.data.resolution, prediction_type=components.prediction_type,
                training_steps=trainer.global_step, learning_rate=optim.learning_rate,
                text_encoder_lr=(optim.text_encoder_lr or optim.learning_rate)
                if optim.train_text_encoder else None,
                num_train_images=num_train_images,
                tag_frequency=tag_frequency({Path(config.data.instance_data_dir).name: [
                    config.data.instance_prompt] * num_train_images}),
                family=components.family)
            paths = save_lora_files(output_dir, components.unet, components.text_encoders,
                                    settings=lora, metadata=metadata, output_name=output_name,
                                    family=components.family)
            write_run_files(output_dir, dump_yaml(config))
            log.info("LoRA weights saved: %s", ", ".join(map(str, paths)))
    return output_dir


def check_resolution(resolution: int, components) -> None:
    """Refuse a resolution far beyond the model's own (memory grows with its square): at most
    twice the size the model was trained at."""
    native = components.unet.config.sample_size * components.vae_scale_factor
    if resolution > 2 * native:
        raise ValueError(f"resolution={resolution} is more than twice the {native} px this "
                         f"{components.family.upper()} model was trained at; use at most "
                         f"{2 * native} (usually {native})")


def lora_settings(config: TrainConfig) -> LoraSettings | None:
    adapter = config.adapter
    if not adapter.use_lora:
        return None
    def split(text: str) -> tuple[str, ...]:
        return tuple(name.strip() for name in text.split(",") if name.strip())

    return LoraSettings(rank=adapter.rank, alpha=adapter.lora_alpha or float(adapter.rank),
                        dropout=adapter.lora_dropout, use_dora=adapter.use_dora,
                        unet_target_modules=split(adapter.lora_unet_target_modules),
                        text_encoder_target_modules=split(adapter.lora_text_encoder_target_modules))
