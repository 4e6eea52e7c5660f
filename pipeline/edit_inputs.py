"""Prompts with reference images, for edit pipelines (FLUX.1 Kontext, Qwen-Image-Edit, FLUX.2).

A prompt stays one string everywhere (plans, shards, the ``prompt`` column a pandas user reads): a
text prompt is itself, an edit prompt is the canonical JSON ``{"prompt": text, "image": [paths]}``
(:func:`edit_prompt`). A JSON Lines prompts file gives one object per line, ``{"prompt": ...,
"image": "path"}`` or a list of paths, relative paths resolved against the file's folder.

The images are read only while the teacher encodes them; the dataset stores their latent tokens,
so nothing downstream opens the paths again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from arcflow.core.errors import ArcflowError, first_line, quote

#: Image files a pipeline is given are resized to at most this many pixels per side first.
MAX_IMAGE_SIDE = 8192
#: The longest prompt text taken: several times what any supported text encoder reads (FLUX's T5
#: 512 tokens, Qwen-Image's 1024), so a longer one is a mistake that would only cost tokenizer time.
MAX_PROMPT_CHARS = 10_000


def check_prompt_length(text: str, where: str) -> None:
    """One line naming ``where`` (a flag, a file's line) for a prompt longer than ``MAX_PROMPT_CHARS``."""
    if len(text) > MAX_PROMPT_CHARS:
        raise ArcflowError(f"{where}: the prompt is too long ({len(text)} characters); at most {MAX_PROMPT_CHARS}")


def edit_prompt(text: str, images: Sequence[str]) -> str:
    """The canonical string of a prompt with reference images (plain ``text`` without any)."""
    if not images:
        return text
    return json.dumps({"prompt": text, "image": [str(p) for p in images]}, ensure_ascii=False)


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """``(text, image paths)`` of a prompt string (see the module docstring)."""
    if prompt.startswith('{"prompt"'):
        try:
            data = json.loads(prompt)
        except json.JSONDecodeError:
            return prompt, []
        if isinstance(data, dict) and set(data) == {"prompt", "image"} and _is_paths(data["image"]):
            return str(data["prompt"]), list(data["image"])
    return prompt, []


def _is_paths(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(p, str) for p in value)


def plain_prompt(text: str, where: str) -> str:
    """``text`` as a plain-text prompt; ``ArcflowError`` (naming ``where``) when the string would not
    read back as itself but as an edit prompt: images come only from ``.jsonl`` files and ``--image``."""
    if parse_prompt(text) != (text, []):
        raise ArcflowError(f'{where} is a JSON edit prompt ("prompt" and "image"); plain-text prompts are plain text: '
                           "give prompts with reference images in a .jsonl file (or with --image)")
    return text


def has_images(prompts: Sequence[str]) -> bool:
    return any(parse_prompt(p)[1] for p in prompts)


def read_jsonl_prompts(path: str | Path, text: str) -> list[str]:
    """Prompts of a JSON Lines file (already read as ``text``): canonical edit prompt strings, each
    image path made absolute and checked to open as an image (one line per problem)."""
    base = Path(path).resolve().parent
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ArcflowError(f"{where} is not JSON: {exc.msg}") from None
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            raise ArcflowError(f'{where}: expected an object with a "prompt" string')
        check_prompt_length(data["prompt"], where)
        unknown = sorted(set(data) - {"prompt", "image"})
        if unknown:
            raise ArcflowError(f"{where}: unknown keys {', '.join(unknown)} (known: prompt, image)")
        images = data.get("image", [])
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            raise ArcflowError(f'{where}: "image" must be a path or a list of paths')
        for p in images:
            check_image_name(p)
        paths = [str((base / p).resolve()) for p in images]
        for p in paths:
            check_image(p)
        prompts.append(edit_prompt(data["prompt"], paths))
    if not prompts:
        raise ArcflowError(f"prompts file is empty: {path}")
    return prompts


def check_image(path: str) -> None:
    """``ArcflowError`` (one line) unless ``path`` opens as an image."""
    load_image(path)


def check_image_name(path: str) -> None:
    """A path no filesystem call can take (a NUL byte) is one line, before anything opens it."""
    if "\0" in str(path):
        raise ArcflowError(f"image path {quote(path)} contains a NUL byte")


def load_image(path: str) -> Any:
    """The RGB ``PIL.Image`` at ``path``; a missing or unreadable file, or one whose header claims
    more than ``MAX_IMAGE_SIDE`` pixels per side, is one line (the size is checked before decoding:
    PIL's decompression-bomb warning and error become that line too)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    check_image_name(path)
    p = Path(path)
    try:
        if not p.is_file():
            raise ArcflowError(f"image not found: {quote(path)}")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as image:
                _check_size(image.size, path)
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ArcflowError(f"image {quote(path)} is too large: its header claims more than {Image.MAX_IMAGE_PIXELS} "
                           f"pixels; at most {MAX_IMAGE_SIDE} per side") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc, 100)
        raise ArcflowError(f"cannot read image {quote(path)}: {reason}") from None


def _check_size(size: tuple[int, int], path: str) -> None:
    if max(size) > MAX_IMAGE_SIDE:
        raise ArcflowError(f"image {quote(path)} is {size[0]}x{size[1]}; at most {MAX_IMAGE_SIDE} per side")
