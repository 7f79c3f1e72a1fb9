"""`dreambooth eval`: the paper's evaluation (sec. 4.1) of any model against reference photos.

For a personalized model and the subject's reference photos it generates a DreamBench-style
prompt set (recontextualization "a sks ball on the grass" and property modification "a red sks
ball", `images_per_prompt` seeds each) and "a [class noun]" images, then scores them with the
world evaluator's metrics (dreambooth.world.metrics): subject fidelity (DINO-like), prompt
fidelity (CLIP-T-like), PRES and DIV. It writes `metrics.json`, one grid per prompt and
`report.html`.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from dreambooth import seeding
from dreambooth.files import atomic_write_text
from dreambooth.generate import sample_images
from dreambooth.images import load_image_folder, make_grid, pil_to_tensor, save_png, tensor_to_pil
from dreambooth.models import WORLD_MODEL_GUIDANCE_SCALE, default_guidance_scale, load_pipeline
from dreambooth.prompts import read_prompt_file
from dreambooth.world import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    COLORS,
    CONFLICTS,
    held_out_captions,
    metrics,
    parse_prompt,
    render,
)
from dreambooth.world.evaluator import load_evaluator
from dreambooth.world.render import article


@dataclass
class EvaluationResult:
    subject_fidelity: float
    prompt_fidelity: float
    pres: float
    div: float
    num_prompts: int
    images_per_prompt: int
    # subject_fidelity over each kind of prompt (None: the set has none of that kind):
    # recontextualization asks for a background ("a sks ball on the grass"), property
    # modification for another color ("a red sks ball"), which the identity embedding reads as
    # another object (a perfect red polka ball scores about 0.3 against the blue one's photos).
    recontextualization_subject_fidelity: float | None = None
    property_subject_fidelity: float | None = None
    recontextualization_prompt_fidelity: float | None = None
    property_prompt_fidelity: float | None = None


PROMPT_KINDS = ("recontextualization", "property")


def prompt_kind(prompt: str) -> str:
    """"property" if the prompt asks for a body color, else "recontextualization"."""
    return "property" if "color" in parse_prompt(prompt) else "recontextualization"


SAMPLE_BATCH_SIZE = 8  # images a denoising batch (x2 with guidance): on 2 CPU cores 8 image/s
# ran 15% faster than 4 and as fast as 32 (BENCHMARKS.md)


def sample_prompt_set(pipeline, prompts: list[str], seeds: list[int], *, batch_size: int,
                      num_inference_steps: int, guidance_scale: float,
                      desc: str | None = None) -> list[list[Image.Image]]:
    """Image `seed` of every prompt, for all prompts; batches span prompts (each image depends
    only on its prompt and seed, see dreambooth.generate), so the UNet runs full batches."""
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    images: list[Image.Image] = []
    starts = range(0, len(jobs), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None):
        chunk = jobs[start:start + batch_size]
        images += sample_images(pipeline, [prompt for prompt, _ in chunk],
                                seeds=[seed for _, seed in chunk], batch_size=len(chunk),
                                num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale)
    return [images[i:i + len(seeds)] for i in range(0, len(images), len(seeds))]


def default_prompts(identifier: str, class_noun: str) -> list[str]:
    """DreamBench-style prompts in the world's vocabulary: one per background, one per color."""
    noun = f"{identifier} {class_noun}"
    prompts = [f"a {noun} {BACKGROUND_PHRASES[name]}" for name in BACKGROUNDS]
    prompts += [f"{article(color)} {color} {noun}" for color in COLORS]
    return prompts


def held_out_quality(model, *, images_per_prompt: int = 4, num_inference_steps: int = 25,
                     guidance_scale: float = WORLD_MODEL_GUIDANCE_SCALE, seed: int = 0,
                     device: str | None = None, limit: int | None = None,
                     grid_path: str | Path | None = None,
                     captions: list[str] | None = None) -> dict[str, float]:
    """How well a base model of the world draws caption combinations it never saw in training
    (`world.HELD_OUT_COMBINATIONS`, e.g. "a green ball on a blue background"), as the world
    evaluator judges: the share of images with the asked class, color and background, each and
    all three (`all`). `limit` takes the first N combinations (sorted) for a quicker check;
    `captions` scores others instead (e.g. training combinations, to pick settings on)."""
    pipeline = load_pipeline(model, device=device) if isinstance(model, (str, Path)) else model
    prompts = (captions if captions is not None else held_out_captions())[:limit]
    seeds = [seed + offset for offset in range(images_per_prompt)]
    groups = sample_prompt_set(pipeline, prompts, seeds, batch_size=SAMPLE_BATCH_SIZE,
                               num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale)
    images = [image for group in groups for image in group]
    per_image_prompts = [prompt for prompt in prompts for _ in seeds]
    matches = metrics.attribute_matches(images, per_image_prompts)
    if grid_path is not None:
        save_png(make_grid(images, columns=2 * images_per_prompt), grid_path,
                 text={"prompts": "; ".join(prompts), "seeds": ",".join(map(str, seeds))})
    quality = {key: sum(match[key] for match in matches) / len(matches)
               for key in ("cls", "color", "background")}
    quality["all"] = sum(all(match.values()) for match in matches) / len(matches)
    return {**quality, "num_prompts": len(prompts), "images_per_prompt": images_per_prompt}


@torch.no_grad()
def vae_round_trip(vae, images: list[Image.Image]) -> list[Image.Image]:
    """`images` encoded (posterior mean) and decoded by a model's VAE: what any generation of
    that model can show at best, so their subject fidelity is the model's ceiling."""
    parameter = next(vae.parameters())
    pixels = torch.stack([pil_to_tensor(image.convert("RGB")) for image in images])
    latents = vae.encode(pixels.to(parameter)).latent_dist.mean
    return [tensor_to_pil(image) for image in vae.decode(latents).sample]


def prompt_set_ceiling(vae, subject, prompts: list[str], references: list[Image.Image], *,
                       photos_per_prompt: int = 4, evaluator=None) -> dict[str, float]:
    """What a perfect model of `subject` would score on `prompts`: for each prompt, new renders
    of the subject as the prompt asks (its background, or its color with the look kept) through
    `vae`, scored against `references` like generations. The mean over all prompts
    ("subject_fidelity") is the ceiling of `evaluate_model`'s figure; per kind, of
    recontextualization and property modification prompts."""
    from dreambooth.world.subjects import subject_scenes

    evaluator = evaluator or load_evaluator()
    scenes = subject_scenes(subject, photos_per_prompt, seed=seeding.HELD_OUT_PHOTOS)
    renders = []
    for prompt in prompts:
        asked = parse_prompt(prompt)
        for scene in scenes:
            color = asked.get("color", scene.color)
            background = asked.get("background", scene.background)
            if (color, background) in CONFLICTS:
                background = "gray"
            renders.append(render(replace(scene, color=color, background=background)))
    round_trips = vae_round_trip(vae, renders)
    scores = {prompt: metrics.subject_fidelity(
        round_trips[index * len(scenes):(index + 1) * len(scenes)], references, evaluator)
        for index, prompt in enumerate(prompts)}
    ceiling = {"subject_fidelity": sum(scores.values()) / len(scores)}
    for kind in PROMPT_KINDS:
        values = [score for prompt, score in scores.items() if prompt_kind(prompt) == kind]
        ceiling[f"{kind}_subject_fidelity"] = sum(values) / len(values) if values else None
    return ceiling


def subject_ceilings(vae, subject, photos: list[Image.Image], prompts: list[str], *,
                     evaluator=None) -> dict:
    """What `vae` lets a model show of `subject`: its training `photos` through the VAE scored
    against themselves ("vae_subject_fidelity") and `prompt_set_ceiling` ("ceiling")."""
    evaluator = evaluator or load_evaluator()
    return {"vae_subject_fidelity": metrics.subject_fidelity(vae_round_trip(vae, photos), photos,
                                                             evaluator),
            "ceiling": prompt_set_ceiling(vae, subject, prompts, photos, evaluator=evaluator)}


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with '#' are skipped."""
    return read_prompt_file(path, flag="--prompts")


def evaluate_model(model, reference_dir: str | Path, *, identifier: str = "sks", class_noun: str,
                   output_dir: str | Path, prompts: list[str] | None = None,
                   images_per_prompt: int = 4, num_inference_steps: int = 25,
                   guidance_scale: float | None = None, seed: int = 0,
                   device: str | None = None,
                   batch_size: int = SAMPLE_BATCH_SIZE) -> EvaluationResult:
    """Generate the prompt set with `model` and score it against the photos in `reference_dir`
    (`guidance_scale` None: the model's own, `models.default_guidance_scale`).

    Args:
        model: A training output_dir or pipeline.
        reference_dir: The subject's photos.
        identifier: The rare word bound to the subject.
        class_noun: e.g. star, ball, dog.
        output_dir: Folder for metrics.json, the grids and report.html.
        prompts: Prompts to generate (on the command line a file with one prompt a line;
            default: DreamBench-style set).
        images_per_prompt: Images per prompt (DIV needs at least 2).
        num_inference_steps: Denoising steps.
        guidance_scale: Default: the model's own (3 for the world model), else 7.5.
        seed: Image i of every prompt uses seed + i.
        device: cuda, cpu, ... (default: cuda if available).
        batch_size: Images per denoising batch, across prompts (lower it if memory runs out).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if guidance_scale is None:
        guidance_scale = default_guidance_scale(model)
    if images_per_prompt < 2:
        raise ValueError(f"images_per_prompt={images_per_prompt}: DIV needs at least 2")
    references = [image for _, image in load_image_folder(reference_dir, role="reference")]
    prompts = prompts or default_prompts(identifier, class_noun)
    pipeline = load_pipeline(model, device=device) if isinstance(model, (str, Path)) else model
    output_dir = Path(output_dir)
    seeds = [seed + offset for offset in range(images_per_prompt)]

    class_prompt = f"{article(class_noun)} {class_noun}"
    *prompt_images, class_images = sample_prompt_set(
        pipeline, [*prompts, class_prompt], seeds, batch_size=batch_size,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        desc=f"evaluating {output_dir.name}")
    groups = dict(zip(prompts, prompt_images))
    generated = [image for images in groups.values() for image in images]
    per_image_prompts = [prompt for prompt, images in groups.items() for _ in images]
    evaluator = load_evaluator()
    by_kind = {}  # the same two metrics over each kind of prompt (None: the set has none)
    for kind in PROMPT_KINDS:
        images = [image for prompt, group in groups.items() if prompt_kind(prompt) == kind
                  for image in group]
        asked = [prompt for prompt in per_image_prompts if prompt_kind(prompt) == kind]
        by_kind[f"{kind}_subject_fidelity"] = (
            metrics.subject_fidelity(images, references, evaluator) if images else None)
        by_kind[f"{kind}_prompt_fidelity"] = (
            metrics.prompt_fidelity(images, asked, evaluator) if images else None)
    result = EvaluationResult(
        subject_fidelity=metrics.subject_fidelity(generated, references, evaluator),
        prompt_fidelity=metrics.prompt_fidelity(generated, per_image_prompts, evaluator),
        pres=metrics.pres(class_images, references, evaluator),
        div=metrics.div(list(groups.values()), evaluator),
        num_prompts=len(prompts), images_per_prompt=images_per_prompt, **by_kind)

    grids = {"references": save_png(make_grid(references), output_dir / "references.png"),
             "class": save_png(make_grid(class_images), output_dir / "class-prompt.png",
                               text={"prompt": f"{article(class_noun)} {class_noun}"})}
    for index, (prompt, images) in enumerate(groups.items()):
        grids[prompt] = save_png(make_grid(images, columns=len(images)),
                                 output_dir / "prompts" / f"{index:03d}.png",
                                 text={"prompt": prompt, "seeds": ",".join(map(str, seeds))})
    atomic_write_text(output_dir / "metrics.json", json.dumps(asdict(result), indent=2) + "\n")
    atomic_write_text(output_dir / "report.html", _report(result, grids, output_dir))
    return result


def _report(result: EvaluationResult, grids: dict[str, Path], output_dir: Path) -> str:
    rows = "".join(f"<tr><td>{html.escape(key.replace('_', ' '))}</td><td>{value:.4f}</td></tr>"
                   for key, value in asdict(result).items() if isinstance(value, float))
    figures = "".join(
        f"<figure><img src='{path.relative_to(output_dir).as_posix()}' style='image-rendering:"
        f"pixelated;height:96px'><figcaption>{html.escape(name)}</figcaption></figure>"
        for name, path in grids.items())
    return (f"<!doctype html><meta charset='utf-8'><title>DreamBooth evaluation</title>"
            f"<h1>DreamBooth evaluation</h1><table border=1><tr><th>metric</th><th>value</th></tr>"
            f"{rows}</table><p>subject fidelity ~ DINO, prompt fidelity ~ CLIP-T, PRES (lower is "
            f"better), DIV (higher is better), scored by the world evaluator.</p>{figures}\n")
