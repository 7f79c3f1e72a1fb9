"""Prompt files: one prompt a line, blank lines and '#' comments skipped.

Read by `dreambooth train --validation_prompts FILE` and `dreambooth eval --prompts FILE`; every
problem is one line that names the file and says what to pass instead.
"""

from __future__ import annotations

from pathlib import Path

MAX_FILE_BYTES = 1 << 20  # 1 MiB: far more than any list of prompts a run samples


class PromptFileError(ValueError):
    """A prompt file that is missing, not text, empty or too long; the message names it."""


def read_prompt_file(path: str | Path, *, flag: str = "--prompts",
                     limit: int | None = None) -> list[str]:
    """The prompts of a text file, one a line, stripped; blank lines and lines starting with
    '#' are skipped. Raises PromptFileError when there is none or more than `limit`."""
    path = Path(path)
    where = f"{flag} file '{path}'"
    if path.is_dir():
        raise PromptFileError(f"{where} is a folder; pass a text file with one prompt a line")
    if not path.is_file():
        raise PromptFileError(f"{where} does not exist; pass a text file with one prompt a line")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise PromptFileError(f"{where} is larger than {MAX_FILE_BYTES // 1024} KiB; pass a "
                                  "text file with one prompt a line")
        data = path.read_bytes()
    except OSError as error:
        raise PromptFileError(f"cannot read {where}: {error.strerror}") from None
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1,
                                     "NUL byte")
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PromptFileError(f"{where} is not a text file (not UTF-8 text); pass a text file "
                              "with one prompt a line") from None
    prompts = [line.strip() for line in text.splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise PromptFileError(f"{where} holds no prompt (only blank lines and '#' comments); "
                              "write one prompt a line")
    if limit is not None and len(prompts) > limit:
        raise PromptFileError(f"{where} holds {len(prompts)} prompts, more than {limit}; keep "
                              f"at most {limit}")
    return prompts
