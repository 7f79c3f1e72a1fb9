"""The files the ecosystem loads: reading single-file checkpoints, writing every format.

- `checkpoint_files`: read checkpoint files safely (headers, state dicts) and the cache;
- `single_file`: read A1111/ComfyUI single-file checkpoints into diffusers folders (offline);
- `ldm_keys`: diffusers -> CompVis (LDM) key names, checked against diffusers' reader;
- `transformer_keys`: diffusers <-> original (BFL / MMDiT) names of SD3 and FLUX weights and
  LoRAs (q, k, v fused);
- `transformer_checkpoints`: SD3 / FLUX single files, written and read;
- `modelspec`: ModelSpec metadata of checkpoints and LoRAs;
- `lora_files`: the LoRA files (diffusers/peft and kohya layouts), their metadata and resolver;
- `export`: `dreambooth export`, the checked CompVis single file and the trained pipeline
  folder;
- `infotext`: AUTOMATIC1111's `parameters` text in PNGs.
"""


class ExportError(ValueError):
    """An export that cannot be done as asked; the message names the input and what to do."""
