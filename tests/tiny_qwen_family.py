"""Tiny, randomly initialized Qwen-Image pipelines WITH a real text encoder, built offline.

``tiny_qwen_image_pipeline_te()``: a stock ``QwenImagePipeline`` whose ``text_encoder`` is a tiny
``Qwen2_5_VLForConditionalGeneration`` and whose ``tokenizer`` is a tiny byte-level BPE
``Qwen2Tokenizer`` (vocab/merges trained in memory with the ``tokenizers`` library on the pipelines'
prompt templates + :data:`WORDS`), so ``pipe(prompt="a red cat")`` works. Every word of the two
prompt templates is ONE token, so the templates' system prefixes tokenize to exactly
``prompt_template_encode_start_idx`` tokens (34 for QwenImagePipeline, 64 for the Edit pipelines),
as with the real Qwen tokenizer: the drop index removes exactly the system prefix.

``tiny_qwen_image_edit_plus_pipeline()``: a stock ``QwenImageEditPlusPipeline`` with the same
tokenizer (plus vision special tokens), a Qwen2-VL processor whose image processor resizes a square
condition image to 56x56 pixels (4x4 patches of 14 -> 4 vision tokens after the 2x2 merge) and the
tiny Qwen2.5-VL with a 2-block vision tower.

EditPlus always VAE-encodes every reference image at ~1024*1024 pixels (module constant
``VAE_IMAGE_SIZE`` in diffusers' ``pipeline_qwenimage_edit_plus``; the tiny VAE's mid-block attention
makes that take ~100 s on CPU). Run tiny EditPlus pipelines inside :func:`tiny_edit_plus_sizes`,
which patches that constant (default 32*32 pixels -> 16x16 latents -> 64 reference tokens), and
always pass ``height``/``width`` (the default is the 1024*1024-area size, hard-coded).

The transformer, VAE and scheduler are those of ``tests/tiny_pipelines.py``'s tiny Qwen pipeline
(VAE scale 2 and 2x2 patches: a 32x32 image is 16x16 latents = 8x8 = 64 tokens of 16 channels).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from tiny_pipelines import TEXT_DIM, WORDS, tiny_qwen_image_components

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)
# The VL image processor's pixel bounds: a square condition image becomes 56x56 pixels = 4x4 patches of 14 = 4
# vision tokens after the 2x2 merge (smart_resize floors to multiples of 28 within [56*56, 64*64]).
CONDITION_MIN_PIXELS, CONDITION_MAX_PIXELS = 56 * 56, 64 * 64
VAE_PIXELS = 32 * 32  # tiny_edit_plus_sizes' default VAE_IMAGE_SIZE


def _bpe_vocab_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab/merges over the Qwen pre-tokenizer in which every template word is one token
    (deterministic: the same result under any PYTHONHASHSEED)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words = " ".join(WORDS)
    corpus = [
        T2I_TEMPLATE.format(words),
        EDIT_TEMPLATE.format("Picture 1: Picture 2: Picture 3: " + words),
        " ".join(w.capitalize() for w in WORDS),
    ]
    for s in SPECIAL_TOKENS:
        corpus = [c.replace(s, "\n") for c in corpus]
    trainer = trainers.BpeTrainer(
        vocab_size=1000, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def tiny_qwen_tokenizer():
    """A tiny ``Qwen2Tokenizer`` (byte-level BPE) with Qwen's chat and vision special tokens appended."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _bpe_vocab_merges()
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)  # <|endoftext|> = unk/eos/pad
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tok


def _token_ids(tokenizer) -> dict[str, int]:
    return {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}


def tiny_qwen_vl_text_encoder(tokenizer, seed: int = 0):
    """A tiny ``Qwen2_5_VLForConditionalGeneration``: 2-layer text model of width ``TEXT_DIM`` (the
    transformer's ``joint_attention_dim``), 2-block vision tower (patch 14, 2x2 merge) projecting to it."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = _token_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[1, 1, 2]),
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2, hidden_size=16, intermediate_size=32, num_heads=2, in_channels=3, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=TEXT_DIM,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _processor_class():
    """``Qwen2VLProcessor`` when torchvision is installed; otherwise :class:`Qwen2VLTextImageProcessor`."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import Qwen2VLProcessor

        return Qwen2VLProcessor
    return Qwen2VLTextImageProcessor


def _make_text_image_processor_class():
    from transformers import Qwen2VLProcessor

    class Qwen2VLTextImageProcessor(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` without its video processor. In transformers 5.x ``Qwen2VLProcessor`` cannot be
        constructed (nor loaded) without torchvision: ``ProcessorMixin`` requires a ``video_processor`` whose class
        (``VideoProcessorMixin`` / ``Qwen2VLVideoProcessor``) is only exported with torchvision, and the CPU
        torchvision wheel is not installable here. Dropping ``video_processor`` from ``__init__``'s signature
        makes ``get_attributes()`` = [image_processor, tokenizer]; text + image processing is unchanged.
        Saved by diffusers as library ``tiny_qwen_family`` (importable because tests/ is on sys.path)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    Qwen2VLTextImageProcessor.__module__ = __name__
    Qwen2VLTextImageProcessor.__qualname__ = "Qwen2VLTextImageProcessor"
    return Qwen2VLTextImageProcessor


Qwen2VLTextImageProcessor = _make_text_image_processor_class()
# diffusers loads a component of a non-library module (model_index.json: ["tiny_qwen_family", ...]) by looking
# its base classes (ProcessorMixin -> from_pretrained) up in THIS module's namespace.
from transformers import ProcessorMixin  # noqa: E402,F401


def tiny_qwen_vl_processor(tokenizer):
    """The Qwen2-VL processor (PIL-backend image processor when torchvision is absent) bounded to
    56*56..64*64 pixels per condition image + the tiny tokenizer."""
    try:  # transformers >= 5 without torchvision: the PIL backend (Qwen2VLImageProcessor falls back to it too)
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import Qwen2VLImageProcessor as ImageProcessor
    image_processor = ImageProcessor(
        size={"shortest_edge": CONDITION_MIN_PIXELS, "longest_edge": CONDITION_MAX_PIXELS},
        patch_size=14, temporal_patch_size=2, merge_size=2,
    )
    cls = _processor_class()
    if cls is Qwen2VLTextImageProcessor:
        return cls(image_processor=image_processor, tokenizer=tokenizer)
    from transformers import Qwen2VLVideoProcessor  # pragma: no cover - needs torchvision

    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())


def tiny_qwen_image_te_components(seed: int = 0) -> dict[str, Any]:
    components = tiny_qwen_image_components(seed)  # scheduler, vae (seed+1), transformer (seed)
    tokenizer = tiny_qwen_tokenizer()
    components["tokenizer"] = tokenizer
    components["text_encoder"] = tiny_qwen_vl_text_encoder(tokenizer, seed + 2)
    return components


def tiny_qwen_image_te_pipeline(seed: int = 0):
    """A stock ``QwenImagePipeline`` with a tiny Qwen2.5-VL text encoder and tokenizer."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**tiny_qwen_image_te_components(seed))


def save_tiny_qwen_image_te_pipeline(directory: str | os.PathLike, seed: int = 0) -> Path:
    out = Path(directory)
    tiny_qwen_image_te_pipeline(seed).save_pretrained(str(out))
    return out


def tiny_qwen_image_edit_plus_components(seed: int = 0, zero_cond_t: bool = False) -> dict[str, Any]:
    """``zero_cond_t=True`` builds the transformer like Qwen-Image-Edit-2511 (reference tokens modulated
    with timestep 0); the default is Qwen-Image-Edit-2509's."""
    from diffusers import QwenImageTransformer2DModel

    components = tiny_qwen_image_te_components(seed)
    if zero_cond_t:
        torch.manual_seed(seed)
        cfg = dict(components["transformer"].config)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        cfg["zero_cond_t"] = True
        components["transformer"] = QwenImageTransformer2DModel(**cfg).eval()
    components["processor"] = tiny_qwen_vl_processor(components["tokenizer"])
    return components


def tiny_qwen_image_edit_plus_pipeline(seed: int = 0, zero_cond_t: bool = False):
    """A stock ``QwenImageEditPlusPipeline``; call it inside :func:`tiny_edit_plus_sizes` with height/width."""
    from diffusers import QwenImageEditPlusPipeline

    return QwenImageEditPlusPipeline(**tiny_qwen_image_edit_plus_components(seed, zero_cond_t))


def save_tiny_qwen_image_edit_plus_pipeline(
    directory: str | os.PathLike, seed: int = 0, zero_cond_t: bool = False
) -> Path:
    out = Path(directory)
    tiny_qwen_image_edit_plus_pipeline(seed, zero_cond_t).save_pretrained(str(out))
    return out


@contextlib.contextmanager
def tiny_edit_plus_sizes(vae_pixels: int = VAE_PIXELS, condition_pixels: int | None = None):
    """Patch diffusers' EditPlus module constants ``VAE_IMAGE_SIZE`` (the pixel area every reference image is
    resized to before VAE encoding; stock 1024*1024) and optionally ``CONDITION_IMAGE_SIZE`` (the area of the
    condition image given to the VL processor; stock 384*384) for the duration of the block."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as mod

    old = mod.VAE_IMAGE_SIZE, mod.CONDITION_IMAGE_SIZE
    mod.VAE_IMAGE_SIZE = vae_pixels
    if condition_pixels is not None:
        mod.CONDITION_IMAGE_SIZE = condition_pixels
    try:
        yield
    finally:
        mod.VAE_IMAGE_SIZE, mod.CONDITION_IMAGE_SIZE = old


def tiny_image(seed: int = 0, size: tuple[int, int] = (32, 32)):
    """A deterministic random RGB ``PIL.Image`` of ``size`` (width, height)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
