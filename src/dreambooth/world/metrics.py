"""The world evaluator and DreamBench-mini's metrics (the paper's DINO, CLIP-T, PRES and DIV).

DreamBooth (Ruiz et al. 2023, sec. 4.1) scores generations with pretrained encoders that cannot
run here (DINO ViT-S/16, CLIP, LPIPS' VGG). For the project's world a small CNN trained on fresh
renders (`evaluator_model.WorldEncoder`) plays their parts:

| paper | here | what it measures |
| --- | --- | --- |
| DINO (subject fidelity) | `subject_fidelity`: mean pairwise cosine similarity of identity embeddings, generated vs reference | is it the same individual object? |
| CLIP-T (prompt fidelity) | `prompt_fidelity`: share of generations whose predicted class, color and background are those the prompt asks for | does the image follow the prompt? |
| PRES (lower is better) | `pres`: `subject_fidelity` of "a [class]" generations against the subject's photos | has the class collapsed onto the subject? |
| DIV (higher is better) | `div`: mean pairwise LPIPS-style distance between same-prompt generations, on the evaluator's own feature maps | are generations varied? |

The identity embedding is trained on random individuals (never the DreamBench-mini subjects),
so the metrics work for any reference images of the world, not only known subjects.

Train and ship the evaluator with `python -m dreambooth.evaluate --train-evaluator`
(a few minutes on 2 CPU threads); check it with `python -m dreambooth.evaluate --held-out-accuracy`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from dreambooth.world.evaluator import HEADS, EvaluatorConfig, WorldEncoder, supervised_contrastive_loss
from dreambooth.files import atomic_path, atomic_write_text
from dreambooth.world import (BACKGROUNDS, CONFLICTS, IMAGE_SIZE, PLAIN, SUBJECT_LOOKS, Look, Scene,
                    all_combinations, parse_prompt, render, sample_look, sample_pose,
                    sample_scene, scene_rng)

log = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).parent.parent / "assets" / "world_evaluator"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
HELD_OUT_SEED = 20_250_001  # the held-out render set; training streams use other seeds
ATTRIBUTES = ("cls", "color", "background")  # what captions say and prompt fidelity checks

ImageLike = Image.Image | np.ndarray


# ------------------------------------------------------------------------- the evaluator
def images_to_tensor(images: Sequence[ImageLike] | np.ndarray) -> torch.Tensor:
    """PIL images or uint8 arrays (H, W, 3) -> (B, 3, 64, 64) float in [-1, 1].

    Images of another size are resized (bicubic) to the world's 64x64.
    """
    arrays = []
    for image in images:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        arrays.append(np.asarray(image))
    if not arrays:
        raise ValueError("no images given")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


class WorldEvaluator:
    """A trained `WorldEncoder` in eval mode, with attribute prediction and embeddings."""

    def __init__(self, model: WorldEncoder, batch_size: int = 256):
        self.model = model.eval()
        self.config = model.config
        self.batch_size = batch_size

    @torch.no_grad()
    def _outputs(self, images) -> dict[str, torch.Tensor]:
        pixels = images_to_tensor(images)
        chunks = [self.model(pixels[i:i + self.batch_size])
                  for i in range(0, len(pixels), self.batch_size)]
        return {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}

    def embed(self, images) -> torch.Tensor:
        """(N, D) unit identity embeddings."""
        return self._outputs(images)["embedding"]

    def predict(self, images) -> list[dict[str, str]]:
        """Per image: {"cls", "color", "background", "pattern"} predicted names."""
        outputs = self._outputs(images)
        indices = {head: outputs[head].argmax(1).tolist() for head in HEADS}
        return [{head: self.config.labels[head][indices[head][i]] for head in HEADS}
                for i in range(len(indices["cls"]))]

    @torch.no_grad()
    def feature_maps(self, images) -> list[torch.Tensor]:
        return self.model.feature_maps(images_to_tensor(images))


def load_evaluator(path: str | Path = ASSET_DIR) -> WorldEvaluator:
    """The shipped evaluator (or one saved by `train_evaluator` at `path`)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"no world evaluator in '{path}' (needs {WEIGHTS_FILE} and {CONFIG_FILE}); train "
            "one with `python -m dreambooth.world.metrics --train-evaluator`")
    saved = json.loads((path / CONFIG_FILE).read_text())
    return _evaluator_from_state(EvaluatorConfig.from_dict(saved["model"]),
                                 load_file(path / WEIGHTS_FILE))


def _evaluator_from_state(config: EvaluatorConfig, state: dict) -> WorldEvaluator:
    model = WorldEncoder(config)
    model.load_state_dict({key: value.float() if value.is_floating_point() else value
                           for key, value in state.items()})
    return WorldEvaluator(model)


_DEFAULT: WorldEvaluator | None = None


def _evaluator(evaluator: WorldEvaluator | None) -> WorldEvaluator:
    global _DEFAULT  # a cache of the shipped weights only; never changes results
    if evaluator is not None:
        return evaluator
    if _DEFAULT is None:
        _DEFAULT = load_evaluator()
    return _DEFAULT


# --------------------------------------------------------------------------- the metrics
def subject_fidelity(generated, reference, evaluator: WorldEvaluator | None = None) -> float:
    """Mirrors DINO: mean cosine similarity over every (generated, reference) pair of identity
    embeddings. Higher is better; photos of one object score high whatever their backgrounds."""
    evaluator = _evaluator(evaluator)
    return float((evaluator.embed(generated) @ evaluator.embed(reference).T).mean())


def pres(class_generations, reference, evaluator: WorldEvaluator | None = None) -> float:
    """Mirrors PRES (prior preservation): `subject_fidelity` of the generations for the bare
    class prompt ("a ball") against the subject's photos. Lower is better: a high value means
    every member of the class now looks like the subject (language drift, prior collapse)."""
    return subject_fidelity(class_generations, reference, evaluator)


def _expected_attributes(prompts_or_attrs, count: int) -> list[Mapping[str, str]]:
    if isinstance(prompts_or_attrs, (str, Mapping)):
        prompts_or_attrs = [prompts_or_attrs] * count
    expected = [parse_prompt(item) if isinstance(item, str) else dict(item)
                for item in prompts_or_attrs]
    if len(expected) != count:
        raise ValueError(f"prompt_fidelity: {count} images but {len(expected)} prompts; give "
                         "one prompt (or attribute dict) per image, or a single one for all")
    for item in expected:
        unknown = set(item) - set(HEADS)
        if unknown:
            raise ValueError(f"prompt_fidelity: unknown attribute keys {sorted(unknown)}; "
                             f"use {HEADS}")
    return expected


def attribute_matches(generated, prompts_or_attrs,
                      evaluator: WorldEvaluator | None = None) -> list[dict[str, bool]]:
    """Per image, whether each attribute the prompt states was rendered, e.g.
    {"cls": True, "background": False} for "a sks ball on the grass"."""
    predictions = _evaluator(evaluator).predict(generated)
    expected = _expected_attributes(prompts_or_attrs, len(predictions))
    return [{key: predicted[key] == value for key, value in asked.items()}
            for predicted, asked in zip(predictions, expected)]


def prompt_fidelity(generated, prompts_or_attrs, evaluator: WorldEvaluator | None = None) -> float:
    """Mirrors CLIP-T: the share of generations showing everything their prompt asks for
    (class, color and background where stated). Higher is better; 1.0 is perfect.

    `prompts_or_attrs`: one prompt or attribute dict for all images, or one per image; prompts
    are read with `world.parse_prompt` ("a red sks ball" asks for a red ball).
    """
    matches = attribute_matches(generated, prompts_or_attrs, evaluator)
    return float(np.mean([all(match.values()) for match in matches]))


def perceptual_distance(a, b, evaluator: WorldEvaluator | None = None) -> torch.Tensor:
    """LPIPS-style distance (Zhang et al. 2018, eq. 1 with uniform weights) between images a[i]
    and b[i]: channel-normalized feature maps of each stage, squared difference averaged over
    positions, then over stages; in [0, 1] (ReLU features, so unit vectors differ by <= 2)."""
    evaluator = _evaluator(evaluator)
    distances = []
    for fa, fb in zip(evaluator.feature_maps(a), evaluator.feature_maps(b)):
        fa, fb = F.normalize(fa, dim=1), F.normalize(fb, dim=1)  # (N, C, h, w)
        distances.append(((fa - fb) ** 2).sum(1).mean(dim=(1, 2)) / 2)
    return torch.stack(distances).mean(0)  # (N,)


def div(same_prompt_groups: Iterable[Sequence[ImageLike]],
        evaluator: WorldEvaluator | None = None) -> float:
    """Mirrors DIV: mean pairwise perceptual distance (LPIPS in the paper) between generations of
    the same prompt, averaged over groups. Higher is better; identical images give 0."""
    evaluator = _evaluator(evaluator)
    group_means = []
    for group in same_prompt_groups:
        group = list(group)
        if len(group) < 2:
            raise ValueError("div: every group needs at least 2 images of the same prompt")
        pairs = list(itertools.combinations(range(len(group)), 2))
        first = [group[i] for i, _ in pairs]
        second = [group[j] for _, j in pairs]
        group_means.append(float(perceptual_distance(first, second, evaluator).mean()))
    if not group_means:
        raise ValueError("div: no groups given")
    return float(np.mean(group_means))


# ----------------------------------------------------------------------------- accuracy
def held_out_scenes(n: int, seed: int = HELD_OUT_SEED) -> list[Scene]:
    """A render set the evaluator never trained on: every (class, color, background) triple
    (held-out ones included), 30% of objects with a random look."""
    combinations = tuple(all_combinations())
    return [sample_scene(scene_rng(seed, index), combinations=combinations)
            for index in range(n)]


def held_out_accuracy(evaluator: WorldEvaluator | None = None, n: int = 2000,
                      seed: int = HELD_OUT_SEED) -> dict[str, float]:
    """Accuracy per attribute (and for all three at once) on `n` fresh renders."""
    scenes = held_out_scenes(n, seed)
    predictions = _evaluator(evaluator).predict([render(scene) for scene in scenes])
    result = {}
    for attribute in ATTRIBUTES:
        result[attribute] = float(np.mean([p[attribute] == getattr(s, attribute)
                                           for p, s in zip(predictions, scenes)]))
    result["all"] = float(np.mean([all(p[a] == getattr(s, a) for a in ATTRIBUTES)
                                   for p, s in zip(predictions, scenes)]))
    result["pattern"] = float(np.mean([p["pattern"] == s.look.pattern
                                       for p, s in zip(predictions, scenes)]))
    return result


# ----------------------------------------------------------------------------- training
@dataclass
class EvaluatorTrainConfig:
    """How the shipped evaluator is trained (saved beside its weights)."""

    num_pairs: int = 6000  # objects rendered twice (different pose, background, light)
    epochs: int = 8
    batch_pairs: int = 32  # objects per batch (2 renders each)
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1  # SupCon temperature
    plain_probability: float = 0.35  # share of plain objects (the rest get a random look)
    class_loss_weight: float = 2.0  # shape is learned last (pale balls pass for boxes): favour it
    seed: int = 0


def _training_pair(rng: np.random.Generator, plain_probability: float) -> tuple[Scene, Scene]:
    """One object rendered twice: same class, color and look; new pose, background, light.

    Proportions range wider than the base model's stream (0.5-2x) so the embedding also
    separates stretched subjects; the DreamBench-mini subjects' looks are never drawn.
    """
    combinations = all_combinations()
    cls, color, _ = combinations[int(rng.integers(len(combinations)))]
    look = PLAIN
    if rng.random() >= plain_probability:
        while look is PLAIN or (cls, color, Look(look.pattern, look.accent)) in SUBJECT_LOOKS:
            look = _wide_look(rng, color)
    backgrounds = [b for b in BACKGROUNDS if (color, b) not in CONFLICTS]
    first, second = rng.choice(len(backgrounds), size=2, replace=False)
    return (Scene(cls, color, backgrounds[first], look=look, **sample_pose(rng)),
            Scene(cls, color, backgrounds[second], look=look, **sample_pose(rng)))


def _wide_look(rng: np.random.Generator, color: str) -> Look:
    look = sample_look(rng, color)
    aspect = float(np.exp(rng.uniform(-0.7, 0.7))) if rng.random() < 0.4 else 1.0
    return Look(look.pattern, look.accent, round(aspect, 3))


def _degrade(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Mild blur and noise (half the time each), as a generative model's images have."""
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    array = np.asarray(image, dtype=np.float64)
    if rng.random() < 0.5:
        array = array + rng.normal(0, rng.uniform(1, 8), size=array.shape)
    return np.clip(array, 0, 255).round().astype(np.uint8)


def render_training_set(config: EvaluatorTrainConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(2P, 64, 64, 3) uint8 images (pairs adjacent) and their labels (incl. "identity")."""
    label_names = EvaluatorConfig().labels
    images, labels = [], {head: [] for head in (*HEADS, "identity")}
    identities: dict[tuple, int] = {}
    for index in range(config.num_pairs):
        rng = scene_rng(config.seed, 5, index)
        for scene in _training_pair(rng, config.plain_probability):
            images.append(_degrade(render(scene), rng))
            labels["cls"].append(label_names["cls"].index(scene.cls))
            labels["color"].append(label_names["color"].index(scene.color))
            labels["background"].append(label_names["background"].index(scene.background))
            labels["pattern"].append(label_names["pattern"].index(scene.look.pattern))
            key = (scene.cls, scene.color, scene.look)
            labels["identity"].append(identities.setdefault(key, len(identities)))
    return np.stack(images), {key: np.array(value) for key, value in labels.items()}


def train_evaluator(output_dir: str | Path = ASSET_DIR,
                    config: EvaluatorTrainConfig | None = None) -> dict[str, float]:
    """Train the evaluator on fresh renders, save it (fp16 safetensors + JSON) in `output_dir`,
    and return its held-out accuracy (with the training time in seconds)."""
    from safetensors.torch import save_file

    config = config or EvaluatorTrainConfig()
    start = time.perf_counter()
    torch.manual_seed(config.seed)  # initial weights; everything else takes explicit generators
    images, labels = render_training_set(config)
    log.info("rendered %d training images in %.0f s", len(images), time.perf_counter() - start)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (2P, 3, 64, 64) uint8
    targets = {key: torch.from_numpy(value) for key, value in labels.items()}

    model = WorldEncoder(EvaluatorConfig())
    steps_per_epoch = config.num_pairs // config.batch_pairs
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate,
                                                    total_steps=total_steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(config.num_pairs, generator=generator)
        for step in range(steps_per_epoch):
            pair_ids = order[step * config.batch_pairs:(step + 1) * config.batch_pairs]
            rows = torch.stack([2 * pair_ids, 2 * pair_ids + 1], dim=1).flatten()  # pairs kept
            batch = pixels[rows].float() / 127.5 - 1.0
            flip = torch.rand(len(rows), generator=generator) < 0.5  # mirror: same object
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            outputs = model(batch)
            losses = {head: F.cross_entropy(outputs[head], targets[head][rows]) for head in HEADS}
            losses["cls"] = config.class_loss_weight * losses["cls"]
            losses["identity"] = supervised_contrastive_loss(
                outputs["embedding"], targets["identity"][rows], config.temperature)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        log.info("epoch %d/%d: loss %.3f (%s) %.0f s", epoch + 1, config.epochs, loss.item(),
                 ", ".join(f"{k} {v.item():.3f}" for k, v in losses.items()),
                 time.perf_counter() - start)
    train_seconds = time.perf_counter() - start

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.half().contiguous() if value.is_floating_point() else value
             for key, value in model.state_dict().items()}
    with atomic_path(output_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    # Measured with the fp16 weights actually shipped.
    accuracy = held_out_accuracy(_evaluator_from_state(model.config, state))
    report = {"model": model.config.to_dict(), "training": vars(config),
              "held_out_accuracy": accuracy, "held_out_renders": 2000,
              "train_seconds": round(train_seconds, 1), "torch_threads": torch.get_num_threads()}
    atomic_write_text(output_dir / CONFIG_FILE, json.dumps(report, indent=2) + "\n")
    return {**accuracy, "train_seconds": train_seconds}


# ---------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreambooth.world.metrics",
                                     description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--train-evaluator", action="store_true",
                        help="Train the world evaluator on fresh renders and save it.")
    action.add_argument("--held-out-accuracy", action="store_true",
                        help="Accuracy of a saved evaluator on a fresh held-out render set.")
    parser.add_argument("--output-dir", default=str(ASSET_DIR),
                        help="Evaluator folder (default: the package's shipped one).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    defaults = EvaluatorTrainConfig()
    parser.add_argument("--num-pairs", type=int, default=defaults.num_pairs,
                        help="Objects rendered twice for training.")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_evaluator:
        result = train_evaluator(args.output_dir, EvaluatorTrainConfig(
            num_pairs=args.num_pairs, epochs=args.epochs, seed=args.seed))
    else:
        result = held_out_accuracy(load_evaluator(args.output_dir))
    print(json.dumps({key: round(value, 4) for key, value in result.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
