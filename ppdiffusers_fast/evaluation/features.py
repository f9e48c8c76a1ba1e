"""Feature extractors for Frechet distances: one interface, three kinds of network.

``FeatureExtractor``: ``name``, ``feature_dim``, ``preprocess(images) -> paddle.Tensor`` and
``__call__(images) -> numpy float64 [N, feature_dim]``, where ``images`` is a list of PIL images or uint8
[H, W, 3] arrays. Implementations:

* :class:`InceptionFeatureExtractor`: InceptionV3 FID pool3 (2048-d), the standard FID;
* :class:`ClipFeatureExtractor`: CLIP projected image embeddings (a CLIP-feature Frechet distance);
* :class:`NetworkFeatureExtractor`: any small ``paddle.nn.Layer`` a user supplies (e.g. a digit classifier's
  penultimate layer), with its own input size, channels and normalisation.

:func:`build_feature_extractor` maps the command-line choice (``inception`` | ``clip`` |
``path/to/file.py:function`` | ``package.module:function``) to an instance; the function must return a
``FeatureExtractor``.
"""
import hashlib
import importlib
import importlib.util
import os

import numpy as np
import paddle
from PIL import Image

from .image_folder import to_rgb_uint8


class FeatureExtractor:
    """Base class: subclasses set ``name`` / ``feature_dim`` and implement ``preprocess`` and ``forward_features``."""

    name = "features"
    feature_dim = 0

    def preprocess(self, images):
        """List of images -> network input tensor [N, ...]."""
        raise NotImplementedError

    def forward_features(self, batch):
        """Network input [N, ...] -> features [N, feature_dim] (paddle or numpy)."""
        raise NotImplementedError

    def description(self):
        """Dict recorded in reports and cache keys (name, dimension, weights identity)."""
        return {"name": self.name, "feature_dim": int(self.feature_dim)}

    def __call__(self, images):
        images = list(images)
        if not images:
            return np.zeros([0, self.feature_dim], dtype=np.float64)
        with paddle.no_grad():
            features = self.forward_features(self.preprocess(images))
        if isinstance(features, paddle.Tensor):
            features = features.astype("float32").numpy()
        features = np.asarray(features, dtype=np.float64).reshape(len(images), -1)
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"{self.name}: features have dimension {features.shape[1]}, expected {self.feature_dim}")
        return features


def images_to_unit_tensor(images):
    """List of images -> list of float32 tensors [1, 3, H, W] in [0, 1]."""
    return [paddle.to_tensor(to_rgb_uint8(image).transpose(2, 0, 1)[None].astype(np.float32) / 255.0)
            for image in images]


class InceptionFeatureExtractor(FeatureExtractor):
    """InceptionV3 FID pool3 features. Each image is resized to 299 (bilinear, as the network itself would),
    so a batch may mix image sizes."""

    name = "inception_v3_fid_pool3"

    def __init__(self, model, weights_sha256=""):
        from .inception import POOL3_DIM

        self.model = model
        self.model.eval()
        self.feature_dim = POOL3_DIM
        self.weights_sha256 = weights_sha256

    @classmethod
    def from_weights(cls, path):
        from .inception import load_inception_weights
        from .inception_convert import file_digests

        return cls(load_inception_weights(path), weights_sha256=file_digests(path)[0])

    def preprocess(self, images):
        return paddle.concat([self.model.resize_to_input(x) for x in images_to_unit_tensor(images)], axis=0)

    def forward_features(self, batch):
        return self.model(batch)

    def description(self):
        return {**super().description(), "weights_sha256": self.weights_sha256}


class ClipFeatureExtractor(FeatureExtractor):
    """CLIP projected image embeddings (not normalised) of a :class:`~.clip_score.ClipEmbedder`."""

    name = "clip_image_embeddings"

    def __init__(self, embedder, model_fingerprint=""):
        self.embedder = embedder
        self.feature_dim = embedder.projection_dim
        self.model_fingerprint = model_fingerprint

    def preprocess(self, images):
        return paddle.to_tensor(self.embedder.preprocess(images))

    def forward_features(self, batch):
        return self.embedder.model.get_image_features(pixel_values=batch.astype(self.embedder.model.dtype))

    def description(self):
        return {**super().description(), "clip_model": self.model_fingerprint}


class NetworkFeatureExtractor(FeatureExtractor):
    """A user's small network as a feature extractor.

    Images are resized to ``input_size`` = (height, width) with PIL bilinear, optionally converted to
    grayscale (``channels=1``), scaled to ``value_range`` and normalised by ``mean`` / ``std`` (per channel).
    ``network(x [N, C, h, w])`` must return [N, feature_dim] (or a tuple whose first item is that); output
    of more than two dimensions is flattened per sample.
    """

    def __init__(self, network, name, feature_dim, input_size, channels=3, value_range=(0.0, 1.0), mean=None,
                 std=None, weights_sha256=""):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.network = network
        self.network.eval()
        self.name = name
        self.feature_dim = int(feature_dim)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.channels = channels
        self.value_range = value_range
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = None if std is None else np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
        self.weights_sha256 = weights_sha256

    def preprocess(self, images):
        height, width = self.input_size
        arrays = []
        for image in images:
            pil = Image.fromarray(to_rgb_uint8(image)).resize((width, height), resample=Image.BILINEAR)
            if self.channels == 1:
                pil = pil.convert("L")
            array = np.asarray(pil, dtype=np.float32).reshape(height, width, self.channels) / 255.0
            arrays.append(array.transpose(2, 0, 1))
        batch = np.stack(arrays)
        low, high = self.value_range
        batch = batch * (high - low) + low
        if self.mean is not None:
            batch = (batch - self.mean) / self.std
        return paddle.to_tensor(batch.astype(np.float32))

    def forward_features(self, batch):
        output = self.network(batch)
        if isinstance(output, (tuple, list)):
            output = output[0]
        return output.reshape([output.shape[0], -1])

    def description(self):
        return {**super().description(), "input_size": list(self.input_size), "channels": self.channels,
                "weights_sha256": self.weights_sha256}


def parameters_sha256(layer):
    """SHA-256 over a layer's sorted parameter names and float32 values (identifies random or trained weights)."""
    digest = hashlib.sha256()
    for name, value in sorted(layer.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(np.ascontiguousarray(value.astype("float32").numpy()).tobytes())
    return digest.hexdigest()


def load_object(spec):
    """``"path/to/file.py:name"`` or ``"package.module:name"`` -> the named object."""
    if ":" not in spec:
        raise ValueError(f"expected 'path/to/file.py:function' or 'module:function', got {spec!r}")
    location, attribute = spec.rsplit(":", 1)
    if location.endswith(".py"):
        if not os.path.isfile(location):
            raise FileNotFoundError(f"feature extractor file not found: {location}")
        module_name = "user_feature_extractor_" + hashlib.sha256(os.path.abspath(location).encode()).hexdigest()[:12]
        spec_obj = importlib.util.spec_from_file_location(module_name, location)
        module = importlib.util.module_from_spec(spec_obj)
        spec_obj.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    if not hasattr(module, attribute):
        raise AttributeError(f"{location} has no attribute {attribute!r}")
    return getattr(module, attribute)


def load_custom_extractor(spec):
    """Call the builder named by ``spec`` and check it returned a feature extractor."""
    extractor = load_object(spec)()
    for attribute in ("name", "feature_dim", "preprocess", "__call__"):
        if not hasattr(extractor, attribute):
            raise TypeError(f"{spec} returned {type(extractor).__name__}, which lacks '{attribute}' "
                            "(return a ppdiffusers_fast.evaluation.features.FeatureExtractor)")
    return extractor


def build_feature_extractor(kind, inception_weights=None, clip_embedder=None, clip_fingerprint=""):
    """``kind``: ``inception`` (needs ``inception_weights``), ``clip`` (needs ``clip_embedder``) or a custom spec."""
    if kind == "inception":
        if not inception_weights:
            raise ValueError("--feature_extractor inception needs --inception_weights (a converted .safetensors file)")
        return InceptionFeatureExtractor.from_weights(inception_weights)
    if kind == "clip":
        if clip_embedder is None:
            raise ValueError("--feature_extractor clip needs --clip_model_path")
        return ClipFeatureExtractor(clip_embedder, clip_fingerprint)
    return load_custom_extractor(kind)


__all__ = ["FeatureExtractor", "InceptionFeatureExtractor", "ClipFeatureExtractor", "NetworkFeatureExtractor",
           "build_feature_extractor", "load_custom_extractor", "parameters_sha256"]
