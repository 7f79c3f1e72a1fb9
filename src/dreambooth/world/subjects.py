"""DreamBench-mini: the world's subjects, their "photos", their prompts, and the training stream.

A subject is one individual object: a class and a body color (which captions can say) plus a
`Look` (a pattern in an accent color, an odd proportion) that no caption describes, so a model
can only learn it from the photos, as DreamBooth (Ruiz et al. 2023) learns a particular dog.
The base model's training stream draws random looks too (classes cover individuals, not only
plain members) but never a subject's exact look, and no random look is as stretched as the
subjects "plank_box" and "pebble_ring".
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
from PIL import Image

from dreambooth import seeding
from dreambooth.world.render import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    CLASSES,
    COLORS,
    CONFLICTS,
    LOOK_PROBABILITY,
    PATTERNS,
    Look,
    Scene,
    article,
    caption,
    render,
    render_mask,
    sample_pose,
    sample_scene,
    scene_rng,
)


@dataclass(frozen=True)
class Subject:
    """An individual object of DreamBench-mini."""

    name: str
    cls: str
    color: str
    look: Look
    description: str  # for people reading results; never part of a prompt

    def scene(self, background: str, **pose) -> Scene:
        return Scene(self.cls, self.color, background, look=self.look, **pose)


SUBJECTS: dict[str, Subject] = {subject.name: subject for subject in (
    Subject("polka_ball", "ball", "blue", Look("spots", "yellow"),
            "a blue ball with yellow polka dots"),
    Subject("belted_box", "box", "red", Look("band", "white"), "a red box with a white belt"),
    Subject("cyclops_star", "star", "green", Look("eye", "white"),
            "a green star with one white eye"),
    Subject("halo_ring", "ring", "orange", Look("outline", "purple"),
            "an orange ring rimmed in purple"),
    Subject("plank_box", "box", "purple", Look("cross", "yellow", aspect=1.7),
            "a wide purple box with a yellow cross"),
    Subject("pebble_ring", "ring", "white", Look("spots", "black", aspect=0.7),
            "a tall white ring with black spots"),
)}
DEMO_SUBJECT = SUBJECTS["polka_ball"]

# A subject far wider than tall (4:1, a car-like long box) for wide frames and crops. Kept out
# of SUBJECTS, so DreamBench-mini, the training stream and every published figure stay as they
# are; photograph it with `upright_scenes` (level, large) and `render(scene, size=(96, 64))`.
WIDE_SUBJECT = Subject("taxi_box", "box", "yellow", Look("band", "black", aspect=4.0),
                       "a long yellow box with a black band, like a toy car")

COLORS_LIST = tuple(COLORS)

# (class, color, look without proportion) of every subject: never drawn in the training stream.
SUBJECT_LOOKS = frozenset((s.cls, s.color, Look(s.look.pattern, s.look.accent))
                          for s in SUBJECTS.values())


HELD_OUT_SUBJECT_COUNT = 8


def held_out_subjects(n: int = HELD_OUT_SUBJECT_COUNT,
                      seed: int = seeding.HELD_OUT_SUBJECTS) -> list[Subject]:
    """`n` new subjects made by the world's rules, never used to choose any setting: DreamBench-
    mini's recipe is picked on SUBJECTS, and these say how it carries over to subjects nobody
    tuned on. Subject i has class CLASSES[i % 4] (each class as often), and a body color, a
    pattern, an accent and (half of them) a proportion drawn from `scene_rng(seed, i)`; no two
    share (class, color, pattern, accent), and none shares one with a DreamBench-mini subject.
    The base model's stream never excluded these looks (as the web does not exclude a user's
    dog): a plain (class, color) pair is as familiar to it as the subjects' are.
    """
    subjects: list[Subject] = []
    taken = {(s.cls, s.color, s.look.pattern, s.look.accent) for s in SUBJECTS.values()}
    for index in range(n):
        rng = scene_rng(seed, index)
        cls = CLASSES[index % len(CLASSES)]
        while True:
            color = COLORS_LIST[int(rng.integers(len(COLORS_LIST)))]
            pattern = PATTERNS[1 + int(rng.integers(len(PATTERNS) - 1))]
            accents = [name for name in COLORS_LIST if name != color]
            accent = accents[int(rng.integers(len(accents)))]
            aspect = round(float(np.exp(rng.uniform(-0.55, 0.55))), 2) if index % 2 else 1.0
            if (cls, color, pattern, accent) not in taken:
                break
        taken.add((cls, color, pattern, accent))
        subjects.append(Subject(f"held_out_{index}_{color}_{pattern}_{cls}", cls, color,
                                Look(pattern, accent, aspect),
                                f"{article(color)} {color} {cls} with {article(accent)} "
                                f"{accent} {pattern} pattern, {aspect}:1"))
    return subjects


def _subject(subject: Subject | str) -> Subject:
    if isinstance(subject, Subject):
        return subject
    if subject not in SUBJECTS:
        raise KeyError(f"no subject named '{subject}'; the subjects are {tuple(SUBJECTS)}")
    return SUBJECTS[subject]


def subject_scenes(subject: Subject | str, n: int = 5, seed: int = 0) -> list[Scene]:
    """`n` scenes of the subject, each on a different background, pose and light."""
    subject = _subject(subject)
    rng = scene_rng(seed, seeding.SUBJECT_PHOTOS,  # each subject its own poses
                    zlib.crc32(subject.name.encode()))
    backgrounds = [b for b in BACKGROUNDS if (subject.color, b) not in CONFLICTS]
    if n > len(backgrounds):
        raise ValueError(f"at most {len(backgrounds)} photos of '{subject.name}' (one per "
                         f"background), not n={n}")
    chosen = rng.permutation(len(backgrounds))[:n]
    return [subject.scene(backgrounds[int(i)], **sample_pose(rng)) for i in chosen]


def upright_scenes(subject: Subject | str, n: int = 5, seed: int = 0,
                   scale: tuple[float, float] = (0.7, 0.8)) -> list[Scene]:
    """`subject_scenes` level (rotation 0), centred left to right, at scales spread evenly over
    `scale`: photos for wide frames. `WIDE_SUBJECT` is then 74-84 px wide and about 20 px tall, so
    a (96, 64) frame holds it whole and the centre 64x64 crop cuts off both ends."""
    low, high = scale
    scenes = subject_scenes(subject, n, seed)
    return [replace(scene, rotation=0.0, x=0.5, scale=low + (high - low) * (i + 0.5) / n)
            for i, scene in enumerate(scenes)]


def photos(subject: Subject | str, n: int = 5, seed: int = 0,
           size: tuple[int, int] | None = None) -> list[Image.Image]:
    """`n` 64x64 "photos" of the subject: pose, scale, position, background and light vary.
    `size` (width, height) frames each wider or taller around the same 64x64 centre."""
    return [render(scene, size) for scene in subject_scenes(subject, n, seed)]


def photo_masks(subject: Subject | str, n: int = 5, seed: int = 0,
                size: tuple[int, int] | None = None) -> list[Image.Image]:
    """The subject's mask in each of `photos(subject, n, seed, size)` ('L': 255 subject, 0
    background, antialiased edges; see `render_mask`)."""
    return [render_mask(scene, size) for scene in subject_scenes(subject, n, seed)]


def photo_captions(subject: Subject | str, n: int = 5, seed: int = 0,
                   identifier: str = "sks") -> list[str]:
    """A caption per photo in the words the world model knows: the identifier, the class and
    the photo's background, e.g. "a sks ball on the grass", "a sks ball on a pink background"
    (the background is `scene.background`, one of BACKGROUNDS, worded as BACKGROUND_PHRASES)."""
    return [caption(scene, color=False, identifier=identifier)
            for scene in subject_scenes(subject, n, seed)]


def dreambench_prompts(subject: Subject | str, identifier: str = "sks") -> list[str]:
    """The subject's evaluation prompts, as DreamBench's: recontextualization ("a sks ball on the
    grass", one per background) and property modification ("a red sks ball", one per color)."""
    subject = _subject(subject)
    noun = f"{identifier} {subject.cls}"
    prompts = [f"a {noun} {BACKGROUND_PHRASES[b]}" for b in BACKGROUNDS
               if (subject.color, b) not in CONFLICTS]
    prompts += [f"{article(color)} {color} {noun}" for color in COLORS if color != subject.color]
    return prompts


def class_prompt(subject: Subject | str) -> str:
    """The prompt whose generations PRES compares with the subject: "a ball"."""
    return f"a {_subject(subject).cls}"


# ----------------------------------------------------------------------- training stream
def training_scene(seed: int, index: int, look_probability: float = LOOK_PROBABILITY) -> Scene:
    """Scene number `index` of training stream `seed` (a pure function of the arguments): a
    training (class, color, background) triple, never a held-out one, never a subject's look;
    a share `look_probability` of the objects wear a look."""
    return sample_scene(scene_rng(seed, index), look_probability=look_probability,
                        excluded_looks=SUBJECT_LOOKS)


def iter_training_scenes(seed: int, start: int = 0) -> Iterator[Scene]:
    """The endless training stream: scenes `start`, `start + 1`, ... of stream `seed`."""
    for index in itertools.count(start):
        yield training_scene(seed, index)
