"""The demo's image set: scikit-learn's handwritten digits, upscaled to the demo resolution.

``sklearn.datasets.load_digits`` ships 1797 grey 8x8 images (values 0..16, ink bright) of the digits 0-9.
Each is resized with bicubic interpolation to ``resolution x resolution``, turned into dark ink on white
paper, repeated over 3 channels and mapped to [-1, 1]:

    image = 1 - 2 * clip(bicubic(digit), 0, 16) / 16        # [3, R, R], paper = +1, ink = -1

Splits are fixed by :class:`DemoSplit` (one permutation with its seed).
"""
from dataclasses import dataclass
from typing import Dict

import numpy as np
from PIL import Image

from .config import DemoSplit

__all__ = ["DigitImages", "load_digit_images", "upscale_digits", "split_indices", "load_split"]

SPLIT_NAMES = ("teacher_train", "classifier_train", "classifier_test")


@dataclass
class DigitImages:
    """images: ``[N, 3, R, R]`` float32 in [-1, 1]; labels: ``[N]`` int64 in 0..9."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> "DigitImages":
        return DigitImages(self.images[indices], self.labels[indices])


def upscale_digits(digits: np.ndarray, resolution: int) -> np.ndarray:
    """``[N, 8, 8]`` values 0..16 -> ``[N, 3, R, R]`` float32 in [-1, 1] (bicubic, dark ink on white)."""
    if digits.ndim != 3:
        raise ValueError(f"digits must be [N, H, W], got shape {list(digits.shape)}")
    if resolution < digits.shape[1]:
        raise ValueError(f"resolution {resolution} is below the source size {digits.shape[1]}")
    out = np.empty([digits.shape[0], resolution, resolution], dtype=np.float32)
    for i, digit in enumerate(digits.astype(np.float32)):
        resized = Image.fromarray(digit, mode="F").resize((resolution, resolution), Image.BICUBIC)
        out[i] = np.asarray(resized, dtype=np.float32)
    ink = np.clip(out, 0.0, 16.0) / 16.0
    grey = 1.0 - 2.0 * ink
    return np.repeat(grey[:, None], 3, axis=1)


def load_digit_images(resolution: int) -> DigitImages:
    """All 1797 digits at ``resolution`` (the order of scikit-learn's file)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return DigitImages(upscale_digits(bunch.images, resolution), bunch.target.astype(np.int64))


def split_indices(num_images: int, split: DemoSplit) -> Dict[str, np.ndarray]:
    """Disjoint index sets ``teacher_train``, ``classifier_train``, ``classifier_test`` of one permutation."""
    sizes = [split.teacher_train, split.classifier_train, split.classifier_test]
    if sum(sizes) > num_images or min(sizes) <= 0:
        raise ValueError(f"split sizes {sizes} must be positive and sum to at most {num_images}")
    order = np.random.default_rng(split.seed).permutation(num_images)
    bounds = np.cumsum([0] + sizes)
    return {name: np.sort(order[bounds[i]:bounds[i + 1]]) for i, name in enumerate(SPLIT_NAMES)}


def load_split(resolution: int, split: DemoSplit = DemoSplit()) -> Dict[str, DigitImages]:
    """The three parts of the fixed split at ``resolution``."""
    data = load_digit_images(resolution)
    return {name: data.subset(idx) for name, idx in split_indices(len(data), split).items()}
