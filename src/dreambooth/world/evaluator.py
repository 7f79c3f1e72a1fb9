"""The world evaluator's network: a small CNN over 64x64 renders with attribute heads and an
identity embedding (the mini-benchmark's stand-in for CLIP and DINO).

    image (B, 3, 64, 64) in [-1, 1]
      -> 4 conv stages (B, 24, 32, 32) (B, 32, 32, 32) (B, 64, 16, 16) (B, 128, 8, 8)
      -> [global mean ; global max] pooled features (B, 256)
      -> heads: class, color, background, pattern logits; embedding (B, 64), L2-normalized

The embedding is trained with a supervised contrastive loss (Khosla et al. 2020) on pairs of
renders of the same individual object in different poses, backgrounds and light, so it encodes
*which object* (class, color, pattern, accent, proportion) and not where or on what: what DINO
similarity measures for DreamBench. Nothing here knows about training or metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dreambooth.world import BACKGROUNDS, CLASSES, COLORS, PATTERNS

HEADS = ("cls", "color", "background", "pattern")


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
