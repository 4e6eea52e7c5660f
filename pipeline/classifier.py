"""A small digits classifier shipped for evaluation: accuracy for the prompted digit and the
feature space of the Frechet distance (its penultimate activations)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

WEIGHTS_DIR = Path(__file__).parent / "weights"
CLASSIFIER_FILE = "digits_classifier.safetensors"
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """Tiny CNN on ``(B, 1, 8, 8)`` images in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(B, 10)``."""
        return self.head(self.body(images * 2.0 - 1.0))

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Penultimate activations ``(B, 64)`` (float32), the Frechet-distance features."""
        return self.body(images.float() * 2.0 - 1.0)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Predicted digit ``(B,)`` int64."""
        return self.forward(images.float()).argmax(-1)


def load_digits_classifier(weights_dir: str | Path | None = None) -> DigitsClassifier:
    """Load the shipped (or a retrained) classifier from ``weights_dir`` (safetensors, eval mode)."""
    path = Path(weights_dir or WEIGHTS_DIR) / CLASSIFIER_FILE
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
