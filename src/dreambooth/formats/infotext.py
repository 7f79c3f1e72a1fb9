"""AUTOMATIC1111's `parameters` text: how an image was made, in a PNG text chunk.

The first lines are the prompt, then `Negative prompt: ...` when there is one, then one line
of `key: value` fields (`Steps`, `Sampler`, `CFG scale`, `Seed`, `Size`, `Model`, ...) that
A1111's "PNG Info" and other tools read back.
"""

from __future__ import annotations

import json
import re


def _quote(value: str) -> str:
    # A1111 quotes values that would break the "key: value, ..." line.
    return json.dumps(value) if any(c in value for c in ",:\n\"") else value


def format_parameters(
    *, prompt: str, negative_prompt: str, steps: int, sampler: str, cfg_scale: float, seed: int,
    width: int, height: int, model_name: str, extra: dict[str, object] | None = None,
) -> str:
    """The AUTOMATIC1111 `parameters` text for one image; `extra` fields (e.g. "Lora",
    "Denoising strength") follow the standard ones."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = {
        "Steps": steps, "Sampler": sampler, "CFG scale": float(cfg_scale), "Seed": seed,
        "Size": f"{width}x{height}", "Model": model_name, **(extra or {}),
    }
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in fields.items()))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """Read `format_parameters` (or A1111) text back: prompt, negative_prompt and every field."""
    *head, last = text.strip("\n").split("\n")
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in head:
        if negative_lines:
            negative_lines.append(line)
        elif line.startswith("Negative prompt:"):
            negative_lines.append(line.removeprefix("Negative prompt:").lstrip())
        else:
            prompt_lines.append(line)
    result = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    for key, value in _FIELD.findall(last):
        result[key] = json.loads(value) if value.startswith('"') else value.strip()
    return result
