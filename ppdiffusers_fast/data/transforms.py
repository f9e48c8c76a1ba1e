"""Resize, crop, aspect-ratio buckets and normalisation of training images.

Every random choice (crop offset, flip) is drawn from ``numpy.random.default_rng([seed, index])``,
so the same record always gives the same pixels: resumed runs and the latent cache see exactly
what an uninterrupted on-the-fly run sees.
"""
import math

import numpy as np
from PIL import Image


class AspectRatioBuckets:
    """Training sizes of about ``resolution**2`` pixels for several aspect ratios.

    Sizes are multiples of ``step`` (64 keeps FLUX's latent of H/8 x W/8 divisible into 2x2 patches
    with room to spare); for each width ``w = step, 2*step, ...`` the height is the largest multiple of
    ``step`` with ``w * h <= resolution**2``, kept when ``1/max_aspect <= w/h <= max_aspect``.

    Args:
        resolution: side of the square bucket (e.g. 1024).
        step: size granularity in pixels.
        max_aspect: largest long/short side ratio.
        sizes: explicit ``[(height, width), ...]`` instead of the generated set.
    """

    def __init__(self, resolution=1024, step=64, max_aspect=2.0, sizes=None):
        if sizes is None:
            area = resolution * resolution
            found = set()
            for width in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
                height = (area // width) // step * step
                if height >= step and 1.0 / max_aspect <= width / height <= max_aspect:
                    found.add((height, width))
            sizes = sorted(found, key=lambda hw: hw[1] / hw[0])
        if not sizes:
            raise ValueError(f"no buckets for resolution={resolution}, step={step}, max_aspect={max_aspect}")
        self.sizes = [tuple(int(v) for v in hw) for hw in sizes]
        self._log_aspects = np.array([math.log(w / h) for h, w in self.sizes])

    def __len__(self):
        return len(self.sizes)

    def nearest(self, width, height):
        """Index of the bucket whose aspect ratio is closest (in log scale) to ``width / height``."""
        return int(np.argmin(np.abs(self._log_aspects - math.log(width / height))))

    def assign(self, sizes):
        """Bucket index per record from an ``[N, 2]`` array of (width, height); ``-1`` stays ``-1``."""
        return np.array([self.nearest(w, h) if w > 0 and h > 0 else -1 for w, h in sizes], dtype=np.int64)


def resize_and_crop(image, height, width, rng=None):
    """Scale ``image`` to cover ``height x width`` keeping its aspect ratio, then crop to it.

    Args:
        image: ``PIL.Image``.
        rng: ``numpy.random.Generator`` for a random crop offset; ``None`` crops the centre.
    Returns:
        ``PIL.Image`` of exactly ``width x height``.
    """
    scale = max(width / image.width, height / image.height)
    new_width = max(width, round(image.width * scale))
    new_height = max(height, round(image.height * scale))
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), Image.Resampling.LANCZOS)
    if rng is None:
        left, top = (new_width - width) // 2, (new_height - height) // 2
    else:
        left = int(rng.integers(0, new_width - width + 1))
        top = int(rng.integers(0, new_height - height + 1))
    return image.crop((left, top, left + width, top + height))


def to_normalized_array(image):
    """RGB ``PIL.Image`` -> float32 ``[3, H, W]`` in [-1, 1] (``x / 127.5 - 1``)."""
    array = np.asarray(image, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1) / 127.5 - 1.0)


class TrainTransform:
    """Decoded RGB image -> normalised ``[3, H, W]`` float32 array at the training size.

    Args:
        resolution: ``int`` (square) or ``(height, width)``; used when ``buckets`` is None.
        buckets: :class:`AspectRatioBuckets`; each image goes to the bucket nearest its aspect ratio.
        random_crop: random instead of centre crop.
        random_flip: horizontal flip with probability 1/2.
        seed: seeds the per-record random choices.
    """

    def __init__(self, resolution=1024, buckets=None, random_crop=False, random_flip=False, seed=0):
        self.size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.buckets = buckets
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.seed = seed

    def target_size(self, width, height):
        """``(height, width)`` an image of ``width x height`` is brought to."""
        if self.buckets is None:
            return self.size
        return self.buckets.sizes[self.buckets.nearest(width, height)]

    def __call__(self, image, index=0):
        height, width = self.target_size(image.width, image.height)
        rng = np.random.default_rng([self.seed, index])
        image = resize_and_crop(image, height, width, rng if self.random_crop else None)
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_normalized_array(image)
