"""The project's procedural world: a deterministic renderer of captioned 64x64 scenes (also in
wider or taller frames, with object masks) and the subjects of DreamBench-mini. See `render`
(scenes, captions, the held-out split) and `subjects`.
"""

from dreambooth.world.render import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    CLASSES,
    COLORS,
    CONFLICTS,
    HELD_OUT_COMBINATIONS,
    IMAGE_SIZE,
    LOOK_PROBABILITY,
    PATTERNS,
    PLAIN,
    PLAIN_BACKGROUNDS,
    TEXTURE_BACKGROUNDS,
    TRAIN_COMBINATIONS,
    VOCABULARY,
    Look,
    Scene,
    all_combinations,
    caption,
    held_out_captions,
    parse_prompt,
    render,
    render_array,
    render_mask,
    sample_look,
    sample_pose,
    sample_scene,
    scene_rng,
)
from dreambooth.world.subjects import (
    DEMO_SUBJECT,
    SUBJECT_LOOKS,
    SUBJECTS,
    WIDE_SUBJECT,
    Subject,
    class_prompt,
    dreambench_prompts,
    held_out_subjects,
    iter_training_scenes,
    photo_captions,
    photo_masks,
    photos,
    subject_scenes,
    training_scene,
    upright_scenes,
)

__all__ = [
    "BACKGROUND_PHRASES", "BACKGROUNDS", "CLASSES", "COLORS", "CONFLICTS", "DEMO_SUBJECT",
    "HELD_OUT_COMBINATIONS", "IMAGE_SIZE", "LOOK_PROBABILITY", "PATTERNS", "PLAIN",
    "PLAIN_BACKGROUNDS", "SUBJECTS", "SUBJECT_LOOKS", "Subject", "TEXTURE_BACKGROUNDS",
    "TRAIN_COMBINATIONS", "VOCABULARY", "WIDE_SUBJECT", "Look", "Scene", "all_combinations",
    "caption", "class_prompt", "dreambench_prompts", "held_out_captions", "held_out_subjects",
    "iter_training_scenes",
    "parse_prompt", "photo_captions", "photo_masks", "photos", "render", "render_array",
    "render_mask", "sample_look", "sample_pose", "sample_scene", "scene_rng", "subject_scenes",
    "training_scene", "upright_scenes",
]
