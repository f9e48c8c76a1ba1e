"""A small CNN digit classifier: the demo's prompt-adherence judge and the feature network of its FID.

Architecture (``R x R`` RGB input in [-1, 1], ``R`` a multiple of 16):

    avg-pool R/16  -> [3, 16, 16]
    conv3x3 16, ReLU, max-pool 2   -> [16, 8, 8]
    conv3x3 32, ReLU, max-pool 2   -> [32, 4, 4]
    conv3x3 64, ReLU, flatten      -> [1024]
    linear 64  = features (penultimate layer, before its ReLU; FID is computed on these)
    ReLU, linear 10 = logits

Trained on the ``classifier_train`` split (digits the teacher never saw) with random shifts of up to
``max_shift`` pixels, Adam, cross-entropy; accuracy is measured on ``classifier_test``.
"""
from typing import Callable, Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from tqdm.auto import tqdm

from ppdiffusers_fast.models.weights import load_paddle_safetensors, save_paddle_safetensors

__all__ = ["DigitClassifier", "train_classifier", "predict_logits", "extract_features", "accuracy",
           "save_classifier", "load_classifier", "random_shifts"]

FEATURE_DIM = 64


class DigitClassifier(nn.Layer):
    """``forward(images [B, 3, R, R]) -> logits [B, 10]``; ``features(images) -> [B, 64]``."""

    def __init__(self, resolution: int = 32):
        super().__init__()
        if resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16, got {resolution}")
        self.resolution = int(resolution)
        self.conv1 = nn.Conv2D(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2D(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2D(32, 64, 3, padding=1)
        self.hidden = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, images: paddle.Tensor) -> paddle.Tensor:
        if list(images.shape[1:]) != [3, self.resolution, self.resolution]:
            raise ValueError(f"images must be [B, 3, {self.resolution}, {self.resolution}], got {list(images.shape)}")
        x = F.avg_pool2d(images, self.resolution // 16) if self.resolution > 16 else images
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.hidden(x.flatten(1))

    def forward(self, images: paddle.Tensor) -> paddle.Tensor:
        return self.head(F.relu(self.features(images)))


def random_shifts(images: np.ndarray, max_shift: int, rng: np.random.Generator, fill: float = 1.0) -> np.ndarray:
    """Translate each ``[3, R, R]`` image by up to ``max_shift`` pixels per axis, filling with paper (``fill``)."""
    size = images.shape[-1]
    padded = np.pad(images, [(0, 0), (0, 0), (max_shift, max_shift), (max_shift, max_shift)], constant_values=fill)
    out = np.empty_like(images)
    offsets = rng.integers(0, 2 * max_shift + 1, size=(len(images), 2))
    for i, (dy, dx) in enumerate(offsets):
        out[i] = padded[i, :, dy:dy + size, dx:dx + size]
    return out


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int, learning_rate: float, seed: int,
                     batch_size: int = 50, max_shift: int = 2,
                     log: Optional[Callable[[str], None]] = None) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on ``images`` ``[N, 3, R, R]`` and ``labels`` ``[N]`` (fixed seed)."""
    rng = np.random.default_rng(seed)
    paddle.seed(seed)
    model = DigitClassifier(images.shape[-1])
    steps_per_epoch = int(np.ceil(len(images) / batch_size))
    total = epochs * steps_per_epoch
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(learning_rate, T_max=total)
    optimizer = paddle.optimizer.Adam(learning_rate=schedule, parameters=model.parameters())
    model.train()
    for epoch in tqdm(range(epochs), desc="classifier", dynamic_ncols=True):
        order = rng.permutation(len(images))
        losses = []
        for start in range(0, len(images), batch_size):
            idx = order[start:start + batch_size]
            batch = paddle.to_tensor(random_shifts(images[idx], max_shift, rng))
            loss = F.cross_entropy(model(batch), paddle.to_tensor(labels[idx]))
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            schedule.step()
            losses.append(loss.item())
        if log is not None and (epoch + 1) % 10 == 0:
            log(f"classifier epoch {epoch + 1}/{epochs}: cross-entropy {np.mean(losses):.4f}")
    model.eval()
    return model


def _batched(model_fn, images: np.ndarray, batch_size: int) -> np.ndarray:
    outputs = []
    with paddle.no_grad():
        for start in range(0, len(images), batch_size):
            outputs.append(model_fn(paddle.to_tensor(np.asarray(images[start:start + batch_size],
                                                                dtype=np.float32))).numpy())
    return np.concatenate(outputs)


def predict_logits(model: DigitClassifier, images: np.ndarray, batch_size: int = 200) -> np.ndarray:
    """Logits ``[N, 10]`` of images ``[N, 3, R, R]`` in [-1, 1]."""
    return _batched(model, images, batch_size)


def extract_features(model: DigitClassifier, images: np.ndarray, batch_size: int = 200) -> np.ndarray:
    """Penultimate features ``[N, 64]`` (float32) of images ``[N, 3, R, R]`` in [-1, 1]."""
    return _batched(model.features, images, batch_size)


def accuracy(model: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of ``images`` whose predicted digit equals ``labels``."""
    return float(np.mean(predict_logits(model, images).argmax(axis=1) == np.asarray(labels)))


def save_classifier(model: DigitClassifier, path) -> None:
    """Paddle-layout safetensors (``models.weights.save_paddle_safetensors``, written atomically)."""
    save_paddle_safetensors(model, path, save_config=False)


def load_classifier(path, resolution: int) -> DigitClassifier:
    """Build a :class:`DigitClassifier` for ``resolution`` and load ``path`` (strict keys and shapes)."""
    model = DigitClassifier(resolution)
    load_paddle_safetensors(model, path)
    model.eval()
    return model
