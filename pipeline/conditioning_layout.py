"""From a captured transformer call to stored conditioning, and back (docs/architecture.md, Teachers).

A pipeline calls its transformer with the latents, the timestep and everything else it conditions
on. :func:`split_call` turns the conditional call of one batch into

* ``tensors``: batch-first tensors, one row per sample, which the dataset stores: per-sample
  arguments (text embeddings, masks, guidance) as they are, shared tensors without a batch axis
  (position ids) repeated per row, and the reference-image tokens an edit pipeline appends to the
  latents (the part of the latent argument beyond the sample's own tokens);
* a JSON ``layout`` saying how each argument is rebuilt: ``latent`` (the state, with the stored
  reference tokens appended), ``timestep`` (from sigma, by the family), ``batched`` / ``shared``
  (a stored tensor, with its original dtype; ``key`` names it where it differs from the argument,
  e.g. ``arg_guidance`` since a dataset's own arrays use ``guidance``;
  ``tensor`` is an in-memory value, for layouts rebuilt from older datasets), ``per_sample`` (a python value repeated per sample,
  e.g. ``img_shapes``) or ``constant``.

:func:`replay` rebuilds the keyword arguments of the conditional call at any state and sigma, which
is how a student (and the teacher at states its sampler never visited) runs the transformer.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from arcflow.core.errors import ArcflowError
from arcflow.storage.format import RESERVED_ARRAYS

#: Stored key of the reference-image tokens appended to the latent argument.
REFERENCE_KEY = "reference_latents"

Layout = dict[str, dict[str, Any]]


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples pipelines build (``img_shapes`` holds ``(frames, h, w)``)."""
    if isinstance(value, list):
        inner = [_tuples(v) for v in value]
        return tuple(inner) if inner and all(isinstance(v, (int, float)) for v in inner) else inner
    return value


def _dtype_name(t: Tensor, model_dtype: torch.dtype) -> str:
    """``"model"`` for a tensor in the transformer's own dtype (it follows the model when the student
    loads in another dtype), else the recorded dtype's name."""
    return "model" if t.dtype == model_dtype else str(t.dtype).removeprefix("torch.")


def split_call(
    call: Mapping[str, Any], batch: int, tokens: int, latent_arg: str, timestep_arg: str,
    model_dtype: torch.dtype, shared_args: tuple[str, ...] = (),
) -> tuple[dict[str, Tensor], Layout]:
    """Stored tensors and the layout of one conditional transformer call over ``batch`` samples of
    ``tokens`` latent tokens (see the module docstring). ``shared_args`` name tensors that never
    carry a batch axis (needed when their first size could equal the batch)."""
    tensors: dict[str, Tensor] = {}
    layout: Layout = {}
    for name, value in call.items():
        if name == latent_arg:
            entry: dict[str, Any] = {"kind": "latent"}
            if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[1] > tokens:
                tensors[REFERENCE_KEY] = value[:, tokens:].detach()
                entry["reference"] = REFERENCE_KEY
            layout[name] = entry
        elif name == timestep_arg:
            layout[name] = {"kind": "timestep"}
        elif isinstance(value, Tensor):
            shared = name in shared_args or value.dim() == 0 or value.shape[0] != batch
            stored = value.detach().unsqueeze(0).expand(batch, *value.shape) if shared else value.detach()
            entry = {"kind": "shared" if shared else "batched", "dtype": _dtype_name(value, model_dtype)}
            if name in RESERVED_ARRAYS or name == REFERENCE_KEY:  # a dataset's own array names
                entry["key"] = f"arg_{name}"
            tensors[entry.get("key", name)] = stored
            layout[name] = entry
        elif isinstance(value, list) and len(value) == batch and batch > 0 and _jsonable(value) \
                and all(v == value[0] for v in value):
            layout[name] = {"kind": "per_sample", "value": json.loads(json.dumps(value[0]))}
        elif _jsonable(value):
            layout[name] = {"kind": "constant", "value": json.loads(json.dumps(value))}
        else:
            raise ArcflowError(
                f"cannot store the transformer argument {name!r} of type {type(value).__name__}: "
                "it is neither a tensor nor a JSON value"
            )
    return tensors, layout


def stored_key(layout: Layout, arg: str) -> str:
    """The conditioning key that holds transformer argument ``arg``."""
    return layout[arg].get("key", arg)


def replay(
    layout: Layout, x: Tensor, timestep: Tensor, cond: Mapping[str, Tensor], dtype: torch.dtype,
    device: torch.device, latent_input: Callable[[Tensor], Any] = lambda t: t,
) -> dict[str, Any]:
    """Keyword arguments of the conditional call at latents ``x`` with ``timestep`` (already mapped
    by the family). Floating tensors go to the model ``dtype``; others keep their recorded dtype."""
    kwargs: dict[str, Any] = {}
    batch = x.shape[0]
    for name, entry in layout.items():
        kind = entry["kind"]
        if kind == "latent":
            hidden = x.to(device, dtype)
            if "reference" in entry:
                ref = cond[entry["reference"]].to(device, dtype)
                hidden = torch.cat([hidden, ref], dim=1)
            kwargs[name] = latent_input(hidden)
        elif kind == "timestep":
            kwargs[name] = timestep
        elif kind in ("batched", "shared", "tensor"):
            value = entry["value"] if kind == "tensor" else cond[entry.get("key", name)]
            if kind == "shared":
                value = value[0]
            target = dtype if entry["dtype"] == "model" else getattr(torch, entry["dtype"])
            kwargs[name] = value.to(device=device, dtype=target)
        elif kind == "per_sample":
            kwargs[name] = [_tuples(entry["value"])] * batch
        elif kind == "constant":
            kwargs[name] = _tuples(entry["value"])
        else:
            raise ArcflowError(f"unknown conditioning layout kind {kind!r} for {name!r}")
    return kwargs
