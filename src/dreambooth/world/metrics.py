"""DreamBench-mini's metrics: the paper's DINO, CLIP-T, PRES and DIV, on the world evaluator.

DreamBooth (Ruiz et al. 2023, sec. 4.1) scores generations with pretrained encoders that cannot
run here (DINO ViT-S/16, CLIP, LPIPS' VGG). For the project's world a small CNN trained on fresh
renders (`dreambooth.world.evaluator`) plays their parts:

- DINO (subject fidelity): `subject_fidelity`, the mean cosine similarity of identity
  embeddings over every (generated, reference) pair. Is it the same individual object?
- CLIP-T (prompt fidelity): `prompt_fidelity`, the share of generations whose predicted class,
  color and background are those the prompt asks for. Does the image follow the prompt?
- PRES (lower is better): `pres`, the `subject_fidelity` of "a [class]" generations against the
  subject's photos. Has the class collapsed onto the subject?
- DIV (higher is better): `div`, the mean pairwise LPIPS-style distance between same-prompt
  generations, on the evaluator's own feature maps. Are generations varied?

Every metric takes an `evaluator` (None: the shipped one). How well the evaluator itself reads
fresh renders is `dreambooth.world.evaluator.held_out_accuracy`.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth.world import parse_prompt
from dreambooth.world.evaluator import HEADS, ImageLike, WorldEvaluator, resolve_evaluator


def subject_fidelity(generated, reference, evaluator: WorldEvaluator | None = None) -> float:
    """Mirrors DINO: mean cosine similarity over every (generated, reference) pair of identity
    embeddings. Higher is better; photos of one object score high whatever their backgrounds."""
    evaluator = resolve_evaluator(evaluator)
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
    predictions = resolve_evaluator(evaluator).predict(generated)
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


def shows_look(generated, cls: str, color: str, pattern: str,
               evaluator: WorldEvaluator | None = None) -> list[bool]:
    """Per image, the identity check a person does at a glance: is it this class and body color,
    wearing this pattern (e.g. a blue ball with spots)? The evaluator's class, color and
    pattern heads must all agree; the accent color and the proportions it does not check."""
    predictions = resolve_evaluator(evaluator).predict(generated)
    return [(p["cls"], p["color"], p["pattern"]) == (cls, color, pattern) for p in predictions]


def perceptual_distance(a, b, evaluator: WorldEvaluator | None = None) -> torch.Tensor:
    """LPIPS-style distance (Zhang et al. 2018, eq. 1 with uniform weights) between images a[i]
    and b[i]: channel-normalized feature maps of each stage, squared difference averaged over
    positions, then over stages; in [0, 1] (ReLU features, so unit vectors differ by <= 2)."""
    evaluator = resolve_evaluator(evaluator)
    distances = []
    for fa, fb in zip(evaluator.feature_maps(a), evaluator.feature_maps(b)):
        fa, fb = F.normalize(fa, dim=1), F.normalize(fb, dim=1)  # (N, C, h, w)
        distances.append(((fa - fb) ** 2).sum(1).mean(dim=(1, 2)) / 2)
    return torch.stack(distances).mean(0)  # (N,)


def div(same_prompt_groups: Iterable[Sequence[ImageLike]],
        evaluator: WorldEvaluator | None = None) -> float:
    """Mirrors DIV: mean pairwise perceptual distance (LPIPS in the paper) between generations of
    the same prompt, averaged over groups. Higher is better; identical images give 0."""
    evaluator = resolve_evaluator(evaluator)
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
