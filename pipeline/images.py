"""Writing generated images: PNG grids for people, ``.npy`` arrays for programs; each file is
written whole or not at all (:func:`~arcflow.core.files.atomic_outputs`).

Images are ``(N, C, H, W)`` float tensors in [0, 1] (C = 1 grayscale or 3 RGB).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from arcflow.core.errors import ArcflowError, quote
from arcflow.core.files import atomic_outputs

IMAGE_SUFFIXES = (".png", ".npy")


def check_image_path(path: str | Path) -> Path:
    """Raise ``ArcflowError`` unless ``path`` ends in a supported suffix (``.png`` or ``.npy``)."""
    p = Path(path)
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise ArcflowError(f"unsupported output {quote(p)}: --out must end in .png (a grid) or .npy (an array)")
    check_writable_file(p)
    return p


def check_writable_file(path: Path) -> None:
    """Refuse, before any work, an output file whose directory is missing or that is a directory."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ArcflowError(f"{path}: the directory {parent} does not exist (or is not a directory); create it first")
    if path.is_dir():
        raise ArcflowError(f"{path} is a directory; give a file name")


def _to_uint8(images: Tensor) -> np.ndarray:
    return (images.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


def save_grid(
    images: Tensor, path: str | Path, nrow: int | None = None, cell: int = 64, pad: int = 2,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Save ``(N, C, H, W)`` images as one PNG grid, ``nrow`` images per row (default ~square).

    Each image is upscaled (nearest neighbour) so its longer side is about ``cell`` pixels.
    ``row_labels`` (one per grid row) are written in a margin left of the rows.
    """
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ArcflowError(f"cannot write {c}-channel images as PNG")
    nrow = nrow or math.ceil(math.sqrt(n))
    scale = max(1, cell // max(h, w))
    pixels = _to_uint8(images).transpose(0, 2, 3, 1).repeat(scale, 1).repeat(scale, 2)
    rows = math.ceil(n / nrow)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} grid rows")
    font = ImageFont.load_default()
    margin = pad + max((int(font.getlength(t)) for t in row_labels), default=0) + 2 * pad if row_labels else 0
    ch, cw = h * scale, w * scale
    canvas = np.full((pad + rows * (ch + pad), margin + pad + nrow * (cw + pad), c), 128, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (ch + pad), margin + pad + col * (cw + pad)
        canvas[y : y + ch, x : x + cw] = pixels[i]
    image = Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode="L" if c == 1 else "RGB")
    if row_labels:
        draw = ImageDraw.Draw(image)
        white = 255 if c == 1 else (255, 255, 255)
        for r, text in enumerate(row_labels):
            draw.text((pad, pad + r * (ch + pad) + ch // 2), text, fill=white, font=font, anchor="lm")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_outputs([out]) as (temp,):
        image.save(temp)
    return out


def save_npy(images: Tensor, path: str | Path) -> Path:
    """Save float32 images in [0, 1]: ``[N, H, W]`` for grayscale, ``[N, H, W, C]`` for colour."""
    arr = images.detach().float().cpu().clamp(0, 1).numpy()
    arr = arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_outputs([out]) as (temp,):
        np.save(temp, arr.astype(np.float32))
    return out


def write_images(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write ``images`` as a PNG grid or an ``.npy`` array, chosen by the suffix of ``path``."""
    p = check_image_path(path)
    return save_npy(images, p) if p.suffix.lower() == ".npy" else save_grid(images, p, nrow)
