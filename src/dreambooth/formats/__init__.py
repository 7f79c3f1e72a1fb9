"""The files the ecosystem loads: reading single-file checkpoints, writing every format.

- `single_file`: read A1111/ComfyUI single-file checkpoints into diffusers folders (offline);
- `ldm_keys`: diffusers <-> CompVis (LDM) key names;
- `lora_files`: the LoRA files (diffusers/peft and kohya layouts), their metadata and resolver;
- `export`: `dreambooth export` and the trained pipeline folder;
- `infotext`: AUTOMATIC1111's `parameters` text in PNGs.
"""
