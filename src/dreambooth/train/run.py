"""`train(config)`: one DreamBooth run from a validated TrainConfig to a saved pipeline.

Wires the pieces together and hands the loop to Lightning's Trainer: DreamBoothModule (loss,
what is trained; FlowMatchingModule for SD 3.x and FLUX.1), DreamBoothDataModule (images ->
cached latents -> batches), callbacks (class images, validation samples, checkpoints) and
loggers. Nothing here computes a loss.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

import dreambooth.train.checkpointing as checkpointing
from dreambooth import cpu
from dreambooth.config import (
    FLOW_KEYS,
    TrainConfig,
    dump_yaml,
    instance_prompt_warnings,
    parse_train_config,
)
from dreambooth.families import is_flow_matching
from dreambooth.flow import family_module
from dreambooth.flow.objective import FlowSettings
from dreambooth.formats.export import save_trained_pipeline, write_run_files
from dreambooth.formats.lora_files import (
    default_output_name,
    lora_metadata,
    save_lora_files,
    tag_frequency,
)
from dreambooth.formats.transformer_keys import transformer_variant
from dreambooth.images import list_image_files, load_image_folder
from dreambooth.models import load_components
from dreambooth.prompts import read_prompt_file
from dreambooth.train.buckets import BucketSettings
from dreambooth.train.callbacks import ClassImageGeneration, ValidationSamples
from dreambooth.train.captions import (
    CaptionSettings,
    concept_captions,
    is_companion,
    warn_truncated,
)
from dreambooth.train.concepts import Concept, resolve_concepts
from dreambooth.train.data import DreamBoothDataModule, steps_for_epochs
from dreambooth.train.ema import EMAWeights
from dreambooth.train.flow_export import save_flow_lora, save_flow_pipeline
from dreambooth.train.flow_matching import FlowMatchingModule
from dreambooth.train.lora import LoraSettings
from dreambooth.train.masks import MaskSettings
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
                     "use_ema", "ema_decay", "ema_warmup",
                     "concepts", "caption_extension", "caption_dropout_rate", "shuffle_caption",
                     "keep_tokens", "aspect_buckets", "min_bucket_reso", "max_bucket_reso",
                     "bucket_reso_steps", "bucket_no_upscale", "mask_dir", "alpha_mask",
                     "unmasked_weight", "weighting_scheme", "logit_mean", "logit_std",
                     "mode_scale", "precondition_outputs", "guidance_scale",
                     "max_sequence_length", "lora_layers", "lora_blocks", "quantize_base")


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
        concepts = run_concepts(config)
        companion = partial(is_companion, caption_extension=config.data.caption_extension)
        samples = sum(len(list_image_files(Path(c.instance_data_dir), companion)) * c.repeats
                      for c in concepts) * config.optim.repeats
        values["max_train_steps"] = steps_for_epochs(
            samples, num_class_images=sum(class_image_counts(
                concepts, config.prior.num_class_images).values()),
            with_prior=config.prior.with_prior_preservation,
            num_train_epochs=config.optim.num_train_epochs,
            train_batch_size=config.optim.train_batch_size,
            gradient_accumulation_steps=config.optim.gradient_accumulation_steps)
    return parse_train_config(values)


def run_concepts(config: TrainConfig) -> list[Concept]:
    """The concepts of a run (concepts.py): from --concepts, kohya folders or the flags."""
    data = config.data
    return resolve_concepts(concepts_file=data.concepts, instance_data_dir=data.instance_data_dir,
                            instance_prompt=data.instance_prompt,
                            class_data_dir=data.class_data_dir, class_prompt=data.class_prompt,
                            with_prior=config.prior.with_prior_preservation)


def class_image_counts(concepts: list[Concept], default: int) -> dict[tuple[str, str], int]:
    """{(class_data_dir, class_prompt): class images wanted}: the most any of its concepts
    asks for; concepts of one class share its images."""
    counts: dict[tuple[str, str], int] = {}
    for concept in concepts:
        if concept.class_key is not None:
            wanted = default if concept.num_class_images is None else concept.num_class_images
            counts[concept.class_key] = max(counts.get(concept.class_key, 0), wanted)
    return counts


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
        log.info("resuming from %s", resume_path)
    if config.hardware.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed, max_steps = config.optim.seed, config.optim.max_train_steps

    # Fail before loading models.
    data = config.data
    concepts = run_concepts(config)
    companion = partial(is_companion, caption_extension=data.caption_extension)
    captions: dict[Path, str] = {}
    concept_texts: dict[str, list[str]] = {}
    for concept in concepts:
        load_image_folder(Path(concept.instance_data_dir), role="instance", companion=companion)
        found = concept_captions(concept.instance_data_dir, concept.instance_prompt,
                                 data.caption_extension)
        captions.update(found)
        concept_texts.setdefault(Path(concept.instance_data_dir).name, []).extend(found.values())
    class_counts = class_image_counts(concepts, config.prior.num_class_images)
    num_train_images = len(captions)
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
        variant=config.model.variant, prediction_type=config.model.prediction_type,
        single_file_config=config.model.single_file_config)
    flow = check_family_options(config, components)
    check_resolution(config.data.resolution, components)
    check_bucket_steps(config, components)
    warn_truncated({str(path): text for path, text in captions.items()},
                   components.tokenizer)
    _choose_threads(config, meter, resumed_threads)  # the load measured while models loaded
    lora = lora_settings(config, components.family)
    prompts = [*captions.values(), *(prompt for _, prompt in class_counts),
               *([""] if data.caption_dropout_rate else [])]
    if flow is None:
        module = DreamBoothModule(
            components, prompts=prompts,
            prior_loss_weight=config.prior.prior_loss_weight, optim=config.optim,
            max_train_steps=max_steps,
            pre_compute_text_embeddings=config.hardware.pre_compute_text_embeddings, lora=lora)
    else:
        # Validation prompts (and SD3's negative "") are tabled too: T5 is released after.
        module = FlowMatchingModule(
            components, prompts=[*prompts, *validation_prompts,
                                 *([""] if validation_prompts else [])],
            prior_loss_weight=config.prior.prior_loss_weight, optim=config.optim,
            max_train_steps=max_steps, flow=flow,
            pre_compute_text_embeddings=config.hardware.pre_compute_text_embeddings, lora=lora,
            closed_prompts=not data.shuffle_caption, quantize=config.adapter.quantize_base,
            base_dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(
                config.optim.mixed_precision, torch.float32))
    max_sequence_length = None if flow is None else flow.max_sequence_length
    datamodule = DreamBoothDataModule(
        concepts=concepts, captions=captions, num_class_images=config.prior.num_class_images,
        buckets=BucketSettings(
            resolution=data.resolution, enabled=data.aspect_buckets,
            min_reso=data.min_bucket_reso, max_reso=data.max_bucket_reso,
            reso_steps=data.bucket_reso_steps, no_upscale=data.bucket_no_upscale),
        center_crop=data.center_crop, random_flip=data.random_flip,
        train_batch_size=config.optim.train_batch_size,
        gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
        max_train_steps=max_steps, seed=seed, vae=components.vae,
        caption_extension=data.caption_extension,
        caption_settings=CaptionSettings(dropout_rate=data.caption_dropout_rate,
                                         shuffle=data.shuffle_caption,
                                         keep_tokens=data.keep_tokens),
        masks=MaskSettings(mask_dir=data.mask_dir, alpha_mask=data.alpha_mask,
                           unmasked_weight=data.unmasked_weight))

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
    for (class_data_dir, class_prompt), wanted in class_counts.items():
        if wanted > 0:  # one generation per class, shared by the concepts of that class
            run_callbacks.append(ClassImageGeneration(
                components, class_data_dir=class_data_dir, class_prompt=class_prompt,
                num_class_images=wanted, seed=seed,
                sample_batch_size=config.prior.sample_batch_size,
                num_inference_steps=config.prior.class_inference_steps,
                guidance_scale=config.prior.class_guidance_scale,
                resolution=config.data.resolution,
                precision=config.prior.prior_generation_precision,
                max_sequence_length=max_sequence_length))
    if validation_prompts:
        run_callbacks.append(ValidationSamples(
            components, prompts=validation_prompts,
            every_n_steps=config.validation.validation_steps,
            num_images=config.validation.num_validation_images,
            num_inference_steps=config.validation.validation_inference_steps,
            guidance_scale=config.validation.validation_guidance_scale, seed=seed,
            resolution=config.data.resolution, output_dir=output_dir / "validation",
            max_sequence_length=max_sequence_length))
    if config.validation.validation_data_dir:
        run_callbacks.append(ValidationLoss(
            config.validation.validation_data_dir, instance_prompt=config.data.instance_prompt,
            every_n_steps=config.validation.validation_steps, resolution=config.data.resolution,
            seed=seed, caption_extension=config.data.caption_extension,
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
    if not trainer.is_global_zero:
        return output_dir
    output_name = config.checkpoint.output_name or default_output_name(output_dir)
    metadata = None if lora is None else lora_run_metadata(
        config, components, lora, output_name=output_name, training_steps=trainer.global_step,
        trigger_phrase=", ".join(dict.fromkeys(c.instance_prompt for c in concepts)),
        num_train_images=num_train_images, captions=concept_texts)
    if flow is not None:
        save_flow_outputs(config, components, module, lora, output_dir, metadata=metadata,
                          output_name=output_name)
    elif lora is None:
        save_trained_pipeline(components, output_dir, config_yaml=dump_yaml(config))
        log.info("trained pipeline saved to %s", output_dir)
    else:
        paths = save_lora_files(output_dir, components.unet, components.text_encoders,
                                settings=lora, metadata=metadata, output_name=output_name,
                                family=components.family)
        write_run_files(output_dir, dump_yaml(config))
        log.info("LoRA weights saved: %s", ", ".join(map(str, paths)))
    return output_dir


def lora_run_metadata(config: TrainConfig, components, lora: LoraSettings, *, output_name: str,
                      training_steps: int, trigger_phrase: str, num_train_images: int,
                      captions: dict[str, list[str]]) -> dict[str, str]:
    """The kohya `ss_*` and ModelSpec metadata of a LoRA run's files, every family; SD3/FLUX
    name their released variant from the transformer's config."""
    optim, family = config.optim, components.family
    return lora_metadata(
        settings=lora, base_model=str(config.model.pretrained_model_name_or_path),
        trigger_phrase=trigger_phrase, output_name=output_name,
        resolution=config.data.resolution, prediction_type=components.prediction_type,
        training_steps=training_steps, learning_rate=optim.learning_rate,
        text_encoder_lr=(optim.text_encoder_lr or optim.learning_rate)
        if optim.train_text_encoder else None,
        num_train_images=num_train_images, tag_frequency=tag_frequency(captions),
        family=family, variant=transformer_variant(family, components.transformer.config)
        if is_flow_matching(family) else None)


def save_flow_outputs(config: TrainConfig, components, module, lora, output_dir: Path, *,
                      metadata: dict[str, str] | None = None, output_name: str = "") -> None:
    """An SD 3.x / FLUX.1 run's model: the pipeline folder, or its two LoRA files (diffusers
    and kohya layouts, both with `metadata`, the kohya one named `{output_name}.safetensors`)."""
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = (torch.float32 if config.checkpoint.upcast_before_saving
             else half.get(config.optim.mixed_precision, torch.float32))
    if lora is None:
        trained = {"transformer": components.transformer}
        if config.optim.train_text_encoder:
            trained.update({name: getattr(components, name) for name in module.clip_names})
        save_flow_pipeline(components, trained, output_dir, config_yaml=dump_yaml(config),
                           dtype=dtype)
        log.info("trained pipeline saved to %s", output_dir)
        return
    paths = save_flow_lora(output_dir, components.family, components.transformer,
                           module.text_encoders, settings=lora, dtype=dtype,
                           text_encoder_names=module.clip_names, metadata=metadata or {},
                           output_name=output_name or default_output_name(output_dir))
    write_run_files(output_dir, dump_yaml(config))
    log.info("LoRA weights saved: %s", ", ".join(map(str, paths)))


def check_family_options(config: TrainConfig, components) -> FlowSettings | None:
    """The flow-matching settings of an SD 3.x / FLUX.1 run (the family's defaults where a key
    is unset), None for the UNet families; options that do not apply to the model are refused
    with what to do instead."""
    flat = config.to_flat_dict()
    family = components.family
    if not components.is_flow_matching:
        given = [key for key in FLOW_KEYS if flat[key] is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to SD 3.x and FLUX.1 models only; "
                             f"this is an {family.upper()} model: drop them")
        return None
    refused = {
        "snr_gamma": "Min-SNR weighting is for noise prediction; use --weighting_scheme",
        "offset_noise": "offset noise is for noise prediction; drop --offset_noise",
        "validation_data_dir": "the held-out loss is written for the UNet families; drop "
                               "--validation_data_dir (use --validation_prompt)",
    }
    problems = [f"{key} does not apply to {family} models: {why}"
                for key, why in refused.items() if flat[key]]
    if flat["lora_unet_target_modules"] != "to_k,to_q,to_v,to_out.0":
        problems.append(f"lora_unet_target_modules names UNet modules; for {family} models "
                        "pass --lora_layers (e.g. 'attn.to_k,attn.to_q,attn.to_v,attn.to_out.0')")
    if problems:
        raise ValueError("; ".join(problems))
    spec = family_module(family)
    scheme = flat["weighting_scheme"] or spec.WEIGHTING_SCHEME
    precondition = flat["precondition_outputs"]
    guidance = flat["guidance_scale"]
    if guidance is not None and not components.transformer.config.get("guidance_embeds"):
        log.warning("guidance_scale=%s is not used: this transformer has no guidance input "
                    "(only guidance-distilled models such as FLUX.1-dev do)", guidance)
    return FlowSettings(
        weighting_scheme=scheme, logit_mean=flat["logit_mean"], logit_std=flat["logit_std"],
        mode_scale=flat["mode_scale"],
        precondition_outputs=spec.PRECONDITION_OUTPUTS if precondition is None else precondition,
        guidance_scale=3.5 if guidance is None else guidance,
        max_sequence_length=flat["max_sequence_length"] or spec.DEFAULT_MAX_SEQUENCE_LENGTH)


def native_resolution(components) -> int | None:
    """The image side a model was trained at (None where its config does not say: FLUX.1)."""
    config = components.denoiser.config
    if config.get("sample_size") is None:
        return None
    return config.sample_size * components.vae_scale_factor


def check_resolution(resolution: int, components) -> None:
    """Refuse a resolution far beyond the model's own (memory grows with its square): at most
    twice the size the model was trained at, and for SD 3.x what its position embedding spans."""
    unit = 2 * components.vae_scale_factor
    if components.is_flow_matching and resolution % unit:
        raise ValueError(f"resolution={resolution}: {components.family} latents go to the "
                         f"transformer in 2x2 patches, so the side must be a multiple of {unit} "
                         f"(VAE factor {components.vae_scale_factor} x 2), e.g. "
                         f"{unit * max(1, round(resolution / unit))}")
    if components.is_flow_matching:
        limit = family_module(components.family).max_resolution(components.transformer,
                                                                 components.vae_scale_factor)
        if limit is not None and resolution > limit:
            raise ValueError(f"resolution={resolution} is more than this {components.family} "
                             f"transformer's position embedding spans ({limit} px); use at most "
                             f"{limit}")
    native = native_resolution(components)
    if native is None:
        return
    if resolution > 2 * native:
        raise ValueError(f"resolution={resolution} is more than twice the {native} px this "
                         f"{components.family.upper()} model was trained at; use at most "
                         f"{2 * native} (usually {native})")


def check_bucket_steps(config: TrainConfig, components) -> None:
    """Bucket sides must keep latents divisible by the UNet's downsampling: a multiple of the
    VAE factor x 2^(UNet down blocks - 1) (8 x 8 = 64 for SD 1.x/2.x, 8 x 4 = 32 for SDXL)."""
    if not config.data.aspect_buckets:
        return
    if components.is_flow_matching:  # latents in 2x2 patches
        unit = components.vae_scale_factor * 2
    else:
        unit = components.vae_scale_factor * 2 ** (
            len(components.unet.config.block_out_channels) - 1)
    steps = config.data.bucket_reso_steps
    if steps % unit:
        raise ValueError(f"bucket_reso_steps={steps} would give latents this "
                         f"{components.family.upper()} UNet cannot downsample evenly: use a "
                         f"multiple of {unit} (VAE factor {components.vae_scale_factor} x UNet "
                         f"downsampling {unit // components.vae_scale_factor}), e.g. "
                         f"bucket_reso_steps={unit * max(1, steps // unit)}")


def lora_settings(config: TrainConfig, family: str = "sd1") -> LoraSettings | None:
    """The LoRA adapters of a run; for SD 3.x / FLUX.1 the transformer's targets are
    `lora_layers` (else diffusers' list for the family), within `lora_blocks` if given."""
    adapter = config.adapter
    if not adapter.use_lora:
        return None
    def split(text: str) -> tuple[str, ...]:
        return tuple(name.strip() for name in text.split(",") if name.strip())

    targets = split(adapter.lora_unet_target_modules)
    if is_flow_matching(family):
        spec = family_module(family)
        targets = split(adapter.lora_layers) if adapter.lora_layers else spec.LORA_TARGETS
        if adapter.lora_blocks:
            targets = tuple(f"{spec.LORA_BLOCKS}.{int(block)}.{module}"
                            for block in split(adapter.lora_blocks) for module in targets)
    return LoraSettings(rank=adapter.rank, alpha=adapter.lora_alpha or float(adapter.rank),
                        dropout=adapter.lora_dropout, use_dora=adapter.use_dora,
                        unet_target_modules=targets,
                        text_encoder_target_modules=split(adapter.lora_text_encoder_target_modules))
