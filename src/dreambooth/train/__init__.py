"""The training engine: `train(config)` runs one DreamBooth training with Lightning.

- `run`: `train()`, wiring model, data, callbacks and loggers into a Lightning Trainer;
- `module`: `DreamBoothModule`, the loss (paper, eq. 2) and what is trained;
- `data`: instance and class images -> cached latents -> batches that depend on (seed, step);
- `callbacks`: class-image generation and validation samples;
- `ema`: the exponential moving average of the trained weights (`use_ema`);
- `checkpointing`: atomic checkpoints, resume and its compatibility check;
- `lora`: peft LoRA/DoRA adapters on the UNet (or transformer) and text encoders;
- `flow_matching`: `FlowMatchingModule`, the same loss on the rectified-flow objective for
  SD 3.x and FLUX.1; `flow_export`: the pipeline folder or diffusers LoRA file they write;
  `quantize`: their frozen base quantized with torchao (`quantize_base`).
"""

__all__ = ["train"]


def __getattr__(name: str):
    # `from dreambooth.train import train` without importing the whole engine (and run.py's
    # imports of this package's modules) whenever one of those modules is imported.
    if name == "train":
        from dreambooth.train.run import train

        return train
    raise AttributeError(f"module 'dreambooth.train' has no attribute {name!r}")
