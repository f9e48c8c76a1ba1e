"""Element-wise and linear building blocks written for the speed of Paddle's own kernels, same values as the
plain expressions (no reordering of float operations).

Measured on one CPU core, ``[4, 1088, 256]`` float32 (``docs/performance.md`` has the single-op table):

- a linear layer as one ``addmm`` (the GEMM adds the bias) instead of ``matmul`` + a broadcast bias add:
  20 ms against 33 ms for ``256 -> 1024``;
- ``x * g[:, None]`` with ``g [B, C]``: Paddle's CPU broadcast kernel takes 4.8 ms, ``expand`` + same-shape
  multiply 2.8 ms. :func:`expand_tokens` expands a per-sample vector once, the product then runs same-shape.
- :func:`dense_results`: transposes and splits as dense tensors instead of strided views.
"""
import contextlib

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

__all__ = ["linear", "Linear", "expand_tokens", "modulate", "gated_add", "dense_results"]

_STRIDE_FLAG = "FLAGS_use_stride_kernel"


@contextlib.contextmanager
def dense_results():
    """Run the enclosed dygraph ops (forward and backward) with Paddle's ``FLAGS_use_stride_kernel`` off, the
    previous value restored after.

    With the flag on (Paddle's default) transposes, splits and slices return strided views, and the next op that
    needs a dense input copies them with Paddle's generic strided-copy kernel, which is slow on CPU; off, each of
    them runs its own dense kernel. One thread, the 2 + 4 block benchmark model: forward at batch 4 and 256 + 64
    tokens 353 -> 270 ms, a rank-16 LoRA training step 909 -> 741 ms; values are unchanged.
    """
    previous = paddle.get_flags([_STRIDE_FLAG])[_STRIDE_FLAG]
    if not previous:
        yield
        return
    paddle.set_flags({_STRIDE_FLAG: False})
    try:
        yield
    finally:
        paddle.set_flags({_STRIDE_FLAG: previous})


def linear(x: paddle.Tensor, weight: paddle.Tensor, bias) -> paddle.Tensor:
    """``x @ weight + bias``: ``x [..., in]``, ``weight [in, out]``, ``bias [out]`` or None -> ``[..., out]``.

    In dygraph the bias is added by the GEMM (``paddle.addmm`` on ``x`` viewed as ``[N, in]``); in a static graph
    (``to_static``, the predictor) ``F.linear``, which Paddle Inference fuses into one ``fc`` op itself.
    Paddle 3.3's ``addmm`` backward crashes (segmentation fault) when its bias needs no gradient while another
    input does (a frozen base layer under LoRA): the frozen bias then enters as a detached alias that asks for
    one, and that gradient is dropped.
    """
    if bias is None or x.ndim < 2 or not paddle.in_dynamic_mode():
        return F.linear(x, weight, bias)
    if bias.stop_gradient and paddle.is_grad_enabled() and not (x.stop_gradient and weight.stop_gradient):
        bias = bias.detach()
        bias.stop_gradient = False
    leading = x.shape[:-1]
    out = paddle.addmm(bias, x.reshape([-1, x.shape[-1]]), weight)
    return out.reshape([*leading, weight.shape[-1]])


class Linear(nn.Linear):
    """``paddle.nn.Linear`` (same parameters ``weight [in, out]``, ``bias [out]``) computed by :func:`linear`."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return linear(x, self.weight, self.bias)


def expand_tokens(vector: paddle.Tensor, like: paddle.Tensor) -> paddle.Tensor:
    """Per-sample ``vector [B, C]`` expanded to ``like``'s shape ``[B, L, C]`` (a dense copy)."""
    return paddle.expand_as(vector.unsqueeze(1), like)


def modulate(normed: paddle.Tensor, scale: paddle.Tensor, shift: paddle.Tensor) -> paddle.Tensor:
    """adaLN modulation ``normed * (1 + scale[:, None]) + shift[:, None]`` (DiT, eq. of sec. 3.2) with the
    vectors expanded first: ``normed [B, L, C]``, ``scale, shift [B, C]`` -> ``[B, L, C]``."""
    return normed * expand_tokens(1 + scale, normed) + expand_tokens(shift, normed)


def gated_add(residual: paddle.Tensor, gate: paddle.Tensor, update: paddle.Tensor) -> paddle.Tensor:
    """Gated residual ``residual + gate[:, None] * update``: ``residual, update [B, L, C]``, ``gate [B, C]``."""
    return residual + expand_tokens(gate, update) * update
