"""Embeddings of the FLUX.1 transformer: 3-axis rotary positions from ids, sinusoidal timestep / guidance
embedding, pooled-text projection. Sub-layer names follow the diffusers checkpoint layout.
"""
import math
from typing import Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

def rope_cos_sin(ids: paddle.Tensor, axes_dims: Sequence[int], theta: float = 10000.0):
    """3-axis rotary embedding from integer positions (FLUX ``EmbedND``).

    For each axis a with ``d_a = axes_dims[a]`` channels and position ``p = ids[:, a]``, the angles are
    ``p * theta^(-2j / d_a)`` for ``j = 0 .. d_a/2 - 1``; each angle is repeated twice (interleaved pairs), and the
    axes are concatenated along channels. Angles are computed in float64 as the reference does.

    Args:
        ids: ``[L, n_axes]`` positions (text ids first, then image ids).
        axes_dims: channels per axis, summing to the head dim D; each must be even.
    Returns:
        ``(cos, sin)``, each ``[L, D]`` float32.
    """
    if ids.ndim != 2 or ids.shape[-1] != len(axes_dims):
        raise ValueError(f"ids must have shape [L, {len(axes_dims)}], got {list(ids.shape)}")
    positions = ids.astype("float32").astype("float64")
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dims):
        if dim % 2 != 0:
            raise ValueError(f"every rotary axis dim must be even, got axes_dims={list(axes_dims)}")
        exponents = paddle.arange(0, dim, 2, dtype="float64") / dim
        inv_freq = 1.0 / (theta ** exponents)  # [d/2]
        angles = positions[:, axis : axis + 1] * inv_freq[None, :]  # [L, d/2]
        cos_parts.append(paddle.repeat_interleave(paddle.cos(angles), 2, axis=1))
        sin_parts.append(paddle.repeat_interleave(paddle.sin(angles), 2, axis=1))
    cos = paddle.concat(cos_parts, axis=-1).astype("float32")
    sin = paddle.concat(sin_parts, axis=-1).astype("float32")
    return cos, sin


def pair_rotation_matrix(dim: int) -> np.ndarray:
    """``R [dim, dim]`` float32 with ``(x @ R)_{2j} = -x_{2j+1}`` and ``(x @ R)_{2j+1} = x_{2j}``: the rotation of
    every channel pair by 90 degrees as a signed permutation (``R[2j+1, 2j] = -1``, ``R[2j, 2j+1] = 1``, else 0).

    Every output channel is one input channel times +-1 plus zeros, so ``x @ R`` is exact in any float dtype.
    """
    if dim % 2 != 0:
        raise ValueError(f"the rotary head dim must be even, got {dim}")
    rotation = np.zeros([dim, dim], dtype=np.float32)
    evens = np.arange(0, dim, 2)
    rotation[evens + 1, evens] = -1.0
    rotation[evens, evens + 1] = 1.0
    return rotation


_ROTATIONS = {}


def _pair_rotation(dim: int) -> paddle.Tensor:
    """:func:`pair_rotation_matrix` as a tensor: cached in dygraph, a graph constant under ``to_static``."""
    if not paddle.in_dynamic_mode():
        return paddle.to_tensor(pair_rotation_matrix(dim))
    if dim not in _ROTATIONS:
        _ROTATIONS[dim] = paddle.to_tensor(pair_rotation_matrix(dim))
    return _ROTATIONS[dim]


def apply_rope(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """Rotate channel pairs ``(x_{2j}, x_{2j+1})`` by the angle of position and pair (RoFormer, eq. 34).

    ``out = x * cos + rot(x) * sin`` with ``rot(x)_{2j} = -x_{2j+1}``, ``rot(x)_{2j+1} = x_{2j}``, in float32.
    ``rot(x) = x @ R`` with the signed permutation ``R`` of :func:`pair_rotation_matrix` (exact): one small
    matrix product instead of splitting, negating and interleaving the pairs (5 ops; kept for float32 on GPU).

    Args:
        x: ``[B, L, H, D]``; cos, sin: ``[L, D]``.
    Returns:
        ``[B, L, H, D]`` in the dtype of ``x``.
    """
    x32 = x.astype("float32")
    if x.dtype == paddle.float32 and paddle.get_device().startswith("gpu"):
        # GPU float32 matrix products may run in TF32 (10-bit mantissa), which would round x: keep the exact
        # split / negate / interleave form there (inputs from float16 / bfloat16 fit TF32 exactly).
        pairs = x32.reshape(list(x32.shape[:-1]) + [-1, 2])
        rotated = paddle.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x32.shape)
    else:
        rotated = paddle.matmul(x32, _pair_rotation(x32.shape[-1]))
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    return (x32 * cos + rotated * sin).astype(x.dtype)


def timestep_frequencies(num_channels: int = 256, max_period: float = 10000.0) -> paddle.Tensor:
    """``freq_j = exp(-ln(max_period) * j / (num_channels/2))``, ``j = 0 .. num_channels/2 - 1``: ``[num_channels/2]``.

    The exponent is formed in float32 as the reference does; exp runs in float64 and is rounded once, so the
    float32 frequencies are correctly rounded. (The reference's float32 exp is off by one ulp at a few near-tie
    entries; since timesteps reach 1000 and guidance ~10^4, such an ulp moves an angle by up to ~1e-4 rad.)
    """
    half = num_channels // 2
    exponent = -math.log(max_period) * paddle.arange(0, half, dtype="float32") / half
    return paddle.exp(exponent.astype("float64")).astype("float32")


def sinusoidal_timestep_embedding(timesteps: paddle.Tensor, num_channels: int = 256,
                                  max_period: float = 10000.0) -> paddle.Tensor:
    """DDPM sinusoidal embedding, cosine half first (``flip_sin_to_cos=True``, no frequency shift):
    ``emb = [cos(t * freq), sin(t * freq)]`` with :func:`timestep_frequencies`.

    Args:
        timesteps: ``[B]`` (already scaled to [0, 1000]).
    Returns:
        ``[B, num_channels]`` float32.
    """
    freqs = timestep_frequencies(num_channels, max_period)
    angles = timesteps.astype("float32")[:, None] * freqs[None, :]
    return paddle.concat([paddle.cos(angles), paddle.sin(angles)], axis=-1)


class TimestepEmbedding(nn.Layer):
    """MLP ``linear_2(silu(linear_1(x)))``: ``[B, in_channels] -> [B, dim]``."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class PooledTextProjection(nn.Layer):
    """Pooled CLIP text projection ``linear_2(silu(linear_1(x)))``: ``[B, pooled_dim] -> [B, dim]``."""

    def __init__(self, pooled_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(pooled_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Layer):
    """Conditioning vector ``temb = MLP_t(sin(t)) [+ MLP_g(sin(g))] + MLP_y(pooled)``: ``[B, dim]``.

    ``t`` and ``g`` arrive already multiplied by 1000. The guidance branch exists only for guidance-distilled
    checkpoints (FLUX.1-dev); FLUX.1-schnell has none.
    """

    def __init__(self, dim: int, pooled_dim: int, with_guidance: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.guidance_embedder = TimestepEmbedding(256, dim) if with_guidance else None
        self.text_embedder = PooledTextProjection(pooled_dim, dim)

    def forward(self, timestep, pooled_projection, guidance=None):
        dtype = pooled_projection.dtype
        temb = self.timestep_embedder(sinusoidal_timestep_embedding(timestep).astype(dtype))
        if self.guidance_embedder is not None:
            temb = temb + self.guidance_embedder(sinusoidal_timestep_embedding(guidance).astype(dtype))
        return temb + self.text_embedder(pooled_projection)
