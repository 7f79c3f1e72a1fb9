"""Per-image captions: sidecar files, diffusers' metadata.jsonl, [trigger], dropout and shuffle.

A photo's caption comes from, in this order:
1. its sidecar file, `photo.jpg` -> `photo.txt` (`caption_extension`; kohya's and ai-toolkit's
   convention);
2. the folder's `metadata.jsonl`, one JSON object a line with `file_name` and `text`
   (diffusers' ImageFolder convention);
3. else its concept's instance prompt, as in plain DreamBooth.
`[trigger]` in a caption stands for the concept's identifier phrase (its instance prompt).

At each step an instance sample's caption may be dropped (replaced by "") and its
comma-separated tags shuffled, the first `keep_tokens` staying in place (kohya's
`--shuffle_caption --keep_tokens`); both are drawn from the sample's own seeded stream
(`seeding.CAPTION`), so a resumed run sees the captions an uninterrupted one would.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth import seeding
from dreambooth.images import IMAGE_EXTENSIONS, list_image_files

TRIGGER = "[trigger]"
METADATA_FILE = "metadata.jsonl"


@dataclass(frozen=True)
class CaptionSettings:
    """How captions vary from step to step."""

    dropout_rate: float = 0.0  # probability a sample's caption becomes ""
    shuffle: bool = False  # shuffle the comma-separated tags
    keep_tokens: int = 0  # the first N tags stay in place when shuffling


def is_companion(path: Path, caption_extension: str) -> bool:
    """A file beside the photos that is not a photo: metadata.jsonl, a mask (`*.mask.png`), or
    a caption of a photo that is there (an orphan `notes.txt` is still warned about)."""
    name = path.name.lower()
    if name == METADATA_FILE or Path(name).stem.endswith(".mask"):
        return True
    if not name.endswith(caption_extension.lower()):
        return False
    stem = path.name[:-len(caption_extension)]
    return any(path.with_name(stem + ext).exists() or path.with_name(stem + ext.upper()).exists()
               for ext in IMAGE_EXTENSIONS)


def read_metadata(folder: Path) -> dict[str, str]:
    """{file_name: text} from `folder/metadata.jsonl`, or {} without one.

    A line that is not a JSON object with string `file_name` and `text` raises ValueError
    naming the file and the line.
    """
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"'{path}' is not a text file (not UTF-8): write one JSON object a "
                         'line, e.g. {"file_name": "photo.jpg", "text": "a sks dog"}') from None
    captions: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"'{path}' line {number} is not JSON ({error.msg}): write one "
                             'object a line, e.g. {"file_name": "photo.jpg", "text": "a sks '
                             'dog"}') from None
        if not (isinstance(entry, dict) and isinstance(entry.get("file_name"), str)
                and isinstance(entry.get("text"), str)):
            raise ValueError(f"'{path}' line {number} needs string keys 'file_name' and "
                             f"'text', e.g. {{\"file_name\": \"photo.jpg\", \"text\": \"a sks "
                             "dog\"}")
        captions[entry["file_name"]] = entry["text"]
    return captions


def read_caption(image: Path, caption_extension: str, metadata: dict[str, str]
                 ) -> tuple[str | None, str | None]:
    """(caption, problem) of one photo: caption None means "use the instance prompt"; problem
    is a warning to give (an empty or binary caption file), naming the file."""
    sidecar = image.with_suffix(caption_extension)
    if sidecar.is_file():
        try:
            text = sidecar.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, (f"caption file '{sidecar}' is not text (not UTF-8): the instance "
                          "prompt is used for its photo")
        except OSError as error:
            return None, f"cannot read caption file '{sidecar}' ({error.strerror}): the " \
                         "instance prompt is used for its photo"
        if not text:
            return None, f"caption file '{sidecar}' is empty: the instance prompt is used " \
                         "for its photo"
        return text, None
    text = metadata.get(image.name)
    if text is None:
        return None, None
    if not text.strip():
        return None, (f"{METADATA_FILE} gives '{image.name}' an empty text: the instance "
                      "prompt is used for it")
    return text.strip(), None


def apply_trigger(caption: str, identifier: str) -> str:
    """Replace `[trigger]` with the concept's identifier phrase (e.g. 'sks dog')."""
    return caption.replace(TRIGGER, identifier)


def warn_truncated(captions: dict[str, str], tokenizer) -> list[str]:
    """Warn once per run about captions longer than the tokenizer's limit (they are cut there).

    `captions` maps a source (file name) to its text. Returns the sources of long captions.
    """
    limit = tokenizer.model_max_length
    long = [source for source, text in captions.items()
            if len(tokenizer(text, truncation=False).input_ids) > limit]
    if long:
        shown = ", ".join(f"'{source}'" for source in long[:3])
        more = f" and {len(long) - 3} more" if len(long) > 3 else ""
        warnings.warn(f"{len(long)} caption(s) are longer than the text encoder's {limit} "
                      f"tokens and are truncated there: {shown}{more}", UserWarning, stacklevel=2)
    return long


def shuffle_tags(caption: str, keep_tokens: int, generator: torch.Generator) -> str:
    """kohya's tag shuffle: comma-separated tags in a random order, the first `keep_tokens`
    in place."""
    tags = [tag.strip() for tag in caption.split(",")]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return ", ".join(kept + [rest[i] for i in order])


def step_caption(caption: str, settings: CaptionSettings, seed: int, sample: int) -> str:
    """The caption instance sample number `sample` trains with: dropped or shuffled, a pure
    function of (seed, sample)."""
    if not settings.dropout_rate and not settings.shuffle:
        return caption
    generator = seeding.generator(seed, seeding.CAPTION, sample)
    if settings.dropout_rate and float(torch.rand((), generator=generator)) < settings.dropout_rate:
        return ""
    if settings.shuffle:
        return shuffle_tags(caption, settings.keep_tokens, generator)
    return caption


def concept_captions(folder: str | Path, identifier: str, caption_extension: str
                     ) -> dict[Path, str]:
    """{photo path: caption} of every photo in a concept's folder, `[trigger]` replaced by
    `identifier` (the concept's instance prompt, also the caption of photos without one).
    Empty or binary caption files are warned about, naming the file."""
    folder = Path(folder)
    metadata = read_metadata(folder)
    captions = {}
    for image in list_image_files(folder, lambda p: is_companion(p, caption_extension)):
        caption, problem = read_caption(image, caption_extension, metadata)
        if problem:
            warnings.warn(problem, UserWarning, stacklevel=2)
        captions[image] = apply_trigger(caption or identifier, identifier)
    return captions
