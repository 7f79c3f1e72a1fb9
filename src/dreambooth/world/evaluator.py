"""The world evaluator: a small CNN over 64x64 renders with attribute heads and an identity
embedding (the mini-benchmark's stand-in for CLIP and DINO), how it is loaded, trained on fresh
renders and checked on held-out ones. The metrics that use it are `dreambooth.world.metrics`.

    image (B, 3, 64, 64) in [-1, 1]
      -> 4 conv stages (B, 24, 32, 32) (B, 32, 32, 32) (B, 64, 16, 16) (B, 128, 8, 8)
      -> [global mean ; global max] pooled features (B, 256)
      -> heads: class, color, background, pattern logits; embedding (B, 64), L2-normalized

The embedding is trained with a supervised contrastive loss (Khosla et al. 2020) on pairs of
renders of the same individual object in different poses, backgrounds and light, so it encodes
*which object* (class, color, pattern, accent, proportion) and not where or on what: what DINO
similarity measures for DreamBench. It is trained on random individuals (never the
DreamBench-mini subjects), so it works for any reference images of the world.

Train and ship the evaluator with `scripts/train_world_evaluator.py --train`
(a few minutes on 2 CPU threads); check it with
`scripts/train_world_evaluator.py --held_out_accuracy`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from dreambooth import seeding
from dreambooth.config import option
from dreambooth.files import atomic_path, atomic_write_text
from dreambooth.world import (
    BACKGROUNDS,
    CLASSES,
    COLORS,
    CONFLICTS,
    IMAGE_SIZE,
    PATTERNS,
    PLAIN,
    SUBJECT_LOOKS,
    Look,
    Scene,
    all_combinations,
    render,
    sample_look,
    sample_pose,
    sample_scene,
    scene_rng,
)

log = logging.getLogger(__name__)

HEADS = ("cls", "color", "background", "pattern")
ATTRIBUTES = ("cls", "color", "background")  # what captions say and prompt fidelity checks
ASSET_DIR = Path(__file__).parent.parent / "assets" / "world_evaluator"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

ImageLike = Image.Image | np.ndarray


# ---------------------------------------------------------------------------- the network
@dataclass
class EvaluatorConfig:
    """Architecture and label vocabularies; saved beside the weights as JSON."""

    channels: tuple[int, ...] = (24, 32, 64, 128)
    embedding_dim: int = 64
    labels: dict[str, list[str]] = field(default_factory=lambda: {
        "cls": list(CLASSES), "color": list(COLORS), "background": list(BACKGROUNDS),
        "pattern": list(PATTERNS)})

    def to_dict(self) -> dict:
        values = asdict(self)
        values["channels"] = list(self.channels)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "EvaluatorConfig":
        unknown = set(values) - {"channels", "embedding_dim", "labels"}
        if unknown:
            raise ValueError(f"unknown evaluator config keys {sorted(unknown)}")
        return cls(channels=tuple(values["channels"]), embedding_dim=values["embedding_dim"],
                   labels={head: list(names) for head, names in values["labels"].items()})


def _stage(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2,
                  bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class WorldEncoder(nn.Module):
    """CNN encoder with attribute heads and an identity embedding (see the module docstring)."""

    def __init__(self, config: EvaluatorConfig):
        super().__init__()
        self.config = config
        c1, c2, c3, c4 = config.channels
        self.stages = nn.ModuleList([
            _stage(3, c1, 5, 2),  # 64 -> 32
            _stage(c1, c2, 3, 1),  # 32
            nn.Sequential(_stage(c2, c3, 3, 2), _stage(c3, c3, 3, 1)),  # 32 -> 16
            nn.Sequential(_stage(c3, c4, 3, 2), _stage(c4, c4, 3, 1)),  # 16 -> 8
        ])
        pooled = 2 * c4
        self.heads = nn.ModuleDict({head: nn.Linear(pooled, len(names))
                                    for head, names in config.labels.items()})
        self.embedding = nn.Sequential(nn.Linear(pooled, 128), nn.ReLU(inplace=True),
                                       nn.Linear(128, config.embedding_dim))

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The four stages' activations for `images` (B, 3, 64, 64) in [-1, 1]."""
        maps = []
        x = images
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"cls", "color", "background", "pattern": logits (B, K), "embedding": (B, D) unit}."""
        last = self.feature_maps(images)[-1]  # (B, C4, 8, 8)
        pooled = torch.cat([last.mean(dim=(2, 3)), last.amax(dim=(2, 3))], dim=1)  # (B, 2 C4)
        outputs = {head: layer(pooled) for head, layer in self.heads.items()}
        outputs["embedding"] = F.normalize(self.embedding(pooled), dim=1)
        return outputs


def supervised_contrastive_loss(embeddings: torch.Tensor, identities: torch.Tensor,
                                temperature: float = 0.1) -> torch.Tensor:
    """SupCon (Khosla et al. 2020, eq. 2): pull renders of one object together, push others away.

    embeddings (B, D) unit vectors; identities (B,) integer ids, each present at least twice.
    """
    similarity = embeddings @ embeddings.T / temperature  # (B, B)
    self_mask = torch.eye(len(identities), dtype=torch.bool, device=embeddings.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positives = (identities[:, None] == identities[None, :]) & ~self_mask
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1).clamp(min=1))
    return per_anchor[positives.any(1)].mean()


# ------------------------------------------------------------------- loading and use
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
            "one with `scripts/train_world_evaluator.py --train`")
    saved = json.loads((path / CONFIG_FILE).read_text())
    return _evaluator_from_state(EvaluatorConfig.from_dict(saved["model"]),
                                 load_file(path / WEIGHTS_FILE))


def _evaluator_from_state(config: EvaluatorConfig, state: dict) -> WorldEvaluator:
    model = WorldEncoder(config)
    model.load_state_dict({key: value.float() if value.is_floating_point() else value
                           for key, value in state.items()})
    return WorldEvaluator(model)


_DEFAULT: WorldEvaluator | None = None


def resolve_evaluator(evaluator: WorldEvaluator | None = None) -> WorldEvaluator:
    """`evaluator`, or the shipped one when None (loaded once)."""
    global _DEFAULT  # a cache of the shipped weights only; never changes results
    if evaluator is not None:
        return evaluator
    if _DEFAULT is None:
        _DEFAULT = load_evaluator()
    return _DEFAULT


# ------------------------------------------------------------------ held-out accuracy
def held_out_scenes(n: int, seed: int = seeding.HELD_OUT_RENDERS) -> list[Scene]:
    """A render set the evaluator never trained on: every (class, color, background) triple
    (held-out ones included), 30% of objects with a random look."""
    combinations = tuple(all_combinations())
    return [sample_scene(scene_rng(seed, index), combinations=combinations)
            for index in range(n)]


def held_out_accuracy(evaluator: WorldEvaluator | None = None, n: int = 2000,
                      seed: int = seeding.HELD_OUT_RENDERS) -> dict[str, float]:
    """Accuracy per attribute (and for all three at once) on `n` fresh renders."""
    scenes = held_out_scenes(n, seed)
    predictions = resolve_evaluator(evaluator).predict([render(scene) for scene in scenes])
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

    num_pairs: int = option(6000, "Objects rendered twice (pose, background, light) to train on.")
    epochs: int = option(8, "Passes over the rendered pairs.")
    batch_pairs: int = option(32, "Objects per batch (2 renders each).")
    learning_rate: float = option(3e-3, "AdamW learning rate.")
    weight_decay: float = option(1e-4, "AdamW weight decay.")
    temperature: float = option(0.1, "Temperature of the supervised contrastive loss.")
    plain_probability: float = option(
        0.35, "Share of plain objects (the rest get a random look).")
    class_loss_weight: float = option(
        2.0, "Weight of the class head (shape is learned last: pale balls pass for boxes).")
    seed: int = option(0, "Seed of the renders and the initial weights.")


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
        rng = scene_rng(config.seed, seeding.EVALUATOR_PAIRS, index)
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
