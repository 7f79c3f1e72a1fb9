"""A deterministic renderer of the world: 64x64 captioned images of simple objects.

A scene is one object (a class such as "star", a color, a position, scale, rotation and an
optional `Look`: a pattern, an accent color and a proportion that captions never mention) on a
background (a plain color or a texture), under a lighting (brightness and a light direction).
Images are drawn at 4x (256x256) and box-filtered down to 64x64, so edges are antialiased.
`render(scene, size=(96, 64))` frames the same scene wider (or taller) around that square, and
`render_mask` gives the object's mask in any frame.

Everything is a pure function of its arguments: randomness comes from `numpy.random.Generator`
objects built from explicit seeds, never from global state, so a scene renders to the same
bytes in every run.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from dreambooth import seeding

IMAGE_SIZE = 64
SUPERSAMPLE = 4
_CANVAS = IMAGE_SIZE * SUPERSAMPLE  # 256: drawing resolution

CLASSES = ("ball", "box", "star", "ring")

# Object colors (RGB under neutral light). Hues far apart so lighting never makes one another.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 210, 30),
    "green": (35, 155, 55),
    "blue": (35, 80, 215),
    "purple": (135, 50, 185),
    "white": (245, 245, 245),
    "black": (30, 30, 30),
}

# Backgrounds: plain colors (caption "on a blue background") and textures/scenes.
PLAIN_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (236, 236, 230),
    "gray": (110, 110, 112),
    "blue": (115, 165, 230),
    "yellow": (245, 225, 120),
    "pink": (240, 170, 195),
}
TEXTURE_BACKGROUNDS = ("striped", "checkered", "dotted", "grass", "beach")
BACKGROUNDS = tuple(PLAIN_BACKGROUNDS) + TEXTURE_BACKGROUNDS

# How each background reads in a caption, after the object: "a red star {phrase}".
BACKGROUND_PHRASES: dict[str, str] = {
    **{name: f"on a {name} background" for name in PLAIN_BACKGROUNDS},
    "striped": "on a striped background",
    "checkered": "on a checkered background",
    "dotted": "on a dotted background",
    "grass": "on the grass",
    "beach": "on the beach",
}

# (color, background) pairs whose object would hardly show: never rendered or captioned.
CONFLICTS = frozenset({("white", "white"), ("blue", "blue"), ("yellow", "yellow"),
                       ("green", "grass")})

# Share of training objects that wear a random `Look` unless a caller says otherwise.
LOOK_PROBABILITY = 0.3

# Patterns a `Look` can put on an object, in the accent color, clipped to the object.
PATTERNS = ("plain", "spots", "band", "eye", "outline", "cross")

# Words the world's captions and prompts use (for tokenizers with whole-word merges).
VOCABULARY = tuple(dict.fromkeys(
    "a an photo of the on background with".split() + list(CLASSES) + list(COLORS)
    + list(BACKGROUNDS) + " ".join(BACKGROUND_PHRASES.values()).split()))


@dataclass(frozen=True)
class Look:
    """Appearance details no caption describes: what makes one object an individual."""

    pattern: str = "plain"  # one of PATTERNS
    accent: str | None = None  # color name of the pattern (None only for "plain")
    aspect: float = 1.0  # width / height of the object (area kept); 1.0 is the class's shape

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"Look.pattern='{self.pattern}' is not one of {PATTERNS}")
        if (self.pattern == "plain") != (self.accent is None):
            raise ValueError(f"Look(pattern='{self.pattern}', accent={self.accent!r}): a pattern "
                             "needs an accent color and 'plain' takes none")
        if self.accent is not None and self.accent not in COLORS:
            raise ValueError(f"Look.accent='{self.accent}' is not one of {tuple(COLORS)}")
        if not 0.25 <= self.aspect <= 4.0:
            raise ValueError(f"Look.aspect={self.aspect} is outside [0.25, 4.0]")


PLAIN = Look()


@dataclass(frozen=True)
class Scene:
    """One object on one background; every field a caption does not mention has a default."""

    cls: str  # object class, one of CLASSES
    color: str  # body color, one of COLORS
    background: str  # one of BACKGROUNDS
    x: float = 0.5  # object centre, fraction of the width from the left
    y: float = 0.5  # object centre, fraction of the height from the top
    scale: float = 0.5  # object diameter, fraction of the image side
    rotation: float = 0.0  # degrees, counter-clockwise
    lighting: float = 1.0  # brightness multiplier
    light_angle: float = 0.0  # direction the light comes from, degrees (0 = from the left)
    texture_seed: int = 0  # layout of textured backgrounds (stripe angle, dot positions ...)
    look: Look = field(default=PLAIN)

    def __post_init__(self) -> None:
        problems = []
        if self.cls not in CLASSES:
            problems.append(f"cls='{self.cls}' is not one of {CLASSES}")
        if self.color not in COLORS:
            problems.append(f"color='{self.color}' is not one of {tuple(COLORS)}")
        if self.background not in BACKGROUNDS:
            problems.append(f"background='{self.background}' is not one of {BACKGROUNDS}")
        if (self.color, self.background) in CONFLICTS:
            problems.append(f"a {self.color} object on the '{self.background}' background "
                            "would not show (see CONFLICTS)")
        if not 0.1 <= self.scale <= 1.0:
            problems.append(f"scale={self.scale} is outside [0.1, 1.0]")
        if problems:
            raise ValueError("invalid Scene: " + "; ".join(problems))

    @property
    def attributes(self) -> tuple[str, str, str]:
        """(class, color, background): what the caption says."""
        return self.cls, self.color, self.background


# --------------------------------------------------------------------------- captions
def caption(scene: Scene, *, color: bool = True, background: bool = True,
            identifier: str | None = None) -> str:
    """DreamBench-style caption: "a red star on a blue background", "an orange ball on the
    beach"; without the color and/or the background: "a star on the beach", "a red star",
    "a star" (the class prompt); with an identifier before the class noun: "a red sks star"."""
    noun = [identifier, scene.cls] if identifier else [scene.cls]
    words = [scene.color, *noun] if color else noun
    if background:
        words.append(BACKGROUND_PHRASES[scene.background])
    return f"{article(words[0])} {' '.join(words)}"


def article(word: str) -> str:
    """ "an" before a vowel sound ("an orange ball"), else "a"."""
    return "an" if word[0] in "aeiou" else "a"


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a prompt asks for: {"cls", "color", "background"}, each only if stated.

    Reads captions and DreamBench-style prompts with an identifier, e.g.
    "a sks ball on the grass" -> {"cls": "ball", "background": "grass"}; a color counts only
    right before the class noun (or before the identifier and the class noun).
    """
    words = prompt.lower().replace(",", " ").split()
    found: dict[str, str] = {}
    class_positions = [i for i, word in enumerate(words) if word in CLASSES]
    if class_positions:
        position = class_positions[0]
        found["cls"] = words[position]
        for before in words[max(0, position - 2):position][::-1]:
            if before in COLORS:
                found["color"] = before
                break
    text = " ".join(words)
    for name, phrase in BACKGROUND_PHRASES.items():
        if phrase in text:
            found["background"] = name
    return found


# ------------------------------------------------------------------------- combinations
def all_combinations() -> list[tuple[str, str, str]]:
    """Every renderable (class, color, background) triple, in vocabulary order."""
    return [(cls, color, background)
            for cls, color, background in itertools.product(CLASSES, COLORS, BACKGROUNDS)
            if (color, background) not in CONFLICTS]


def _stable_rank(triple: tuple[str, str, str]) -> str:
    # A hash, not an RNG: the split must never change with numpy's version.
    return hashlib.sha256("|".join(triple).encode()).hexdigest()


HELD_OUT_FRACTION = 0.1
# ~10% of the triples, never in training captions: the base model's compositional test.
HELD_OUT_COMBINATIONS: frozenset[tuple[str, str, str]] = frozenset(
    sorted(all_combinations(), key=_stable_rank)[:round(HELD_OUT_FRACTION
                                                        * len(all_combinations()))])
TRAIN_COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple(
    triple for triple in all_combinations() if triple not in HELD_OUT_COMBINATIONS)


def held_out_captions() -> list[str]:
    """Captions of the held-out combinations, sorted: the base model's compositional test."""
    return [caption(Scene(*triple)) for triple in sorted(HELD_OUT_COMBINATIONS)]


# ----------------------------------------------------------------------------- sampling
def scene_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on (seed, *keys)."""
    return np.random.default_rng([seed, *keys])


def sample_look(rng: np.random.Generator, color: str) -> Look:
    """A random individual look: a pattern in an accent color other than the body's."""
    pattern = PATTERNS[1 + int(rng.integers(len(PATTERNS) - 1))]
    accents = [name for name in COLORS if name != color]
    accent = accents[int(rng.integers(len(accents)))]
    aspect = float(np.exp(rng.uniform(-0.2, 0.2))) if rng.random() < 0.3 else 1.0
    return Look(pattern=pattern, accent=accent, aspect=aspect)


def sample_pose(rng: np.random.Generator) -> dict[str, float | int]:
    """Position, scale, rotation, lighting and texture layout: what varies between photos."""
    return dict(x=float(rng.uniform(0.32, 0.68)), y=float(rng.uniform(0.32, 0.68)),
                scale=float(rng.uniform(0.38, 0.62)), rotation=float(rng.uniform(0.0, 360.0)),
                lighting=float(rng.uniform(0.85, 1.12)), light_angle=float(rng.uniform(0, 360)),
                texture_seed=int(rng.integers(2**31)))


def sample_scene(rng: np.random.Generator, *,
                 combinations: tuple[tuple[str, str, str], ...] = TRAIN_COMBINATIONS,
                 look_probability: float = LOOK_PROBABILITY,
                 excluded_looks: frozenset[tuple[str, str, Look]] = frozenset()) -> Scene:
    """A random scene with a (class, color, background) from `combinations`.

    With probability `look_probability` the object gets a random `Look`, so a class covers
    individuals as well as plain members (the prior DreamBooth's class prompt draws on);
    (class, color, look) triples in `excluded_looks` (the subjects) are never drawn.
    """
    cls, color, background = combinations[int(rng.integers(len(combinations)))]
    look = PLAIN
    if rng.random() < look_probability:
        look = sample_look(rng, color)
        while (cls, color, Look(look.pattern, look.accent)) in excluded_looks:
            look = sample_look(rng, color)
    return Scene(cls, color, background, look=look, **sample_pose(rng))


# ---------------------------------------------------------------------------- rendering
def _shape_polygon(cls: str, cx: float, cy: float, r: float, sx: float, sy: float,
                   inset: float = 1.0) -> list[tuple[float, float]]:
    """Outline of a class's body at radius `r * inset`, stretched by (sx, sy)."""
    r = r * inset
    if cls == "box":
        h = 0.82 * r
        corners = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif cls == "star":
        corners = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            corners.append((radius * math.cos(angle), radius * math.sin(angle)))
    else:  # ball and ring: a 48-gon is round at this size
        corners = [(r * math.cos(2 * math.pi * k / 48), r * math.sin(2 * math.pi * k / 48))
                   for k in range(48)]
    return [(cx + px * sx, cy + py * sy) for px, py in corners]


def _draw_body(draw: ImageDraw.ImageDraw, cls: str, center: float, r: float, sx: float,
               sy: float, fill: int | tuple, inset: float = 1.0) -> None:
    draw.polygon(_shape_polygon(cls, center, center, r, sx, sy, inset), fill=fill)
    if cls == "ring":  # punch the hole (0.55 r), shrinking inward as the outline insets
        hole = 0.55 * r * (2.0 - inset)
        draw.ellipse([center - hole * sx, center - hole * sy, center + hole * sx,
                      center + hole * sy], fill=0)


def _pattern_mask(look: Look, cls: str, size: int, center: float, r: float, sx: float,
                  sy: float) -> Image.Image:
    """Where the accent goes (L mode, before clipping to the body)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if look.pattern == "spots":
        step, dot = 0.5 * r, 0.14 * r
        for row in range(-3, 4):
            for col in range(-3, 4):
                px = center + (col + 0.5 * (row % 2)) * step * sx
                py = center + row * step * 0.87 * sy
                draw.ellipse([px - dot, py - dot, px + dot, py + dot], fill=255)
    elif look.pattern == "band":
        half = 0.2 * r * sy
        draw.rectangle([0, center - half, size, center + half], fill=255)
    elif look.pattern == "cross":
        half = 0.14 * r
        draw.rectangle([center - half * sx, 0, center + half * sx, size], fill=255)
        draw.rectangle([0, center - half * sy, size, center + half * sy], fill=255)
    elif look.pattern == "outline":
        _draw_body(draw, cls, center, r, sx, sy, 255)
        _draw_body(draw, cls, center, r, sx, sy, 0, inset=0.78 if cls != "ring" else 0.9)
    elif look.pattern == "eye":
        ex, ey, er = (0.0, -0.77 * r, 0.2 * r) if cls == "ring" else (0.15 * r, -0.2 * r, 0.3 * r)
        px, py = center + ex * sx, center + ey * sy
        draw.ellipse([px - er, py - er, px + er, py + er], fill=255)
    return mask


def _draw_object(scene: Scene, size: int) -> tuple[Image.Image, Image.Image]:
    """The object sprite (RGB) and its coverage (L), upright and centred in a size x size box."""
    look = scene.look
    r = 0.5 * scene.scale * _CANVAS
    sx, sy = math.sqrt(look.aspect), 1.0 / math.sqrt(look.aspect)
    center = size / 2
    coverage = Image.new("L", (size, size), 0)
    _draw_body(ImageDraw.Draw(coverage), scene.cls, center, r, sx, sy, 255)
    # The sprite is body-colored everywhere, so resampling at the edges never pulls in black.
    sprite = Image.new("RGB", (size, size), COLORS[scene.color])
    if look.pattern != "plain":
        sprite.paste(COLORS[look.accent], mask=_pattern_mask(look, scene.cls, size, center, r,
                                                             sx, sy))
        if look.pattern == "eye":  # a dark pupil in the accent disc
            ex, ey, pr = (0.0, -0.77 * r, 0.08 * r) if scene.cls == "ring" else (
                0.15 * r, -0.2 * r, 0.12 * r)
            px, py = center + ex * sx, center + ey * sy
            ImageDraw.Draw(sprite).ellipse([px - pr, py - pr, px + pr, py + pr],
                                           fill=(15, 15, 15))
    return sprite, coverage


def _texture(name: str, rng: np.random.Generator, frame: _Frame | None = None) -> np.ndarray:
    """A (4H, 4W, 3) float array for a textured background: (256, 256, 3) for the square photo.

    Positions are measured from the square photo's corner in units of its side, so stripes,
    checks, dots and the beach continue into a wider frame; grass is drawn anew for the frame.
    """
    n = _CANVAS
    frame = frame or _Frame()
    width, height, left, top = frame.canvas_width, frame.canvas_height, frame.left, frame.top
    yy, xx = np.mgrid[-top:height - top, -left:width - left].astype(np.float64) / n  # (4H, 4W)
    if name in ("striped", "checkered"):
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.12, 0.22)
        u = (xx * math.cos(angle) + yy * math.sin(angle)) / period + rng.uniform(0, 1)
        if name == "striped":
            on = (u % 1.0) < 0.5
            light, dark = np.array([236, 222, 190.0]), np.array([165, 115, 85.0])
        else:
            v = (-xx * math.sin(angle) + yy * math.cos(angle)) / period + rng.uniform(0, 1)
            on = ((np.floor(u) + np.floor(v)) % 2) == 0
            light, dark = np.array([212, 212, 212.0]), np.array([92, 92, 96.0])
        return np.where(on[..., None], light, dark)
    if name == "dotted":
        image = Image.new("RGB", (width, height), (185, 218, 236))
        draw = ImageDraw.Draw(image)
        step = rng.uniform(0.16, 0.22) * n
        dot = rng.uniform(0.18, 0.26) * step
        ox, oy = rng.uniform(0, step, size=2)
        rows = range(-1 - math.ceil(top / step), int((height - top) / step) + 2)
        cols = range(-1 - math.ceil(left / step), int((width - left) / step) + 2)
        for row in rows:
            for col in cols:
                px, py = ox + (col + 0.5 * (row % 2)) * step + left, oy + row * step + top
                draw.ellipse([px - dot, py - dot, px + dot, py + dot], fill=(85, 145, 190))
        return np.asarray(image, dtype=np.float64)
    if name == "grass":
        coarse = rng.normal(0.0, 1.0, size=(round(8 * height / n), round(8 * width / n)))
        low = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((width, height),
                                                                           Image.BILINEAR))
        fine = rng.normal(0.0, 1.0, size=(height, width))
        base = np.array([70, 135, 45.0])
        image = base + (10 * low + 12 * fine)[..., None] * np.array([0.5, 1.0, 0.4])
        blades = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(blades)
        for _ in range(round(160 * width * height / n**2)):
            px, py = rng.uniform(0, (width, height))
            lean, length = rng.uniform(-6, 6), rng.uniform(10, 22)
            shade = tuple(int(c) for c in (rng.uniform(0.6, 1.3) * np.array([60, 150, 40])))
            draw.line([(px, py), (px + lean, py - length)], fill=shade, width=3)
        return np.asarray(blades, dtype=np.float64)
    if name == "beach":
        horizon = rng.uniform(0.22, 0.36)
        sand = np.array([226, 202, 150.0]) + rng.normal(0, 7, size=(height, width, 1))
        sea = np.array([55, 125, 190.0]) + 18 * np.sin(
            2 * math.pi * (yy * 9 + 0.3 * np.sin(2 * math.pi * xx * 2)))[..., None] * np.array(
                [0.3, 0.5, 0.6])
        foam = np.abs(yy - horizon) < 0.015
        image = np.where((yy < horizon)[..., None], sea, sand)
        return np.where(foam[..., None], np.array([240, 244, 240.0]), image)
    raise ValueError(f"no texture named '{name}'")


@dataclass(frozen=True)
class _Frame:
    """Where a photo of `width` x `height` pixels lies around the square 64x64 photo: centred on
    it, at the same scale. `left`, `top`: the square's corner in the 4x canvas."""

    width: int = IMAGE_SIZE
    height: int = IMAGE_SIZE

    @property
    def canvas_width(self) -> int:
        return self.width * SUPERSAMPLE

    @property
    def canvas_height(self) -> int:
        return self.height * SUPERSAMPLE

    @property
    def left(self) -> int:  # 4 (W - 64) / 2, a whole canvas pixel for any W
        return (self.width - IMAGE_SIZE) * SUPERSAMPLE // 2

    @property
    def top(self) -> int:
        return (self.height - IMAGE_SIZE) * SUPERSAMPLE // 2


MAX_PHOTO_SIZE = 1024


def _frame(size: tuple[int, int] | None) -> _Frame:
    if size is None:
        return _Frame()
    try:
        width, height = (int(side) for side in size)
    except (TypeError, ValueError):
        raise ValueError(f"size={size!r} must be (width, height) in pixels") from None
    if not (8 <= width <= MAX_PHOTO_SIZE and 8 <= height <= MAX_PHOTO_SIZE):
        raise ValueError(f"size={size!r}: width and height must be in [8, {MAX_PHOTO_SIZE}]")
    return _Frame(width, height)


def _background(scene: Scene, frame: _Frame) -> np.ndarray:
    if scene.background in PLAIN_BACKGROUNDS:
        return np.broadcast_to(np.array(PLAIN_BACKGROUNDS[scene.background], dtype=np.float64),
                               (frame.canvas_height, frame.canvas_width, 3)).copy()
    return _texture(scene.background, scene_rng(scene.texture_seed, seeding.TEXTURE), frame)


def _placed_object(scene: Scene, frame: _Frame) -> tuple[Image.Image, Image.Image,
                                                         tuple[int, int]]:
    """The rotated sprite (RGB), its coverage (L) and where its corner goes in the canvas."""
    # A sprite box large enough for any rotation of a stretched object.
    reach = 0.5 * scene.scale * _CANVAS * math.sqrt(max(scene.look.aspect,
                                                        1 / scene.look.aspect))
    size = 2 * int(math.ceil(reach * 1.45)) + 4
    sprite, coverage = _draw_object(scene, size)
    sprite = sprite.rotate(scene.rotation, resample=Image.NEAREST)
    coverage = coverage.rotate(scene.rotation, resample=Image.BILINEAR)
    left = int(round(scene.x * _CANVAS - size / 2)) + frame.left
    top = int(round(scene.y * _CANVAS - size / 2)) + frame.top
    return sprite, coverage, (left, top)


def render(scene: Scene, size: tuple[int, int] | None = None) -> Image.Image:
    """The scene as a 64x64 RGB image: drawn at 256x256, box-filtered down, then lit.

    `size` (width, height) frames the same scene wider or taller: the object keeps its size
    and place in pixels, centred frames share the square photo's middle, and the background
    fills the rest, e.g. (96, 64) for a landscape photo whose centre 64x64 crop is the square
    photo (pixel for pixel on plain, striped and checkered backgrounds; dots and the beach
    continue with other antialiasing and sand grain, grass is drawn anew).
    """
    frame = _frame(size)
    canvas = Image.fromarray(np.clip(_background(scene, frame), 0, 255).round().astype(np.uint8))
    sprite, coverage, corner = _placed_object(scene, frame)
    canvas.paste(sprite, corner, mask=coverage)
    small = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float64)  # (H, W, 3)
    # Light: overall brightness times a gentle gradient from the light's side (+-8% over the
    # square); kept mild so a dim white background never looks like a bright gray one.
    rows = np.arange(frame.height) - (frame.height - IMAGE_SIZE) / 2
    columns = np.arange(frame.width) - (frame.width - IMAGE_SIZE) / 2
    yy, xx = np.meshgrid(rows, columns, indexing="ij")
    yy, xx = yy / (IMAGE_SIZE - 1) - 0.5, xx / (IMAGE_SIZE - 1) - 0.5
    angle = math.radians(scene.light_angle)
    gradient = 1.0 - 0.16 * (xx * math.cos(angle) + yy * math.sin(angle))
    lit = small * (scene.lighting * gradient)[..., None]
    return Image.fromarray(np.clip(lit, 0, 255).round().astype(np.uint8), mode="RGB")


def render_mask(scene: Scene, size: tuple[int, int] | None = None) -> Image.Image:
    """The object's mask in `render(scene, size)`: an 'L' image of the same size, 255 where
    the pixel is all object, 0 where it is all background, and in between the share of the
    pixel the object covers (its antialiased edge; threshold at 128 for a binary mask).

    It is the very coverage the renderer blends the object with (a ring's hole is background),
    box-filtered the same way; lighting does not touch it.
    """
    frame = _frame(size)
    mask = Image.new("L", (frame.canvas_width, frame.canvas_height), 0)
    _, coverage, corner = _placed_object(scene, frame)
    mask.paste(coverage, corner)
    return mask.reduce(SUPERSAMPLE)


def render_array(scenes: list[Scene]) -> np.ndarray:
    """(N, 64, 64, 3) uint8 renders of `scenes`."""
    return np.stack([np.asarray(render(scene)) for scene in scenes])
