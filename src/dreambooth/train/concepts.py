"""Concepts: the subjects (or styles) a run learns, each with its photos, prompt and prior.

Three ways to name them, all ending in a list of `Concept`:
- plain DreamBooth: `--instance_data_dir` + `--instance_prompt` (+ `--class_data_dir`,
  `--class_prompt`): one concept;
- `--concepts FILE` (YAML or JSON): a list of mappings with the keys of `Concept`; the
  `concepts_list.json` of the widely used multi-concept DreamBooth scripts (instance_prompt,
  class_prompt, instance_data_dir, class_data_dir) is read unchanged;
- kohya's folders: an `--instance_data_dir` without photos of its own whose subfolders are
  named `N_prompt` (`10_sks dog`): one concept per subfolder, N repeats, prompt "sks dog"; the
  class flags apply to each.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dreambooth.images import IMAGE_EXTENSIONS

KOHYA_FOLDER = re.compile(r"(\d+)_(.+)")


@dataclass(frozen=True)
class Concept:
    """One subject: its photos and identifier prompt, optionally its class prior."""

    instance_data_dir: str
    instance_prompt: str
    class_data_dir: str | None = None
    class_prompt: str | None = None
    num_class_images: int | None = None  # None: the run's num_class_images
    repeats: int = 1  # how often each of its photos is drawn per epoch, relative to others
    loss_weight: float = 1.0  # multiplies its instance loss

    @property
    def class_key(self) -> tuple[str, str] | None:
        """(class_data_dir, class_prompt): concepts of one class share its class images."""
        if self.class_data_dir is None:
            return None
        return (str(Path(self.class_data_dir)), self.class_prompt)


CONCEPT_KEYS = tuple(field.name for field in dataclasses.fields(Concept))


def read_concepts_file(path: str | Path) -> list[Concept]:
    """Concepts from a YAML or JSON file; every problem raises ValueError with one line naming
    the file, the entry and the key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"concepts file '{path}' does not exist: pass a YAML or JSON list of "
                         "concepts")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ValueError(f"concepts file '{path}' is not a text file (not UTF-8)") from None
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"concepts file '{path}' is not valid "
                         f"{'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                         f"{str(error).splitlines()[0]}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"concepts file '{path}' must hold a non-empty list of concepts, each "
                         "a mapping with instance_data_dir and instance_prompt")
    return [_concept(entry, f"concepts file '{path}' entry {number}")
            for number, entry in enumerate(data, start=1)]


def _concept(entry: Any, where: str) -> Concept:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not a mapping; give instance_data_dir and instance_prompt")
    unknown = [key for key in entry if key not in CONCEPT_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key '{unknown[0]}' (known: "
                         f"{', '.join(CONCEPT_KEYS)})")
    for key in ("instance_data_dir", "instance_prompt"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise ValueError(f"{where}: {key} is required (a non-empty string)")
    for key in ("class_data_dir", "class_prompt"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise ValueError(f"{where}: {key}={entry[key]!r} must be a string")
    for key, kind in (("num_class_images", int), ("repeats", int), ("loss_weight", float)):
        value = entry.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and not float(value).is_integer()):
            expected = "an integer" if kind is int else "a number"
            raise ValueError(f"{where}: {key}={value!r} must be {expected}")
        minimum = 1 if key == "repeats" else 0
        if value < minimum:
            raise ValueError(f"{where}: {key}={value!r} must be at least {minimum}")
    folder = Path(entry["instance_data_dir"])
    if not folder.is_dir():
        raise ValueError(f"{where}: instance_data_dir '{folder}' does not exist or is not a "
                         "folder")
    if entry.get("class_data_dir") and not entry.get("class_prompt"):
        raise ValueError(f"{where}: class_prompt is required with class_data_dir")
    values = {key: entry[key] for key in CONCEPT_KEYS if entry.get(key) is not None}
    for key in ("num_class_images", "repeats"):
        if key in values:
            values[key] = int(values[key])
    if "loss_weight" in values:
        values["loss_weight"] = float(values["loss_weight"])
    return Concept(**values)


def kohya_concepts(folder: str | Path, *, class_data_dir: str | None,
                   class_prompt: str | None) -> list[Concept] | None:
    """Concepts of kohya's `N_prompt` subfolders, or None when `folder` holds photos itself
    (a plain DreamBooth folder) or no subfolder."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    entries = [path for path in folder.iterdir() if not path.name.startswith(".")]
    if any(path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS for path in entries):
        return None
    subfolders = sorted((path for path in entries if path.is_dir()), key=lambda p: p.name)
    if not subfolders:
        return None
    concepts = []
    for sub in subfolders:
        match = KOHYA_FOLDER.fullmatch(sub.name)
        if match is None or not match[2].strip() or int(match[1]) < 1:
            raise ValueError(f"instance_data_dir '{folder}' holds subfolders, read as kohya's "
                             f"'N_prompt' folders, but '{sub.name}' is not named so: rename it "
                             "like '10_sks dog' (10 repeats, prompt 'sks dog'), or move it out")
        concepts.append(Concept(instance_data_dir=str(sub), instance_prompt=match[2].strip(),
                                class_data_dir=class_data_dir, class_prompt=class_prompt,
                                repeats=int(match[1])))
    return concepts


def resolve_concepts(*, concepts_file: str | None, instance_data_dir: str | None,
                     instance_prompt: str | None, class_data_dir: str | None,
                     class_prompt: str | None, with_prior: bool) -> list[Concept]:
    """The run's concepts from its configuration (see the module docstring); prior images only
    where `with_prior` is set. Raises ValueError with one line for bad input."""
    if concepts_file:
        concepts = read_concepts_file(concepts_file)
    else:
        prior_dir = class_data_dir if with_prior else None
        prior_prompt = class_prompt if with_prior else None
        concepts = kohya_concepts(instance_data_dir, class_data_dir=prior_dir,
                                  class_prompt=prior_prompt)
        if concepts is None:
            if not instance_prompt:
                raise ValueError("instance_prompt is required (or name the subfolders of "
                                 "instance_data_dir like '10_sks dog', or pass --concepts)")
            concepts = [Concept(instance_data_dir=instance_data_dir,
                                instance_prompt=instance_prompt, class_data_dir=prior_dir,
                                class_prompt=prior_prompt)]
    if not with_prior:
        concepts = [dataclasses.replace(c, class_data_dir=None, class_prompt=None)
                    for c in concepts]
    elif not any(c.class_data_dir for c in concepts):
        raise ValueError("with_prior_preservation is set but no concept has a class_data_dir: "
                         "give the concepts class_data_dir and class_prompt")
    prompts: dict[str, str] = {}
    for concept in concepts:
        if concept.class_key is None:
            continue
        folder, prompt = concept.class_key
        if prompts.setdefault(folder, prompt) != prompt:
            raise ValueError(f"class_data_dir '{folder}' is given two class prompts "
                             f"({prompts[folder]!r} and {prompt!r}): its generated images can "
                             "have only one; give each class prompt its own folder")
    return concepts
