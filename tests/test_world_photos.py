"""The world's photos for dataset features: frames of any size, object masks, a wide subject and
captions that name each photo's background; every existing render stays bit-identical."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from dreambooth import world

# sha256 of the scenes below rendered by the renderer before frames and masks existed (the
# renders the bundled world model and evaluator were trained and measured on).
DEFAULT_RENDERS_SHA256 = "76e48887886aea7ca1b9677f29447a38585a674e66ffd11e3ec61f2db0f8b438"


def _reference_scenes() -> list[world.Scene]:
    scenes = [world.training_scene(0, n) for n in range(60)]
    scenes += [world.Scene("star", "red", background, texture_seed=i, rotation=17.0)
               for i, background in enumerate(world.BACKGROUNDS)]
    for name in world.SUBJECTS:
        scenes += world.subject_scenes(name, 5, 0) + world.subject_scenes(name, 5, 1)
    return scenes


def test_default_renders_are_bit_identical_to_before():
    scenes = _reference_scenes()
    assert {scene.background for scene in scenes} == set(world.BACKGROUNDS)
    assert hashlib.sha256(world.render_array(scenes).tobytes()).hexdigest() == (
        DEFAULT_RENDERS_SHA256)
    photo = np.asarray(world.photos("plank_box", 2)[1])
    assert np.array_equal(photo, np.asarray(world.render(world.subject_scenes("plank_box")[1],
                                                         size=(64, 64))))


SCENE = dict(cls="box", color="red", x=0.42, y=0.55, rotation=20.0, light_angle=40.0,
             texture_seed=3, look=world.Look("band", "white", aspect=2.0))


@pytest.mark.parametrize("background", world.BACKGROUNDS)
def test_frames_extend_the_square_photo_with_background(background):
    scene = world.Scene(background=background, **SCENE)
    square = np.asarray(world.render(scene))
    wide = np.asarray(world.render(scene, size=(96, 64)))
    tall = np.asarray(world.render(scene, size=(64, 96)))
    assert wide.shape == (64, 96, 3) and tall.shape == (96, 64, 3)
    # The object keeps its size and place: its mask is the square one, padded.
    mask = np.asarray(world.render_mask(scene))
    assert np.array_equal(np.asarray(world.render_mask(scene, (96, 64))),
                          np.pad(mask, ((0, 0), (16, 16))))
    assert np.array_equal(np.asarray(world.render_mask(scene, (64, 96))),
                          np.pad(mask, ((16, 16), (0, 0))))
    if background in (*world.PLAIN_BACKGROUNDS, "striped", "checkered"):
        assert np.array_equal(wide[:, 16:80], square) and np.array_equal(tall[16:80], square)
    else:  # dots, beach and grass continue with new antialiasing, sand grain or blades
        assert np.abs(wide[:, 16:80].astype(int) - square).mean() < 12
    assert np.asarray(world.render(scene, size=(24, 40))).shape == (40, 24, 3)


def test_bad_frame_sizes_are_refused():
    scene = world.Scene("ball", "red", "white")
    for size in ((4, 64), (64, 5000), (64,), "wide"):
        with pytest.raises(ValueError, match="size="):
            world.render(scene, size=size)


@pytest.mark.parametrize("cls", world.CLASSES)
def test_mask_is_exactly_where_the_object_is_drawn(cls):
    """Two renders that differ only in the object's color differ exactly under the mask: not
    at all where it is 0 (but for a rounding step of the edge), and wherever it covers 1/32
    of a pixel or more; under 255 the pixel is all object."""
    for size, pose in ((None, dict(rotation=33.0)), ((96, 64), dict(x=0.2, scale=0.9)),
                       ((64, 96), dict(y=0.8, look=world.Look(aspect=0.5)))):
        a = world.Scene(cls, "red", "gray", **pose)
        b = world.Scene(cls, "blue", "gray", **pose)
        c = world.Scene(cls, "red", "pink", **pose)
        mask = np.asarray(world.render_mask(a, size))
        image_a = np.asarray(world.render(a, size)).astype(int)
        assert mask.dtype == np.uint8 and mask.shape == image_a.shape[:2]
        color_change = np.abs(image_a - np.asarray(world.render(b, size))).max(-1)
        background_change = np.abs(image_a - np.asarray(world.render(c, size))).max(-1)
        assert color_change[mask == 0].max() <= 1
        assert (color_change[mask >= 8] > 0).all()
        assert background_change[mask == 255].max() <= 1 and (mask == 255).sum() > 50
        assert (background_change[mask < 248] > 0).all()
    if cls == "ring":  # the hole is background
        assert np.asarray(world.render_mask(world.Scene("ring", "red", "gray")))[32, 32] == 0


def test_wide_subject_fills_a_wide_frame_and_a_square_crop_cuts_it():
    assert world.WIDE_SUBJECT not in world.SUBJECTS.values()
    scenes = world.upright_scenes(world.WIDE_SUBJECT, 5)
    assert [s.background for s in scenes] == [
        s.background for s in world.subject_scenes(world.WIDE_SUBJECT, 5)]
    for scene in scenes:
        mask = np.asarray(world.render_mask(scene, size=(96, 64))) > 0
        columns, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
        width, height = columns[-1] - columns[0] + 1, rows[-1] - rows[0] + 1
        assert 72 <= width <= 90 and 15 <= height <= 24, (width, height)
        assert not mask[:, 0].any() and not mask[:, -1].any()  # whole in the wide frame
        assert mask[:, :16].any() and mask[:, 80:].any()  # cut by the centre 64x64 crop
    images = [np.asarray(world.render(s, (96, 64))) for s in scenes]
    assert all(not np.array_equal(a, b) for a, b in itertools.combinations(images, 2))


def test_photo_captions_name_each_photo_background_in_the_model_words():
    for subject in world.SUBJECTS.values():
        scenes = world.subject_scenes(subject)
        captions = world.photo_captions(subject, identifier="sks")
        assert len(captions) == 5 and len(set(captions)) == 5
        for scene, text in zip(scenes, captions):
            assert set(text.split()) <= set(world.VOCABULARY) | {"sks"}, text
            assert world.parse_prompt(text) == {"cls": subject.cls,
                                                "background": scene.background}
            assert text == f"a sks {subject.cls} {world.BACKGROUND_PHRASES[scene.background]}"
    masks = world.photo_masks("polka_ball", 3, size=(80, 64))
    assert [m.size for m in masks] == [(80, 64)] * 3 and {m.mode for m in masks} == {"L"}
    assert [p.size for p in world.photos("polka_ball", 3, size=(80, 64))] == [(80, 64)] * 3
