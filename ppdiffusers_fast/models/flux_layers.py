"""Building blocks of the FLUX.1 transformer (Black Forest Labs, 2024), in Paddle.

Every sub-layer carries the name it has in the diffusers checkpoint layout, so that a diffusers state dict maps
onto these layers one to one (Linear weights transposed: Paddle stores ``[in, out]``).

Notation: B batch, L_img image tokens, L_txt text tokens, L = L_txt + L_img, H heads, D head dim, C = H * D.
"""
import math
from typing import List

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .flux_embeddings import apply_rope
from .ops import Linear, gated_add, modulate

# ----------------------------------------------------------------------------------------------------------------
# Normalisation and modulation
# ----------------------------------------------------------------------------------------------------------------


def layer_norm_no_affine(x: paddle.Tensor, eps: float = 1e-6) -> paddle.Tensor:
    """LayerNorm over the last axis without scale or bias."""
    return F.layer_norm(x, x.shape[-1:], epsilon=eps)


class RMSNorm(nn.Layer):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis (computed in float32). ``weight: [dim]``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x):
        x32 = x if x.dtype == paddle.float32 else x.astype("float32")
        weight = self.weight if self.weight.dtype == paddle.float32 else self.weight.astype("float32")
        normed = x32 * paddle.rsqrt(paddle.mean(x32 * x32, axis=-1, keepdim=True) + self.eps)
        normed = normed * weight
        return normed if x.dtype == paddle.float32 else normed.astype(x.dtype)


class AdaLayerNormZero(nn.Layer):
    """adaLN-Zero of the double block (DiT, Peebles & Xie 2023, sec. 3.2).

    ``(shift, scale, gate, shift_mlp, scale_mlp, gate_mlp) = linear(silu(temb))`` split in 6;
    returns ``LN(x) * (1 + scale) + shift`` and the other four vectors ``[B, C]``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, 6 * dim)

    def forward(self, x, temb):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = paddle.chunk(self.linear(F.silu(temb)), 6, axis=1)
        return modulate(layer_norm_no_affine(x), scale, shift), gate, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nn.Layer):
    """adaLN-Zero of the single block: ``(shift, scale, gate) = linear(silu(temb))``; returns modulated x and gate."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, 3 * dim)

    def forward(self, x, temb):
        shift, scale, gate = paddle.chunk(self.linear(F.silu(temb)), 3, axis=1)
        return modulate(layer_norm_no_affine(x), scale, shift), gate


class AdaLayerNormContinuous(nn.Layer):
    """Final modulation: ``(scale, shift) = linear(silu(temb))`` (scale first); ``LN(x) * (1 + scale) + shift``."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.linear = Linear(cond_dim, 2 * dim)

    def forward(self, x, temb):
        scale, shift = paddle.chunk(self.linear(F.silu(temb).astype(x.dtype)), 2, axis=1)
        return modulate(layer_norm_no_affine(x), scale, shift)


# ----------------------------------------------------------------------------------------------------------------
# Attention and feed-forward
# ----------------------------------------------------------------------------------------------------------------


def attention_math(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> paddle.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` written out, with the softmax in float32 (Vaswani et al. 2017, eq. 1): the
    reference form of :func:`attention`.

    Args:
        q, k, v: ``[B, L, H, D]``.
    Returns:
        ``[B, L, H * D]`` in the dtype of ``q``.
    """
    heads, head_dim = q.shape[2], q.shape[3]
    q_t = q.transpose([0, 2, 1, 3])
    k_t = k.transpose([0, 2, 1, 3])
    v_t = v.transpose([0, 2, 1, 3])
    scores = paddle.matmul(q_t, k_t, transpose_y=True).astype("float32") * (1.0 / math.sqrt(head_dim))
    probs = F.softmax(scores, axis=-1).astype(v.dtype)
    out = paddle.matmul(probs, v_t).transpose([0, 2, 1, 3])
    return out.reshape([0, 0, heads * head_dim]).astype(q.dtype)


# Score maps of one chunk of heads in :func:`attention_in_chunks` stay about this size (bytes), so that the softmax
# and both products of a chunk work in the core's cache: 1.6x faster than one pass over all heads at 1088 tokens.
SCORE_CHUNK_BYTES = 2 * 2**20


def attention_in_chunks(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> paddle.Tensor:
    """:func:`attention_math`'s values (q scaled first, as ``F.scaled_dot_product_attention`` does) computed a few
    (batch, head) pairs at a time: ``[B, L, H, D]`` -> ``[B, L, H * D]``. Each chunk's ``[n, L, L]`` scores fit
    in cache (:data:`SCORE_CHUNK_BYTES`); the chunks are independent, so forward and backward equal the one-pass
    form's. Dygraph only (the chunk count follows the batch size)."""
    batch, length, heads, head_dim = q.shape
    rows = lambda t: t.transpose([0, 2, 1, 3]).reshape([batch * heads, length, head_dim])  # noqa: E731
    q_rows, k_rows, v_rows = rows(q * (1.0 / math.sqrt(head_dim))), rows(k), rows(v)
    per_chunk = max(1, SCORE_CHUNK_BYTES // (4 * length * length))
    sections = [min(per_chunk, batch * heads - start) for start in range(0, batch * heads, per_chunk)]
    outs = []
    for q_c, k_c, v_c in zip(*(paddle.split(t, sections, axis=0) for t in (q_rows, k_rows, v_rows))):
        scores = paddle.matmul(q_c, k_c, transpose_y=True).astype("float32")
        outs.append(paddle.matmul(F.softmax(scores, axis=-1).astype(v.dtype), v_c))
    out = paddle.concat(outs, axis=0) if len(outs) > 1 else outs[0]
    out = out.reshape([batch, heads, length, head_dim]).transpose([0, 2, 1, 3])
    return out.reshape([batch, length, heads * head_dim]).astype(q.dtype)


def _flash_attention_applies(dtype) -> bool:
    return dtype in (paddle.float16, paddle.bfloat16) and paddle.get_device().startswith("gpu")


def attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> paddle.Tensor:
    """Attention over ``[B, L, H, D]`` -> ``[B, L, H * D]``.

    ``F.scaled_dot_product_attention`` (forward and backward) where Paddle has a fused kernel for it (flash
    attention on GPUs in float16 / bfloat16) and in static graphs (``to_static``, the predictor); otherwise, in
    dygraph, :func:`attention_in_chunks`, the fastest correct form Paddle's own operators give on CPU.
    """
    heads, head_dim = q.shape[2], q.shape[3]
    if _flash_attention_applies(q.dtype) or not paddle.in_dynamic_mode():
        return F.scaled_dot_product_attention(q, k, v).reshape([0, 0, heads * head_dim])
    return attention_in_chunks(q, k, v)


class FluxAttention(nn.Layer):
    """Multi-head attention with RMSNorm on queries and keys, and rotary positions.

    Joint form (double block, ``joint=True``): text tokens get their own projections (``add_*_proj``,
    ``norm_added_*``, ``to_add_out``); text and image streams are concatenated (text first) for one attention.
    Single form (``joint=False``): only ``to_q/to_k/to_v`` and the norms; the output projection lives in the block.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)
        self.to_q = Linear(dim, inner)
        self.to_k = Linear(dim, inner)
        self.to_v = Linear(dim, inner)
        self.joint = joint
        if joint:
            self.to_out = nn.LayerList([Linear(inner, dim), nn.Dropout(0.0)])
            self.norm_added_q = RMSNorm(head_dim)
            self.norm_added_k = RMSNorm(head_dim)
            self.add_q_proj = Linear(dim, inner)
            self.add_k_proj = Linear(dim, inner)
            self.add_v_proj = Linear(dim, inner)
            self.to_add_out = Linear(inner, dim)

    def _split_heads(self, x):
        return x.reshape([0, 0, self.heads, self.head_dim])

    def forward(self, hidden_states, rope, encoder_hidden_states=None):
        """hidden_states ``[B, L_img, C]`` (joint) or ``[B, L, C]`` (single); encoder_hidden_states ``[B, L_txt, C]``;
        rope ``[B, L, H, D / 2]`` complex64 rotations (``flux_embeddings.rope_rotations``).

        Returns ``(image_out [B, L_img, C], text_out [B, L_txt, C])`` when joint, else ``[B, L, C]``.
        """
        q = self.norm_q(self._split_heads(self.to_q(hidden_states)))
        k = self.norm_k(self._split_heads(self.to_k(hidden_states)))
        v = self._split_heads(self.to_v(hidden_states))
        if self.joint:
            text_len = encoder_hidden_states.shape[1]
            q_txt = self.norm_added_q(self._split_heads(self.add_q_proj(encoder_hidden_states)))
            k_txt = self.norm_added_k(self._split_heads(self.add_k_proj(encoder_hidden_states)))
            v_txt = self._split_heads(self.add_v_proj(encoder_hidden_states))
            q = paddle.concat([q_txt, q], axis=1)
            k = paddle.concat([k_txt, k], axis=1)
            v = paddle.concat([v_txt, v], axis=1)
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)
        out = attention(q, k, v)
        if not self.joint:
            return out
        # one split (its gradient is a concat) rather than two slices (each slice's gradient writes a zero tensor
        # of the full sequence); -1 keeps the image length dynamic under to_static
        text_out, image_out = paddle.split(out, [text_len, -1], axis=1)
        image_out = self.to_out[1](self.to_out[0](image_out))
        return image_out, self.to_add_out(text_out)


class GeluTanhProjection(nn.Layer):
    """``gelu_tanh(proj(x))``, named ``net.0`` in the feed-forward."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate=True)


class FeedForward(nn.Layer):
    """``net.2(net.0(x))``: ``[.., C] -> [.., 4C] (gelu tanh) -> [.., C]``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.LayerList([GeluTanhProjection(dim, dim * mult), nn.Dropout(0.0), Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------


class FluxTransformerBlock(nn.Layer):
    """Double-stream (MM-DiT) block: separate weights per stream, one joint attention.

    For each stream s (image x, text c) with modulation from ``temb``:
    ``s = s + gate_msa * Attn(AdaLN(s))``; ``s = s + gate_mlp * FF(LN(s) * (1 + scale_mlp) + shift_mlp)``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, heads, head_dim, joint=True)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def forward(self, hidden_states, encoder_hidden_states, temb, rope):
        """hidden_states ``[B, L_img, C]``, encoder_hidden_states ``[B, L_txt, C]``, temb ``[B, C]``.

        Returns ``(encoder_hidden_states, hidden_states)`` with unchanged shapes (the diffusers order).
        """
        x_mod, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        c_mod, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, temb)
        attn_img, attn_txt = self.attn(x_mod, rope, encoder_hidden_states=c_mod)

        hidden_states = gated_add(hidden_states, gate, attn_img)
        ff_in = modulate(layer_norm_no_affine(hidden_states), scale_mlp, shift_mlp)
        hidden_states = gated_add(hidden_states, gate_mlp, self.ff(ff_in))

        encoder_hidden_states = gated_add(encoder_hidden_states, c_gate, attn_txt)
        c_ff_in = modulate(layer_norm_no_affine(encoder_hidden_states), c_scale_mlp, c_shift_mlp)
        encoder_hidden_states = gated_add(encoder_hidden_states, c_gate_mlp, self.ff_context(c_ff_in))
        if encoder_hidden_states.dtype == paddle.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class FluxSingleTransformerBlock(nn.Layer):
    """Single-stream block on the concatenated sequence ``h = [text; image]``, attention and MLP in parallel:

    ``y = AdaLN(h)``; ``h = h + gate * proj_out([Attn(y), gelu_tanh(proj_mlp(y))])``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = Linear(dim, self.mlp_hidden_dim)
        self.proj_out = Linear(dim + self.mlp_hidden_dim, dim)
        self.attn = FluxAttention(dim, heads, head_dim, joint=False)

    def forward(self, hidden_states, encoder_hidden_states, temb, rope):
        """Same signature and return order as :class:`FluxTransformerBlock`."""
        text_len = encoder_hidden_states.shape[1]
        joint = paddle.concat([encoder_hidden_states, hidden_states], axis=1)
        modulated, gate = self.norm(joint, temb)
        mlp = F.gelu(self.proj_mlp(modulated), approximate=True)
        attn = self.attn(modulated, rope)
        joint = gated_add(joint, gate, self.proj_out(paddle.concat([attn, mlp], axis=2)))
        if joint.dtype == paddle.float16:
            joint = joint.clip(-65504, 65504)
        text_out, image_out = paddle.split(joint, [text_len, -1], axis=1)
        return text_out, image_out


def count_parameters(layer: nn.Layer) -> int:
    """Number of scalars in all parameters (works under ``paddle.LazyGuard``: reads shapes only)."""
    total = 0
    for param in layer.parameters():
        size = 1
        for dim in param.shape:
            size *= int(dim)
        total += size
    return total


__all__: List[str] = [
    "RMSNorm",
    "AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous", "attention", "attention_math",
    "attention_in_chunks",
    "FluxAttention",
    "FeedForward", "FluxTransformerBlock", "FluxSingleTransformerBlock", "count_parameters",
]
