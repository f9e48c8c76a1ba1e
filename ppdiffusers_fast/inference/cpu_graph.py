"""Rewrites of a saved PIR program (``paddle.jit.save`` JSON) for the Paddle Inference CPU predictor.

Paddle Inference on CPU runs the graph op by op; a transformer of a few million parameters then spends as much
time in its elementwise ops (each a full pass over a ``[B, L, C]`` tensor) as in its matrix products. Each
rewrite below replaces a pattern of the FLUX graph by fewer, faster ops with the same values (float32
rounding aside), and leaves every other op as it is:

- :func:`fuse_rms_norm`: ``x * rsqrt(mean(x * x, -1) + eps) * w`` (six ops) -> one ``rms_norm``.
- :func:`fuse_attention`: ``transpose(softmax(s * q_t k_t^T) v_t)`` over ``[B, L, H, D]`` (seven ops and the
  ``[B, H, L, L]`` score maps) -> ``self_dp_attention(stack([q, k, v], 2))``, Paddle's fused CPU attention.
- :func:`expand_broadcast_operands`: a broadcasting ``*, +, -, /`` gets its small operand expanded first.
- :func:`reshape_in_place`: a ``reshape`` whose input dies with it becomes ``reshape_`` (no copy).

:func:`rewrite_for_cpu` applies them in that order, with the fusions into the project's own kernels
(``kernel_fusions.py``: adaLN modulation, gated residuals, rotary embedding, packed attention input) before the
expansion (every fusion looks for the unexpanded patterns), and :func:`reshape_in_place` last.
"""
from pathlib import Path
from typing import Dict

import paddle

from .pir_program import (KEPT_OPS, constant, has_one_user, int_list, is_float32, only_user, producer,
                          replace_matches, rewrite_program, same_shape)

__all__ = ["rewrite_for_cpu", "fuse_rms_norm", "fuse_attention", "expand_broadcast_operands",
           "attention_fusion_available"]

_BROADCAST_OPS = ("pd_op.multiply", "pd_op.add", "pd_op.subtract", "pd_op.divide")


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------------------


def _match_rms_norm(op):
    """``(x, weight, eps)`` when ``op`` is the last op of ``(x * rsqrt(mean(x * x, -1, keepdim) + eps)) * w``
    with a 1-D ``w`` of the size of x's last axis (float32), else None."""
    if op.name() != "pd_op.multiply":
        return None
    for normed, weight in ((op.operand_source(0), op.operand_source(1)),
                           (op.operand_source(1), op.operand_source(0))):
        scaled = producer(normed, "pd_op.multiply")
        if scaled is None or len(weight.shape) != 1 or not has_one_user(normed):
            continue
        for x, inv_rms in ((scaled.operand_source(0), scaled.operand_source(1)),
                           (scaled.operand_source(1), scaled.operand_source(0))):
            rsqrt = producer(inv_rms, "pd_op.rsqrt")
            if rsqrt is None or not has_one_user(inv_rms) or not x.shape or weight.shape[0] != x.shape[-1]:
                continue
            shifted = producer(rsqrt.operand_source(0), "pd_op.scale")
            if shifted is None or not has_one_user(rsqrt.operand_source(0)):
                continue
            if constant(shifted.operand_source(1)) != 1.0 or not shifted.attrs()["bias_after_scale"]:
                continue
            eps = float(shifted.attrs()["bias"])
            mean = producer(shifted.operand_source(0), "pd_op.mean")
            if mean is None or not mean.attrs()["keepdim"] or not has_one_user(shifted.operand_source(0)):
                continue
            if int_list(mean.operand_source(1)) not in ([-1], [len(x.shape) - 1]):
                continue
            square = producer(mean.operand_source(0), "pd_op.multiply")
            if square is None or not has_one_user(mean.operand_source(0)):
                continue
            if not (square.operand_source(0).is_same(x) and square.operand_source(1).is_same(x)):
                continue
            if is_float32(x, weight) and x.shape[-1] > 0:
                return x, weight, eps
    return None


def fuse_rms_norm(model_file: Path) -> int:
    """Every RMSNorm ``x * rsqrt(mean(x^2, -1) + eps) * w`` (float32) becomes one ``rms_norm`` op (Paddle's
    CPU kernel: one pass computing the mean of squares, one writing the output, instead of six ops with two
    broadcasts). Returns the number of norms fused."""

    from paddle.incubate.nn.functional import fused_rms_norm

    def match(op):
        found = _match_rms_norm(op)
        return None if found is None else (op, found)

    def build(x, weight, eps):
        return fused_rms_norm(x, weight, None, eps, len(x.shape) - 1)[0]

    return replace_matches(model_file, match, build)


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------


def attention_fusion_available() -> bool:
    """Paddle's ``self_dp_attention`` CPU kernel needs AVX-512 (and a build with MKL and oneDNN)."""
    core = paddle.base.core
    return bool(getattr(core, "supports_avx512f", lambda: False)()) and core.is_compiled_with_mkldnn()


def _transposed_heads_source(value):
    """``x`` when ``value = transpose(x, [0, 2, 1, 3])`` (``[B, L, H, D] -> [B, H, L, D]``), else None."""
    op = producer(value, "pd_op.transpose")
    if op is None or [int(p) for p in op.attrs()["perm"]] != [0, 2, 1, 3]:
        return None
    return op.operand_source(0)


def _match_attention(softmax):
    """``(q, k, v, scale, last_op)`` when ``softmax`` sits in ``transpose(softmax(scale * q_t k_t^T) v_t)``
    with ``q_t = transpose(q, [0, 2, 1, 3])`` etc., q, k, v ``[B, L, H, D]`` float32 with static H and D (the
    scale op optional); else None."""
    if int(softmax.attrs()["axis"]) not in (-1, 3):
        return None
    scores, scale = softmax.operand_source(0), 1.0
    scale_op = producer(scores, "pd_op.scale")
    if scale_op is not None:
        factor = constant(scale_op.operand_source(1))
        if factor is None or float(scale_op.attrs()["bias"]) != 0.0 or not has_one_user(scores):
            return None
        scale, scores = factor, scale_op.operand_source(0)
    if not has_one_user(scores):
        return None
    qk = producer(scores, "pd_op.matmul")
    pv = only_user(softmax.result(0), "pd_op.matmul")
    if qk is None or pv is None or not pv.operand_source(0).is_same(softmax.result(0)):
        return None
    if qk.attrs()["transpose_x"] or not qk.attrs()["transpose_y"]:
        return None
    if pv.attrs()["transpose_x"] or pv.attrs()["transpose_y"]:
        return None
    last = only_user(pv.result(0), "pd_op.transpose")
    if last is None or [int(p) for p in last.attrs()["perm"]] != [0, 2, 1, 3]:
        return None
    q, k, v = (_transposed_heads_source(value) for value in
               (qk.operand_source(0), qk.operand_source(1), pv.operand_source(1)))
    if q is None or k is None or v is None or not is_float32(q, k, v):
        return None
    shapes = [list(x.shape) for x in (q, k, v)]
    if any(len(shape) != 4 or shape[2] <= 0 or shape[3] <= 0 or shape[2:] != shapes[0][2:] for shape in shapes):
        return None
    return q, k, v, scale, last


def fuse_attention(model_file: Path) -> int:
    """Every attention ``softmax(s q k^T) v`` over ``[B, L, H, D]`` tensors (transposes to ``[B, H, L, D]`` and
    back included) becomes one ``self_dp_attention`` op on ``stack([q, k, v], axis=2)`` (``[B, L, 3, H, D]``):
    Paddle's fused CPU attention (AVX-512), which computes scores, the scaled softmax (online, over blocks of
    512 keys) and the value product head by head without writing the ``[B, H, L, L]`` maps. float32 only.
    Returns the number of attentions fused (0 without AVX-512: the kernel needs it)."""
    if not attention_fusion_available():
        return 0

    def match(op):
        found = _match_attention(op) if op.name() == "pd_op.softmax" else None
        return None if found is None else (found[-1], found[:-1])

    def build(q, k, v, scale):
        return paddle._C_ops.self_dp_attention(paddle.stack([q, k, v], axis=2), scale, int(q.shape[2]))

    return replace_matches(model_file, match, build)


# ----------------------------------------------------------------------------------------------------------------
# Broadcasts
# ----------------------------------------------------------------------------------------------------------------


def _is_linear_bias_add(op) -> bool:
    """``add(matmul(x, W), b)`` with a 1-D ``b``: what oneDNN's fc fusion turns into one ``fc`` op."""
    return (op.name() == "pd_op.add" and len(op.operand_source(1).shape) == 1
            and producer(op.operand_source(0), "pd_op.matmul") is not None)


def expand_broadcast_operands(model_file: Path, keep_linear_bias: bool = False) -> int:
    """Every broadcasting elementwise op gets its smaller operand expanded first,
    ``a * b -> a * expand_as(b, a)`` (likewise +, -, /), when ``a`` has the output's shape.

    Paddle's CPU kernels broadcast with a per-element index computation: ``[1, 320, 256] * [1, 1, 256]`` takes
    about 250 us against 23 us for ``expand_as`` + the same-shape product (9x; 5-10x for every FLUX pattern:
    ``[B, L, H, D] * [1, L, 1, D]`` in the rotary embedding, ``[B, L, C] * [B, 1, C]`` in the adaLN modulation
    and gates). The values are bit-identical. Ops where both operands broadcast are left alone, and so are the
    bias adds of linear layers when ``keep_linear_bias`` (oneDNN fuses them into its ``fc`` op).

    Returns:
        the number of operands expanded (0 for a program that is not PIR JSON).
    """

    def rewrite(program):
        expanded = 0
        for op in list(program.global_block().ops):
            if op.name() not in _BROADCAST_OPS:
                continue
            a, b, out = op.operand_source(0), op.operand_source(1), op.result(0)
            if same_shape(a.shape, b.shape) or (keep_linear_bias and _is_linear_bias_add(op)):
                continue
            for index, (full, small) in enumerate(((a, b), (b, a))):
                if same_shape(full.shape, out.shape):
                    paddle.pir.set_insertion_point(op)
                    op.operand(1 - index).set_source(paddle.expand_as(small, full))
                    expanded += 1
                    break
        return expanded

    return rewrite_program(model_file, rewrite)


# ----------------------------------------------------------------------------------------------------------------
# Reshapes
# ----------------------------------------------------------------------------------------------------------------


def reshape_in_place(model_file: Path) -> int:
    """Every ``reshape`` whose input has no other reader and is computed in the graph becomes ``reshape_``.

    Paddle's CPU ``reshape`` copies its input into a new buffer (a full pass over e.g. the ``[B, L, H * D]``
    output of every q / k / v projection); the in-place form relabels the shape of the same buffer. Paddle
    Inference's general in-place pass stays off (see ``compile._predictor_config``); this one touches only
    reshapes whose input dies with them. Returns the number of reshapes rewritten."""

    def match(op):
        if op.name() != "pd_op.reshape":
            return None
        x, shape = op.operand_source(0), int_list(op.operand_source(1))
        source = x.get_defining_op()
        if shape is None or source is None or source.name() in KEPT_OPS or not has_one_user(x):
            return None
        return op, (x, shape)

    return replace_matches(model_file, match, paddle._C_ops.reshape_)


def rewrite_for_cpu(model_file: Path, fuse_norms: bool = True, fuse_attentions: bool = True,
                    fuse_kernels: bool = True, expand_broadcasts: bool = True, in_place_reshapes: bool = True,
                    keep_linear_bias: bool = False) -> Dict[str, int]:
    """Apply the rewrites of this module, and with ``fuse_kernels`` those of ``kernel_fusions.py`` (the project's
    own CPU kernels, when they can be built), to ``model_file`` in place. Returns ``{rewrite: count}``."""
    from .kernel_fusions import KERNEL_FUSIONS, fuse_with_cpu_kernels

    counts = {"rms_norm": 0, "attention": 0, **{name: 0 for name in KERNEL_FUSIONS}, "expanded": 0,
              "reshape_in_place": 0}
    if fuse_norms:
        counts["rms_norm"] = fuse_rms_norm(model_file)
    if fuse_attentions:
        counts["attention"] = fuse_attention(model_file)
    if fuse_kernels:
        counts.update(fuse_with_cpu_kernels(model_file))
    if expand_broadcasts:
        counts["expanded"] = expand_broadcast_operands(model_file, keep_linear_bias=keep_linear_bias)
    if in_place_reshapes:
        counts["reshape_in_place"] = reshape_in_place(model_file)
    return counts
