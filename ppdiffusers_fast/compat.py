"""Small patches that make ppdiffusers 0.29 usable on Paddle 3.x.

Applied (once) by the modules that import ppdiffusers, before their first ppdiffusers import: importing
the package itself patches nothing, so its pure parts (losses, schedules) cost little more than Paddle.

1. Paddle 3's ``nn.ParameterDict`` has no ``keys()/items()/values()``; ``ppdiffusers.peft`` calls them.
2. Importing ppdiffusers sets ``np.bool = bool`` (a numpy 1.x workaround); under numpy 2 that breaks
   ``np.testing`` and any code that uses ``np.bool`` as the numpy boolean type. It is restored to ``np.bool_``.
3. ppdiffusers' attention processors call ``F.scaled_dot_product_attention_`` (layout
   ``[B, L, heads, head_dim]``), which ppdiffusers defines only when fused GPU attention exists.
   The fallback below computes softmax(q k^T * scale + mask) v exactly, on any device and dtype.
"""
import math

import numpy as np
import paddle
import paddle.nn.functional as F

_APPLIED = False


def attention_blhd(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   training=True, **unused):
    """Scaled dot-product attention on ``[B, L, H, D]`` tensors (math path, fp32 softmax).

    Args:
        query: ``[B, Lq, H, D]``; key, value: ``[B, Lk, H, D]``.
        attn_mask: optional, broadcastable to ``[B, H, Lq, Lk]``; boolean (True = keep) or additive.
    Returns:
        ``[B, Lq, H, D]`` in the dtype of ``query``.
    """
    head_dim = query.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    q = query.transpose([0, 2, 1, 3]).astype("float32")
    k = key.transpose([0, 2, 1, 3]).astype("float32")
    v = value.transpose([0, 2, 1, 3]).astype("float32")
    scores = paddle.matmul(q, k, transpose_y=True) * scale
    if is_causal:
        lq, lk = scores.shape[-2], scores.shape[-1]
        causal = paddle.tril(paddle.ones([lq, lk], dtype="bool"))
        scores = paddle.where(causal, scores, paddle.full_like(scores, float("-inf")))
    if attn_mask is not None:
        if attn_mask.dtype == paddle.bool:
            scores = paddle.where(attn_mask, scores, paddle.full_like(scores, float("-inf")))
        else:
            scores = scores + attn_mask.astype("float32")
    probs = F.softmax(scores, axis=-1)
    if dropout_p > 0.0 and training:
        probs = F.dropout(probs, p=dropout_p)
    out = paddle.matmul(probs, v).transpose([0, 2, 1, 3])
    return out.astype(query.dtype)


def _patch_parameter_dict():
    cls = paddle.nn.ParameterDict
    if not hasattr(cls, "keys"):
        cls.keys = lambda self: self._parameters.keys()
    if not hasattr(cls, "items"):
        cls.items = lambda self: self._parameters.items()
    if not hasattr(cls, "values"):
        cls.values = lambda self: self._parameters.values()


def apply():
    """Apply the patches (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_parameter_dict()
    import ppdiffusers  # noqa: F401  (its import rebinds np.bool)

    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        np.bool = np.bool_
    if not hasattr(F, "scaled_dot_product_attention_"):
        F.scaled_dot_product_attention_ = attention_blhd
    _APPLIED = True
