"""Demo metrics on generated digits, judged by the digit classifier (``classifier.py``).

- Prompt adherence (the demo's stand-in for the CLIP score): the share of images whose predicted digit is
  the prompted one.
- FID against the teacher (the demo's FID-FLUX): the Frechet distance (``evaluation.fid``) between Gaussian
  fits of the classifier's penultimate features (64-d) of two image sets, e.g. the student's 4-step images and
  the teacher's 50-step images for the same prompts and seeds.
"""
from pathlib import Path
from typing import Sequence

import numpy as np

from ppdiffusers_fast.evaluation.fid import activation_statistics, frechet_distance
from .classifier import DigitClassifier, extract_features, predict_logits

__all__ = ["adherence", "feature_fid", "eval_labels_and_seeds", "save_digit_grid"]


def adherence(classifier: DigitClassifier, images: np.ndarray, labels: Sequence[int]) -> float:
    """Share of ``images`` ``[N, 3, R, R]`` (in [-1, 1]) classified as their prompt's digit ``labels`` ``[N]``."""
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images and {len(labels)} labels")
    return float(np.mean(predict_logits(classifier, images).argmax(axis=1) == labels))


def feature_fid(classifier: DigitClassifier, images_a: np.ndarray, images_b: np.ndarray) -> float:
    """Frechet distance between the classifier features of two image sets (each ``[N, 3, R, R]``, N >= 2)."""
    stats_a = activation_statistics(extract_features(classifier, images_a), "digit_classifier")
    stats_b = activation_statistics(extract_features(classifier, images_b), "digit_classifier")
    return float(frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma))


def eval_labels_and_seeds(images_per_digit: int, first_seed: int):
    """Labels ``0,0,..,1,1,..`` (``images_per_digit`` each) and seeds ``first_seed + i``, as two int lists."""
    labels = [d for d in range(10) for _ in range(images_per_digit)]
    return labels, [first_seed + i for i in range(len(labels))]


def save_digit_grid(path, panels: Sequence[np.ndarray], columns: int, scale: int = 2, gap: int = 8) -> Path:
    """Save panels side by side as one PNG: each panel ``[rows * columns, 3, R, R]`` in [-1, 1], row-major.

    Panels are separated by ``gap`` white pixels (before upscaling by ``scale``, nearest neighbour).
    """
    from PIL import Image

    tiles = []
    for panel in panels:
        count, channels, size, _ = panel.shape
        if count % columns:
            raise ValueError(f"a panel of {count} images does not fill rows of {columns}")
        rows = count // columns
        grid = panel.reshape(rows, columns, channels, size, size).transpose(0, 3, 1, 4, 2)
        tiles.append(grid.reshape(rows * size, columns * size, channels))
        tiles.append(np.ones([rows * size, gap, channels], dtype=np.float32))
    image = np.concatenate(tiles[:-1], axis=1)
    pixels = np.round((np.clip(image, -1, 1) + 1) * 127.5).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path
