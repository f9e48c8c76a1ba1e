"""InceptionV3 as used by FID (the TF 2015-12-05 graph as ported by pytorch-fid), pool3 features [N, 2048].

Differences from the ImageNet InceptionV3 (the "FID" variant):
* Mixed_5b/5c/5d (InceptionA), Mixed_6b..6e (InceptionC) and Mixed_7b (InceptionE) average-pool
  their pool branch without counting the zero padding (TF semantics; Paddle ``exclusive=True``);
* Mixed_7c (InceptionE) max-pools its pool branch;
* BatchNorm epsilon 1e-3, convolutions without bias.

Input: images in [0, 1], [N, 3, H, W]; resized to 299 x 299 (bilinear, ``align_corners=False``, no
antialiasing) and scaled to [-1, 1]. Output: the global average pool of Mixed_7c, [N, 2048].

Parameter names are the pytorch-fid names (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch_pool.bn.running_mean``,
...); in Paddle the BatchNorm buffers are ``_mean`` / ``_variance`` and :func:`load_inception_weights`
maps them. The weight file is safetensors only (see ``inception_convert.py`` for the one-time conversion).
"""
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

FID_INPUT_SIZE = 299
POOL3_DIM = 2048
BN_EPSILON = 1e-3
# Keys present in the published files that pool3 does not use.
IGNORED_KEY_PREFIXES = ("fc.", "AuxLogits.")
IGNORED_KEY_SUFFIXES = (".num_batches_tracked",)


class BasicConv2d(nn.Layer):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias_attr=False)
        self.bn = nn.BatchNorm2D(out_channels, epsilon=BN_EPSILON)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3_same(x):
    # TF "SAME" average pooling: the padded zeros are not counted (exclusive=True).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, exclusive=True)


class InceptionA(nn.Layer):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features channels."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_3x3_same(x))
        return paddle.concat([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=1)


class InceptionB(nn.Layer):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 384 + 96 + in channels."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return paddle.concat([branch3x3, branch3x3dbl, branch_pool], axis=1)


class InceptionC(nn.Layer):
    """Mixed_6b..6e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1 -> 768 channels."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_3x3_same(x))
        return paddle.concat([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=1)


class InceptionD(nn.Layer):
    """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 320 + 192 + in channels."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return paddle.concat([branch3x3, branch7x7x3, branch_pool], axis=1)


class InceptionE(nn.Layer):
    """Mixed_7b / 7c: 1x1 | 1x1-(1x3,3x1) | 1x1-3x3-(1x3,3x1) | pool-1x1 -> 2048 channels.

    ``pool="avg"`` (Mixed_7b, padding not counted) or ``pool="max"`` (Mixed_7c, as in the TF FID graph).
    """

    def __init__(self, in_channels, pool):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = paddle.concat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], axis=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = paddle.concat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], axis=1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3_same(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(pooled)
        return paddle.concat([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=1)


class InceptionV3FID(nn.Layer):
    """InceptionV3 FID network up to pool3.

    forward(images [N, 3, H, W] in [0, 1]) -> [N, 2048] (float32).
    """

    def __init__(self, resize_input=True, normalize_input=True):
        super().__init__()
        self.resize_input = resize_input
        self.normalize_input = normalize_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.eval()

    @staticmethod
    def resize_to_input(images):
        """[N, 3, H, W] -> [N, 3, 299, 299], bilinear, ``align_corners=False`` (identity at 299)."""
        if list(images.shape[2:]) == [FID_INPUT_SIZE, FID_INPUT_SIZE]:
            return images
        return F.interpolate(images, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)

    def forward(self, images):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
        x = images.astype("float32")
        if self.resize_input:
            x = self.resize_to_input(x)
        if self.normalize_input:
            x = 2.0 * x - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def paddle_to_reference_name(name):
    """Paddle parameter name -> pytorch-fid name (BatchNorm ``_mean``/``_variance`` -> ``running_mean``/``running_var``)."""
    if name.endswith(".bn._mean"):
        return name[: -len("_mean")] + "running_mean"
    if name.endswith(".bn._variance"):
        return name[: -len("_variance")] + "running_var"
    return name


def reference_shapes(model=None):
    """``{pytorch-fid name: shape tuple}`` of every weight pool3 needs (the canonical file layout)."""
    model = model or InceptionV3FID()
    return {paddle_to_reference_name(k): tuple(v.shape) for k, v in model.state_dict().items()}


def is_ignored_key(name):
    """True for keys of the published files that pool3 does not use (fc, AuxLogits, num_batches_tracked)."""
    return name.startswith(IGNORED_KEY_PREFIXES) or name.endswith(IGNORED_KEY_SUFFIXES)


def check_reference_state_dict(state_dict, expected_shapes):
    """Raise ``KeyError`` naming missing / unexpected / mismatched keys of a pytorch-fid-named state dict."""
    used = {k: v for k, v in state_dict.items() if not is_ignored_key(k)}
    missing = sorted(set(expected_shapes) - set(used))
    unexpected = sorted(set(used) - set(expected_shapes))
    mismatched = sorted(f"{k}: file {tuple(used[k].shape)} vs model {expected_shapes[k]}"
                        for k in set(used) & set(expected_shapes) if tuple(used[k].shape) != expected_shapes[k])
    if missing or unexpected or mismatched:
        def head(items):
            return items[:10] + ([f"... {len(items) - 10} more"] if len(items) > 10 else [])
        raise KeyError(f"InceptionV3 weights do not match the FID architecture: missing {len(missing)} {head(missing)}, "
                       f"unexpected {len(unexpected)} {head(unexpected)}, mismatched shapes {head(mismatched)}")
    return used


def load_reference_state_dict(model, state_dict):
    """Copy a pytorch-fid-named ``{name: numpy array}`` into ``model`` with strict key and shape checks."""
    used = check_reference_state_dict(state_dict, reference_shapes(model))
    for name, parameter in model.state_dict().items():
        value = np.array(used[paddle_to_reference_name(name)], dtype=np.float32, order="C")
        parameter.set_value(paddle.to_tensor(value))
    model.eval()
    return model


def load_inception_weights(path, model=None):
    """Build (or fill) an :class:`InceptionV3FID` from a safetensors file with pytorch-fid key names."""
    import os

    from ..models.safetensors_io import load_file

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"InceptionV3 weights not found: {path} "
                                "(convert the pytorch-fid .pth or PaddleMIX .pdparams once with "
                                "scripts/convert_inception_weights.py)")
    if not path.endswith(".safetensors"):
        raise ValueError(f"InceptionV3 weights must be a .safetensors file, got {path}; "
                         "convert it with scripts/convert_inception_weights.py")
    model = model or InceptionV3FID()
    return load_reference_state_dict(model, load_file(path))
