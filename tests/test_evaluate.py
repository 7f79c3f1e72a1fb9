"""The shipped world evaluator and DreamBench-mini's metrics behave as the paper's do."""

from __future__ import annotations

import pytest

from dreambooth import world
from dreambooth.world import evaluator as world_evaluator
from dreambooth.world import metrics


@pytest.fixture(scope="module")
def evaluator():
    return world_evaluator.load_evaluator()


def test_shipped_evaluator_is_accurate_on_fresh_renders(evaluator):
    accuracy = world_evaluator.held_out_accuracy(evaluator, n=300, seed=424242)
    assert min(accuracy[a] for a in world_evaluator.ATTRIBUTES) >= 0.98, accuracy


def test_subject_fidelity_recognizes_the_individual(evaluator):
    photos = {name: world.photos(name, 5, seed=0) for name in world.SUBJECTS}
    for name in world.SUBJECTS:
        new_photos = world.photos(name, 4, seed=1)  # new poses and backgrounds
        own = metrics.subject_fidelity(new_photos, photos[name], evaluator)
        others = [metrics.subject_fidelity(new_photos, photos[other], evaluator)
                  for other in world.SUBJECTS if other != name]
        assert own > max(others) + 0.1, (name, own, max(others))


def test_pres_is_low_for_plain_class_members_and_high_for_copies(evaluator):
    subject = world.DEMO_SUBJECT
    reference = world.photos(subject)
    rng = world.scene_rng(9)
    plain_members = [
        world.render(world.Scene(subject.cls, color, "white", **world.sample_pose(rng)))
        for color in ("red", "green", "orange", "purple", "blue")]
    collapsed = world.photos(subject, 5, seed=3)  # every "a ball" is the subject
    assert metrics.pres(plain_members, reference, evaluator) + 0.2 < metrics.pres(
        collapsed, reference, evaluator)


def test_prompt_fidelity_is_one_for_matching_renders_and_zero_for_wrong_ones(evaluator):
    scenes = world_evaluator.held_out_scenes(60, seed=777)
    images = [world.render(scene) for scene in scenes]
    assert metrics.prompt_fidelity(images, [world.caption(s) for s in scenes], evaluator) >= 0.95
    wrong = [world.Scene(world.CLASSES[(world.CLASSES.index(s.cls) + 1) % 4], s.color, s.background)
             for s in scenes]
    assert metrics.prompt_fidelity(images, [world.caption(s) for s in wrong], evaluator) <= 0.05
    # Identifier prompts check only what they state; one prompt applies to every image.
    ball = world.photos(world.DEMO_SUBJECT, 3)
    assert metrics.prompt_fidelity(ball, "a sks ball", evaluator) == 1.0
    assert metrics.prompt_fidelity(ball, {"cls": "star"}, evaluator) == 0.0
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        metrics.prompt_fidelity(ball, ["a ball", "a ball"], evaluator)


def test_div_is_zero_for_identical_images_and_grows_with_variety(evaluator):
    same = world.render(world.Scene("ring", "red", "dotted"))
    varied = [world.render(world.training_scene(5, n)) for n in range(4)]
    assert metrics.div([[same] * 4], evaluator) == pytest.approx(0.0, abs=1e-6)
    assert metrics.div([varied], evaluator) > 0.1
    assert 0.0 <= metrics.div([varied, [same, same]], evaluator) <= 1.0
