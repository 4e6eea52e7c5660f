"""``call_options`` (``--call-option KEY=VALUE``): further ``__call__`` arguments of a diffusers
pipeline, JSON values, passed on every call arcflow makes.

:func:`check_call_options` refuses, in one line naming the option, what cannot apply: an argument
the pipeline's ``__call__`` does not take, one arcflow sets itself, one the pipeline derives from
its other inputs (tensors, images, generators: nothing JSON gives), and a value of the wrong type
for the argument's annotation (or default) — checked against the pipeline CLASS, so a local
pipeline directory's options are refused before Ray starts or any weight loads.
"""

from __future__ import annotations

import inspect
import json
import math
import types
import typing
from typing import Any, Mapping, Optional, Union

from arcflow.core.errors import ArcflowError, clip, quote

#: ``__call__`` arguments arcflow sets itself (the schedule included); ``call_options`` may not override them.
ARCFLOW_CALL_ARGUMENTS = frozenset({
    "prompt", "prompt_2", "prompt_3", "image", "height", "width", "num_inference_steps", "sigmas", "timesteps", "mu",
    "latents", "output_type", "return_dict", "generator", "num_images_per_prompt", "guidance_scale", "true_cfg_scale",
    "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "callback_on_step_end", "max_area", "_auto_resize",
})
#: Annotations a JSON value can be.
_SCALARS = (bool, int, float, str)


def check_call_options(pipeline_class: type, options: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """``options`` as a dict when ``pipeline_class.__call__`` takes every one as given; else one line."""
    if not options:
        return {}
    if not isinstance(options, Mapping):
        raise ArcflowError(f"call_options must be a mapping of __call__ arguments, got {type(options).__name__}")
    name = pipeline_class.__name__
    params = inspect.signature(pipeline_class.__call__).parameters
    hints = _hints(pipeline_class)
    for key, value in options.items():
        flag = f"--call-option {clip(key)}"
        if key not in params:
            raise ArcflowError(f"{flag}: {name}.__call__ takes no such argument")
        if key in ARCFLOW_CALL_ARGUMENTS:
            raise ArcflowError(f"{flag}: arcflow sets this argument itself")
        if not _finite_json(value):
            raise ArcflowError(f"{flag}: the value must be JSON (numbers finite), got {quote(value)}")
        annotation = _annotation(params[key], hints.get(key, inspect.Parameter.empty))
        if not _jsonable(annotation):
            raise ArcflowError(f"{flag}: a {name} derives this argument ({_describe(annotation)}) from its other "
                               "inputs; --call-option gives JSON values only")
        if not _fits(value, annotation):
            raise ArcflowError(f"{flag} must be {_describe(annotation)} for a {name}, got {quote(json.dumps(value))}")
    return dict(options)


def _hints(pipeline_class: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(pipeline_class.__call__)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: checked by its default only
        return {}


def _annotation(param: inspect.Parameter, hint: Any) -> Any:
    """The argument's type: its annotation, else its default's type (None and no default: any)."""
    if hint is not inspect.Parameter.empty and not isinstance(hint, str):
        return hint
    default = param.default
    if default is inspect.Parameter.empty or default is None:
        return Any
    return type(default)


def _alternatives(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _jsonable(annotation: Any) -> bool:
    """Whether some JSON value (other than null) is of type ``annotation``."""
    for alt in _alternatives(annotation):
        origin = typing.get_origin(alt) or alt
        if alt is Any or alt in _SCALARS or origin in (dict, list, tuple):
            args = [a for a in typing.get_args(alt) if a is not Ellipsis]
            if origin is dict or not args or all(_jsonable(a) for a in args):
                return True
    return False


def _fits(value: Any, annotation: Any) -> bool:
    """Whether the JSON ``value`` is of type ``annotation``."""
    for alt in _alternatives(annotation):
        origin = typing.get_origin(alt) or alt
        if alt is Any or (alt is type(None) and value is None):
            return True
        if alt is bool and isinstance(value, bool):
            return True
        if alt in (int, float) and isinstance(value, int) and not isinstance(value, bool):
            return True
        if alt is float and isinstance(value, float) or alt is str and isinstance(value, str):
            return True
        if origin is dict and isinstance(value, dict):
            return True
        if origin in (list, tuple) and isinstance(value, list):
            items = [a for a in typing.get_args(alt) if a is not Ellipsis]
            if all(any(_fits(v, a) for a in items) for v in value) if items else True:
                return True
    return False


def _finite_json(value: Any) -> bool:
    """JSON data without NaN or infinities (Python's json module reads them; JSON has none)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _finite_json(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, str))


def _describe(annotation: Any) -> str:
    """``int``, ``list[float] | None``, ``torch.FloatTensor | None``: an annotation as a user reads it."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")
