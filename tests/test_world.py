"""The procedural world: deterministic renders, captions, the held-out split, the subjects."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys

import numpy as np
import pytest

from dreambooth import world


def _digest(scenes) -> str:
    return hashlib.sha256(world.render_array(scenes).tobytes()).hexdigest()


def test_renders_are_bit_identical_within_and_across_processes():
    scenes = [world.training_scene(3, n) for n in range(6)] + world.subject_scenes("plank_box", 2)
    assert _digest(scenes) == _digest(scenes)
    code = ("import hashlib; from dreambooth import world; scenes = [world.training_scene(3, n) "
            "for n in range(6)] + world.subject_scenes('plank_box', 2); print(hashlib.sha256("
            "world.render_array(scenes).tobytes()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert other == _digest(scenes)


def test_render_is_64px_rgb_and_every_field_changes_the_image():
    base = world.Scene("star", "red", "striped", texture_seed=1)
    image = world.render(base)
    assert image.size == (64, 64) and image.mode == "RGB"
    variants = dict(cls="box", color="blue", background="grass", x=0.4, y=0.6, scale=0.4,
                    rotation=30.0, lighting=0.9, light_angle=90.0, texture_seed=2,
                    look=world.Look("spots", "white"))
    reference = np.asarray(image)
    for name, value in variants.items():
        changed = world.render(world.Scene(**{**base.__dict__, name: value}))
        assert not np.array_equal(np.asarray(changed), reference), name


def test_vocabularies_and_captions_cover_the_world():
    assert len(world.CLASSES) >= 4 and len(world.COLORS) >= 6 and len(world.BACKGROUNDS) >= 6
    assert world.TEXTURE_BACKGROUNDS and world.PLAIN_BACKGROUNDS
    for triple in world.all_combinations():
        text = world.caption(world.Scene(*triple))
        assert set(text.split()) <= set(world.VOCABULARY), text
        assert world.parse_prompt(text) == dict(zip(("cls", "color", "background"), triple))
    assert world.caption(world.Scene("star", "red", "blue")) == "a red star on a blue background"
    assert world.caption(world.Scene("ball", "orange", "striped")) == (
        "an orange ball on a striped background")
    assert world.parse_prompt("a sks ball on the grass") == {"cls": "ball", "background": "grass"}
    orange_ball = world.Scene("ball", "orange", "beach")
    assert world.caption(orange_ball, color=False) == "a ball on the beach"
    assert world.caption(orange_ball, background=False) == "an orange ball"
    assert world.caption(orange_ball, color=False, background=False) == "a ball"
    assert world.caption(orange_ball, identifier="sks") == "an orange sks ball on the beach"
    assert world.parse_prompt(world.caption(orange_ball, identifier="sks")) == {
        "cls": "ball", "color": "orange", "background": "beach"}
    assert world.parse_prompt("a red sks ring") == {"cls": "ring", "color": "red"}


def test_held_out_split_is_disjoint_and_training_still_covers_every_pair():
    train, held_out = set(world.TRAIN_COMBINATIONS), set(world.HELD_OUT_COMBINATIONS)
    assert not train & held_out and train | held_out == set(world.all_combinations())
    assert 0.08 <= len(held_out) / len(world.all_combinations()) <= 0.12
    for i, j in itertools.combinations(range(3), 2):  # every attribute pair stays in training
        assert {(t[i], t[j]) for t in held_out} <= {(t[i], t[j]) for t in train}
    stream = list(itertools.islice(world.iter_training_scenes(0), 400))
    assert not {scene.attributes for scene in stream} & held_out
    assert stream[7] == world.training_scene(0, 7)
    assert next(world.iter_training_scenes(0, start=7)) == stream[7]


def test_subjects_have_varied_photos_and_looks_no_caption_describes():
    assert len(world.SUBJECTS) >= 5 and world.DEMO_SUBJECT in world.SUBJECTS.values()
    stream_looks = {(s.cls, s.color, world.Look(s.look.pattern, s.look.accent))
                    for s in itertools.islice(world.iter_training_scenes(1), 2000)}
    for subject in world.SUBJECTS.values():
        scenes = world.subject_scenes(subject)
        assert len(scenes) == 5 and len({s.background for s in scenes}) == 5
        photos = [np.asarray(image) for image in world.photos(subject)]
        assert all(not np.array_equal(a, b) for a, b in itertools.combinations(photos, 2))
        plain = world.Scene(subject.cls, subject.color, scenes[0].background)
        assert world.caption(scenes[0]) == world.caption(plain)  # the look is not in words
        assert subject.look != world.PLAIN
    assert not stream_looks & world.SUBJECT_LOOKS
    prompts = world.dreambench_prompts(world.DEMO_SUBJECT)
    assert "a sks ball on the grass" in prompts and "a red sks ball" in prompts


def test_held_out_subjects_are_new_individuals_fixed_by_their_rule():
    subjects = world.held_out_subjects()
    assert subjects == world.held_out_subjects()  # a fixed seed: the same set every time
    assert len(subjects) == 8 and len({s.name for s in subjects}) == 8
    assert [s.cls for s in subjects] == list(world.CLASSES) * 2  # every class as often
    keys = [(s.cls, s.color, s.look.pattern, s.look.accent) for s in subjects]
    shown = {(s.cls, s.color, s.look.pattern, s.look.accent) for s in world.SUBJECTS.values()}
    assert len(set(keys)) == 8 and not set(keys) & shown
    for subject in subjects:
        assert subject.look != world.PLAIN and subject.look.accent != subject.color
        assert len(world.photos(subject)) == 5
        prompts = world.dreambench_prompts(subject)
        assert f"a sks {subject.cls} on the beach" in prompts
    assert world.held_out_subjects(seed=1) != subjects


def test_bad_scenes_fail_with_every_problem_named():
    with pytest.raises(ValueError, match="cls='cat'.*color='teal'"):
        world.Scene("cat", "teal", "white")
    with pytest.raises(ValueError, match="would not show"):
        world.Scene("ball", "green", "grass")
    with pytest.raises(ValueError, match="accent"):
        world.Look("spots")
