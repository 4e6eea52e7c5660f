"""The embedded teacher's prompts, importable without torch or diffusers: the driver of a
generation job checks a prompts file against them before any cluster starts."""

from __future__ import annotations

from typing import Sequence

from arcflow.core.errors import ArcflowError, quote


def digit_prompt(digit: int) -> str:
    """The prompt for one digit, e.g. ``"a handwritten digit 7"``."""
    return f"a handwritten digit {digit}"


PROMPTS: tuple[str, ...] = tuple(digit_prompt(d) for d in range(10))


def normalize_prompt(prompt: str) -> str:
    """Lower-case and collapse whitespace, so ``"A  handwritten digit 7 "`` is understood."""
    return " ".join(prompt.lower().split())


def is_known_prompt(prompt: str) -> bool:
    """Whether the teacher was trained on this prompt (the ten digit prompts or ``""``)."""
    norm = normalize_prompt(prompt)
    return norm == "" or norm in PROMPTS


def check_digits_prompts(prompts: Sequence[str]) -> None:
    """One ``ArcflowError`` line, quoting at most ~100 characters of it, for the first prompt the
    teacher does not understand."""
    for prompt in prompts:
        if not is_known_prompt(prompt):
            raise ArcflowError(
                f"teacher 'digits' does not understand the prompt {quote(prompt)}; it understands "
                f"'{PROMPTS[0]}' .. '{PROMPTS[-1]}' (and '' for unconditional)"
            )
