"""Reading image folders for evaluation: listing, decoding to uint8 RGB, batched feature extraction."""
import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder):
    """Sorted paths of the image files directly inside ``folder`` (by extension, case-insensitive)."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    return [os.path.join(folder, n) for n in names]


def to_rgb_uint8(image):
    """``PIL.Image`` or numpy array -> numpy uint8 [H, W, 3].

    Float arrays must lie in [0, 1] (scaled by 255 and rounded); grayscale is repeated to 3 channels.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"an image must be [H, W, C] with C in (1, 3, 4), got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    array = array[:, :, :3]
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(f"float images must lie in [0, 1], got range [{array.min()}, {array.max()}]")
        return np.round(array * 255.0).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {array.dtype}")


def load_image(path):
    """Decode ``path`` to uint8 RGB [H, W, 3]; the error names the file."""
    try:
        with Image.open(path) as image:
            return to_rgb_uint8(image)
    except Exception as error:  # PIL raises several unrelated types
        raise ValueError(f"cannot read image {path}: {error}") from error


def folder_features(folder, extractor, batch_size=50, show_progress=True, paths=None):
    """Features [N, D] float64 of every image in ``folder`` (or of ``paths``), in sorted-name order."""
    from tqdm import tqdm

    paths = list_images(folder) if paths is None else list(paths)
    if not paths:
        raise ValueError(f"no images found in {folder}")
    chunks = []
    progress = tqdm(total=len(paths), desc=f"{extractor.name} features", unit="img", disable=not show_progress)
    for start in range(0, len(paths), batch_size):
        images = [load_image(p) for p in paths[start:start + batch_size]]
        chunks.append(extractor(images))
        progress.update(len(images))
    progress.close()
    return np.concatenate(chunks, axis=0)
