"""CLIP score of images against their prompts, with a CLIP model from a local Hugging Face-layout folder.

Formula (stated once, used everywhere):

    clip_score          = mean_i cos(E_img(x_i), E_txt(c_i))                 (plain cosine, in [-1, 1])
    clip_score_x100     = mean_i max(100 * cos(E_img(x_i), E_txt(c_i)), 0)   (torchmetrics' convention)

where E_img / E_txt are CLIPModel's projected image / text embeddings (``get_image_features`` /
``get_text_features``). Published few-step FLUX numbers such as 0.3294 are on the plain-cosine scale.

The folder holds ``config.json`` (a ``CLIPModel`` config), ``model.safetensors`` (or a sharded index),
``vocab.json`` + ``merges.txt`` (+ tokenizer config) and optionally ``preprocessor_config.json``. Weights are
read from safetensors in PyTorch layout (Linear weights [out, in], transposed here) with strict key checks;
no pickle, no files written into the folder.
"""
import json
import os

import numpy as np
import paddle
from PIL import Image

from .. import compat
from .image_folder import to_rgb_uint8

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


class ClipImagePreprocessor:
    """CLIP image preprocessing as in Hugging Face's ``CLIPImageProcessor``.

    Resize the shortest edge to ``size`` (PIL, bicubic by default; the long edge becomes
    ``int(size * long / short)``), center-crop ``crop_height x crop_width`` (top = (H - h) // 2), scale by
    ``rescale_factor``, normalize with ``mean`` / ``std``. Output float32 [N, 3, crop_height, crop_width].
    """

    def __init__(self, size=224, crop_height=224, crop_width=224, resample=3, rescale_factor=1 / 255,
                 mean=CLIP_MEAN, std=CLIP_STD, do_resize=True, do_center_crop=True, do_normalize=True):
        self.size, self.crop_height, self.crop_width = int(size), int(crop_height), int(crop_width)
        self.resample = PIL_RESAMPLE[int(resample)]
        self.rescale_factor = float(rescale_factor)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.do_resize, self.do_center_crop, self.do_normalize = do_resize, do_center_crop, do_normalize

    @classmethod
    def from_folder(cls, folder):
        """Read ``preprocessor_config.json`` when present (both the ``{"shortest_edge": S}`` and the int forms)."""
        path = os.path.join(folder, "preprocessor_config.json")
        if not os.path.isfile(path):
            return cls()
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        size = config.get("size", 224)
        size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        crop = config.get("crop_size", size)
        crop_height, crop_width = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(size=size, crop_height=crop_height, crop_width=crop_width, resample=config.get("resample", 3),
                   rescale_factor=config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 1.0,
                   mean=config.get("image_mean", CLIP_MEAN), std=config.get("image_std", CLIP_STD),
                   do_resize=config.get("do_resize", True), do_center_crop=config.get("do_center_crop", True),
                   do_normalize=config.get("do_normalize", True))

    def _resize(self, image):
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        return image.resize((new_width, new_height), resample=self.resample, reducing_gap=None)

    def _center_crop(self, array):
        height, width = array.shape[:2]
        if height < self.crop_height or width < self.crop_width:
            raise ValueError(f"image {height}x{width} is smaller than the CLIP crop {self.crop_height}x{self.crop_width}")
        top, left = (height - self.crop_height) // 2, (width - self.crop_width) // 2
        return array[top:top + self.crop_height, left:left + self.crop_width]

    def __call__(self, images):
        batch = []
        for image in images:
            pil = Image.fromarray(to_rgb_uint8(image))
            if self.do_resize:
                pil = self._resize(pil)
            array = np.asarray(pil)
            if self.do_center_crop:
                array = self._center_crop(array)
            array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
            if self.do_normalize:
                array = (array - self.mean) / self.std
            batch.append(array.transpose(2, 0, 1))
        return np.stack(batch).astype(np.float32)


def _read_safetensors_folder(folder):
    from ..models.safetensors_io import load_file
    from ..models.weights import resolve_weight_files

    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single) or os.path.isfile(index):
        arrays = {}
        for file in resolve_weight_files(folder):
            arrays.update(load_file(file))
        return arrays
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                            "(pickled .bin weights are not read; convert them to safetensors)")


def load_torch_layout_weights(model, arrays, label):
    """Copy PyTorch-layout arrays into a Paddle model: transpose ``nn.Linear`` weights, strict key/shape checks."""
    linear_weights = {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, paddle.nn.Linear)}
    state = model.state_dict()
    ignored = {k for k in arrays if k.endswith("position_ids")}
    missing = sorted(set(state) - set(arrays))
    unexpected = sorted(set(arrays) - set(state) - ignored)
    mismatched = []
    for name in sorted(set(state) & set(arrays)):
        value = arrays[name].T if name in linear_weights else arrays[name]
        if tuple(value.shape) != tuple(state[name].shape):
            mismatched.append(f"{name}: file {tuple(arrays[name].shape)} vs model {tuple(state[name].shape)}")
    if missing or unexpected or mismatched:
        raise KeyError(f"{label}: weights do not match the model config: missing {missing[:10]}, "
                       f"unexpected {unexpected[:10]}, mismatched {mismatched[:10]}")
    for name, parameter in state.items():
        value = arrays[name].T if name in linear_weights else arrays[name]
        parameter.set_value(paddle.to_tensor(np.array(value, order="C"), dtype=parameter.dtype))


class ClipEmbedder:
    """A ppdiffusers ``CLIPModel`` + tokenizer + image preprocessing loaded from ``folder``.

    ``image_embeddings(images) -> [N, P]`` and ``text_embeddings(texts) -> [N, P]`` (float64, not normalized).
    """

    def __init__(self, folder, dtype="float32"):
        compat.apply()
        from ppdiffusers.transformers import CLIPConfig, CLIPModel, CLIPTokenizer

        folder = str(folder)
        for required in ("config.json", "vocab.json", "merges.txt"):
            if not os.path.isfile(os.path.join(folder, required)):
                raise FileNotFoundError(f"CLIP folder {folder} lacks {required}")
        self.folder = folder
        config = CLIPConfig.from_pretrained(folder)
        self.model = CLIPModel(config)
        load_torch_layout_weights(self.model, _read_safetensors_folder(folder), f"CLIP weights in {folder}")
        if dtype != "float32":
            self.model.to(dtype=dtype)
        self.model.eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.max_length = int(config.text_config.max_position_embeddings)
        self.preprocess = ClipImagePreprocessor.from_folder(folder)
        self.projection_dim = int(config.projection_dim)

    def image_embeddings_from_pixels(self, pixel_values):
        """[N, 3, h, w] float32 preprocessed pixels -> [N, P] float64."""
        with paddle.no_grad():
            pixels = paddle.to_tensor(pixel_values).astype(self.model.dtype)
            return self.model.get_image_features(pixel_values=pixels).astype("float32").numpy().astype(np.float64)

    def image_embeddings(self, images):
        """Images (PIL or uint8 [H, W, 3]) -> [N, P] float64."""
        return self.image_embeddings_from_pixels(self.preprocess(images))

    def tokenize(self, texts):
        """Texts -> input ids [N, max_length] (padded to the model's length, truncated keeping the end token)."""
        encoded = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="np")
        return np.asarray(encoded["input_ids"], dtype=np.int64)

    def text_embeddings(self, texts):
        """Texts -> [N, P] float64."""
        with paddle.no_grad():
            ids = paddle.to_tensor(self.tokenize(texts))
            return self.model.get_text_features(input_ids=ids).astype("float32").numpy().astype(np.float64)


def cosine_similarities(image_embeds, text_embeds):
    """Row-wise cosine of [N, P] image and text embeddings -> [N] float64."""
    image_embeds = np.asarray(image_embeds, dtype=np.float64)
    text_embeds = np.asarray(text_embeds, dtype=np.float64)
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image and text embeddings differ in shape: {image_embeds.shape} vs {text_embeds.shape}")
    image_unit = image_embeds / np.linalg.norm(image_embeds, axis=1, keepdims=True)
    text_unit = text_embeds / np.linalg.norm(text_embeds, axis=1, keepdims=True)
    return np.sum(image_unit * text_unit, axis=1)


def summarize_clip_scores(cosines):
    """``{"clip_score": mean cosine, "clip_score_x100": mean max(100 cos, 0), "num_pairs": N}``."""
    cosines = np.asarray(cosines, dtype=np.float64)
    return {"clip_score": float(cosines.mean()), "clip_score_x100": float(np.maximum(100.0 * cosines, 0.0).mean()),
            "num_pairs": int(cosines.size)}


def clip_scores_for_images(embedder, images, prompts, batch_size=32):
    """Per-pair cosine [N] of ``images`` against ``prompts`` (same order), in batches."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    scores = []
    for start in range(0, len(images), batch_size):
        end = start + batch_size
        scores.append(cosine_similarities(embedder.image_embeddings(images[start:end]),
                                          embedder.text_embeddings(prompts[start:end])))
    return np.concatenate(scores) if scores else np.zeros([0])
