"""Embeddings of the FLUX.1 transformer: 3-axis rotary positions from ids, sinusoidal timestep / guidance
embedding, pooled-text projection. Sub-layer names follow the diffusers checkpoint layout.
"""
import math
from typing import Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .ops import Linear


def rope_cos_sin(ids: paddle.Tensor, axes_dims: Sequence[int], theta: float = 10000.0):
    """3-axis rotary embedding from integer positions (FLUX ``EmbedND``), one angle per channel pair.

    For each axis a with ``d_a = axes_dims[a]`` channels and position ``p = ids[:, a]``, the angles are
    ``p * theta^(-2j / d_a)`` for ``j = 0 .. d_a/2 - 1``; the axes are concatenated along the pairs. Angles are
    computed in float64 as the reference does (which then repeats each one for the two channels of its pair).

    Args:
        ids: ``[L, n_axes]`` positions (text ids first, then image ids).
        axes_dims: channels per axis, summing to the head dim D; each must be even.
    Returns:
        ``(cos, sin)``, each ``[L, D / 2]`` float32.
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
        cos_parts.append(paddle.cos(angles))
        sin_parts.append(paddle.sin(angles))
    cos = paddle.concat(cos_parts, axis=-1).astype("float32")
    sin = paddle.concat(sin_parts, axis=-1).astype("float32")
    return cos, sin


def rope_rotations(cos: paddle.Tensor, sin: paddle.Tensor, batch, heads: int) -> paddle.Tensor:
    """The unit complex numbers ``cos + i sin`` of :func:`rope_cos_sin`, expanded once to
    ``[batch, L, heads, D / 2]`` complex64 so that every block's rotations multiply same-shape tensors.
    ``batch`` is an int, or a 0-d tensor (``paddle.shape(x)[0]``) in a static graph with a dynamic batch."""
    rotations = paddle.complex(cos, sin)[None, :, None, :]
    return paddle.expand(rotations, [batch, -1, heads, -1])


def apply_rope(x: paddle.Tensor, rotations: paddle.Tensor) -> paddle.Tensor:
    """Rotate channel pairs ``(x_{2j}, x_{2j+1})`` by the angle of position and pair (RoFormer, eq. 34), as one
    complex product ``(x_{2j} + i x_{2j+1}) (cos_j + i sin_j)`` in float32:

    ``out_{2j} = x_{2j} cos_j - x_{2j+1} sin_j``, ``out_{2j+1} = x_{2j+1} cos_j + x_{2j} sin_j``, the values of
    the reference's ``x * cos + rot(x) * sin`` with ``rot(x)_{2j} = -x_{2j+1}``, ``rot(x)_{2j+1} = x_{2j}``.
    The pairs are viewed as complex numbers in place (``as_complex``), so no slicing or interleaving runs.

    Args:
        x: ``[B, L, H, D]``; rotations: ``[B, L, H, D / 2]`` complex64 (:func:`rope_rotations`).
    Returns:
        ``[B, L, H, D]`` in the dtype of ``x``.
    """
    x32 = x if x.dtype == paddle.float32 else x.astype("float32")
    head_dim = x.shape[-1]  # static even under to_static, so the graph keeps the head dim known
    pairs = paddle.as_complex(x32.reshape([0, 0, 0, head_dim // 2, 2]))
    out = paddle.as_real(pairs * rotations).reshape([0, 0, 0, head_dim])
    return out if x.dtype == paddle.float32 else out.astype(x.dtype)


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
        self.linear_1 = Linear(in_channels, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class PooledTextProjection(nn.Layer):
    """Pooled CLIP text projection ``linear_2(silu(linear_1(x)))``: ``[B, pooled_dim] -> [B, dim]``."""

    def __init__(self, pooled_dim: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(pooled_dim, dim)
        self.linear_2 = Linear(dim, dim)

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
