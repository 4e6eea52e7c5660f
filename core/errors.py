"""The one exception type that means "the user's input is wrong", shared by every layer.

The CLI prints its message as a single line and exits with status 2; library callers can catch it.
The checks below are what every stage's configuration uses to refuse bad numbers before anything
starts, and :func:`first_line` is the one rule for quoting another library's exception in a line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Iterable, Mapping


#: Set by ``--verbose`` (or by the user, for scripts): full tracebacks, and Ray's worker errors on the terminal.
TRACEBACK_ENV = "ARCFLOW_TRACEBACK"
#: How many characters of a user's input (a prompt, an id, an address) an error line quotes.
QUOTE_LIMIT = 100
#: The longest error line printed: a last resort, messages quote at most ~100 characters of input.
MAX_LINE = 1000


def verbose() -> bool:
    """Whether ``--verbose`` (or ``ARCFLOW_TRACEBACK=1``) asked for tracebacks and library noise."""
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def quote(text: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(text)``, cut to its first ``limit`` characters and its length when longer: how an error
    line quotes user input, which may be a megabyte long."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def clip(text: object, limit: int = QUOTE_LIMIT) -> str:
    """``text`` as it is (a path, a class name), cut like :func:`quote` when longer than ``limit``."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def one_line(message: object) -> str:
    """``message`` as the CLI prints it: one line (whitespace collapsed), every word longer than
    twice ``QUOTE_LIMIT`` (input no message quoted through :func:`quote` or :func:`clip`) cut to
    ``QUOTE_LIMIT`` characters, and the whole at most ``MAX_LINE``."""
    words = [w if len(w) <= 2 * QUOTE_LIMIT else clip(w) for w in str(message).split()]
    line = " ".join(words)
    return line if len(line) <= MAX_LINE else f"{line[: MAX_LINE - 40]}... ({len(line)} characters)"


class ArcflowError(Exception):
    """Bad input (a path, a flag value, a dataset): the message is a complete one-line explanation."""


#: What a JSON value that is not an object is, by its Python type.
_JSON_KINDS = {list: "a JSON array", str: "a JSON string", int: "a JSON number", float: "a JSON number",
               bool: "a JSON boolean", type(None): "JSON null"}


def json_object(text: str | bytes, where: object) -> dict:
    """``text`` parsed as a JSON object; one line naming ``where`` when it is not JSON, or is JSON of
    another kind (``[]`` "holds a JSON array, not a JSON object": valid JSON, the wrong shape)."""
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArcflowError(f"{where} is not valid JSON ({first_line(exc)})") from None
    if not isinstance(value, dict):
        raise ArcflowError(f"{where} holds {_JSON_KINDS.get(type(value), 'a JSON value')}, not a JSON object")
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: Seeds are unsigned 32-bit: numpy's SeedSequence and torch's generators both take them as they are.
MAX_SEED = 2**32 - 1


def check_numbers(
    config: object,
    positive: Iterable[str] = (),
    non_negative: Iterable[str] = (),
    at_most: Mapping[str, float] = {},
) -> None:
    """Refuse, as one ``ArcflowError`` line naming the flag, a configuration dataclass whose numbers no
    run can use: any float field that is NaN or infinite, ``positive`` fields below 1, ``non_negative``
    fields below 0, fields above their ``at_most`` bound, and a ``seed`` outside ``[0, MAX_SEED]``."""
    for f in fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ArcflowError(f"{_flag(f.name)} must be a finite number, got {value}")
    for name in positive:
        if getattr(config, name) < 1:
            raise ArcflowError(f"{_flag(name)} must be >= 1, got {getattr(config, name)}")
    for name in non_negative:
        if getattr(config, name) < 0:
            raise ArcflowError(f"{_flag(name)} must be >= 0, got {getattr(config, name)}")
    for name, bound in at_most.items():
        if getattr(config, name) > bound:
            raise ArcflowError(f"{_flag(name)} must be at most {bound}, got {getattr(config, name)}")
    seed = getattr(config, "seed", None)
    if seed is not None:
        check_seed(seed)


def check_seed(seed: int, flag: str = "--seed") -> None:
    """A seed is an integer in ``[0, MAX_SEED]``; anything else is refused in one line."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ArcflowError(f"{flag} must be an integer from 0 to {MAX_SEED}, got {seed!r}")


def check_finite(flag: str, value: float | None, minimum: float | None = None) -> None:
    """One CLI float option: finite (None passes), and at least ``minimum`` when given."""
    if value is None:
        return
    if not math.isfinite(value):
        raise ArcflowError(f"{flag} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ArcflowError(f"{flag} must be >= {minimum:g}, got {value}")


def refuse_overwrite(out: "os.PathLike[str] | str", names: Iterable[str], overwrite: bool) -> None:
    """Refuse an output directory that already holds any of ``names`` (an earlier result), unless
    ``overwrite``; also refuse an ``out`` that is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArcflowError(f"--out {out} exists and is not a directory")
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise ArcflowError(
            f"--out {out} already holds {', '.join(existing)}; pass --overwrite to replace it or choose another --out"
        )


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``exc``'s message (its type name when it has none), cut to
    ``limit`` characters: how another library's exception is quoted inside one of our lines."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
