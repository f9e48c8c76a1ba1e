"""Rewrites of a saved PIR program (``paddle.jit.save`` JSON) for the Paddle Inference CPU predictor.

Paddle Inference on CPU runs the graph op by op; a transformer of a few million parameters then spends as much
time in its elementwise ops (each a full pass over a ``[B, L, C]`` tensor) as in its matrix products. Each
rewrite below replaces a pattern of the FLUX graph by fewer, faster ops with the same values (float32
rounding aside), and leaves every other op as it is:

- :func:`fuse_rms_norm`: ``x * rsqrt(mean(x * x, -1) + eps) * w`` (six ops) -> one ``rms_norm``.
- :func:`fuse_attention`: ``transpose(softmax(s * q_t k_t^T) v_t)`` over ``[B, L, H, D]`` (seven ops and the
  ``[B, H, L, L]`` score maps) -> ``self_dp_attention(stack([q, k, v], 2))``, Paddle's fused CPU attention.
- :func:`expand_broadcast_operands`: a broadcasting ``*, +, -, /`` gets its small operand expanded first.

:func:`rewrite_for_cpu` applies them in that order (the first two look for the unexpanded patterns).
"""
from pathlib import Path
from typing import Callable, Dict, Optional

import paddle

__all__ = ["rewrite_for_cpu", "fuse_rms_norm", "fuse_attention", "expand_broadcast_operands",
           "attention_fusion_available"]

_BROADCAST_OPS = ("pd_op.multiply", "pd_op.add", "pd_op.subtract", "pd_op.divide")
_KEPT_OPS = ("builtin.parameter", "builtin.constant", "pd_op.data", "builtin.shadow_output", "pd_op.fetch")


# ----------------------------------------------------------------------------------------------------------------
# Loading, saving and walking a program
# ----------------------------------------------------------------------------------------------------------------


def _rewrite_program(model_file: Path, rewrite: Callable) -> int:
    """Load the PIR JSON ``model_file``, apply ``rewrite(program) -> count`` under its program guard, drop ops
    left without users, save it back. Returns the count (0, file untouched, for a program that is not JSON)."""
    model_file = Path(model_file)
    if model_file.suffix != ".json":
        return 0
    was_dynamic = paddle.in_dynamic_mode()
    paddle.enable_static()
    try:
        program = paddle.static.Program()
        paddle.base.core.deserialize_pir_program(str(model_file), program)
        with paddle.static.program_guard(program):
            count = rewrite(program)
        if count:
            _erase_dead_ops(program)
            paddle.base.core.serialize_pir_program(program, str(model_file), True, False, True)
    finally:
        if was_dynamic:
            paddle.disable_static()
    return count


def _erase_dead_ops(program) -> None:
    """Remove ops whose results are all unused (repeatedly, last op first); graph inputs, parameters and
    outputs stay."""
    block = program.global_block()
    changed = True
    while changed:
        changed = False
        for op in reversed(list(block.ops)):
            if op.name() in _KEPT_OPS or not op.num_results():
                continue
            if all(op.result(index).use_empty() for index in range(op.num_results())):
                op.erase()
                changed = True


def _producer(value, *names: str):
    """The op defining ``value`` when its name is one of ``names``, else None."""
    op = value.get_defining_op()
    return op if op is not None and op.name() in names else None


def _only_user(value, name: str):
    """The single op reading ``value`` when it is a ``name`` op, else None."""
    users = value.all_used_ops()
    return users[0] if len(users) == 1 and users[0].name() == name else None


def _has_one_user(value) -> bool:
    return len(value.all_used_ops()) == 1


def _constant(value) -> Optional[float]:
    """The number held by a one-element ``pd_op.full`` ``value``, else None."""
    op = _producer(value, "pd_op.full")
    return None if op is None else float(op.attrs()["value"])


def _int_list(value) -> Optional[list]:
    """The integers of a ``pd_op.full_int_array`` ``value``, else None."""
    op = _producer(value, "pd_op.full_int_array")
    return None if op is None else [int(v) for v in op.attrs()["value"]]


def _is_float32(*values) -> bool:
    return all(value.dtype == paddle.float32 for value in values)


def _same_shape(a, b) -> bool:
    return list(a) == list(b)


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
        scaled = _producer(normed, "pd_op.multiply")
        if scaled is None or len(weight.shape) != 1 or not _has_one_user(normed):
            continue
        for x, inv_rms in ((scaled.operand_source(0), scaled.operand_source(1)),
                           (scaled.operand_source(1), scaled.operand_source(0))):
            rsqrt = _producer(inv_rms, "pd_op.rsqrt")
            if rsqrt is None or not _has_one_user(inv_rms) or not x.shape or weight.shape[0] != x.shape[-1]:
                continue
            shifted = _producer(rsqrt.operand_source(0), "pd_op.scale")
            if shifted is None or not _has_one_user(rsqrt.operand_source(0)):
                continue
            if _constant(shifted.operand_source(1)) != 1.0 or not shifted.attrs()["bias_after_scale"]:
                continue
            eps = float(shifted.attrs()["bias"])
            mean = _producer(shifted.operand_source(0), "pd_op.mean")
            if mean is None or not mean.attrs()["keepdim"] or not _has_one_user(shifted.operand_source(0)):
                continue
            if _int_list(mean.operand_source(1)) not in ([-1], [len(x.shape) - 1]):
                continue
            square = _producer(mean.operand_source(0), "pd_op.multiply")
            if square is None or not _has_one_user(mean.operand_source(0)):
                continue
            if not (square.operand_source(0).is_same(x) and square.operand_source(1).is_same(x)):
                continue
            if _is_float32(x, weight) and x.shape[-1] > 0:
                return x, weight, eps
    return None


def fuse_rms_norm(model_file: Path) -> int:
    """Every RMSNorm ``x * rsqrt(mean(x^2, -1) + eps) * w`` (float32) becomes one ``rms_norm`` op (Paddle's
    CPU kernel: one pass computing the mean of squares, one writing the output, instead of six ops with two
    broadcasts). Returns the number of norms fused."""

    def rewrite(program):
        from paddle.incubate.nn.functional import fused_rms_norm

        fused = 0
        for op in list(program.global_block().ops):
            match = _match_rms_norm(op)
            if match is None:
                continue
            x, weight, eps = match
            paddle.pir.set_insertion_point(op)
            normed = fused_rms_norm(x, weight, None, eps, len(x.shape) - 1)[0]
            op.result(0).replace_all_uses_with(normed)
            fused += 1
        return fused

    return _rewrite_program(model_file, rewrite)


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------


def attention_fusion_available() -> bool:
    """Paddle's ``self_dp_attention`` CPU kernel needs AVX-512 (and a build with MKL and oneDNN)."""
    core = paddle.base.core
    return bool(getattr(core, "supports_avx512f", lambda: False)()) and core.is_compiled_with_mkldnn()


def _transposed_heads_source(value):
    """``x`` when ``value = transpose(x, [0, 2, 1, 3])`` (``[B, L, H, D] -> [B, H, L, D]``), else None."""
    op = _producer(value, "pd_op.transpose")
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
    scale_op = _producer(scores, "pd_op.scale")
    if scale_op is not None:
        factor = _constant(scale_op.operand_source(1))
        if factor is None or float(scale_op.attrs()["bias"]) != 0.0 or not _has_one_user(scores):
            return None
        scale, scores = factor, scale_op.operand_source(0)
    if not _has_one_user(scores):
        return None
    qk = _producer(scores, "pd_op.matmul")
    pv = _only_user(softmax.result(0), "pd_op.matmul")
    if qk is None or pv is None or not pv.operand_source(0).is_same(softmax.result(0)):
        return None
    if qk.attrs()["transpose_x"] or not qk.attrs()["transpose_y"]:
        return None
    if pv.attrs()["transpose_x"] or pv.attrs()["transpose_y"]:
        return None
    last = _only_user(pv.result(0), "pd_op.transpose")
    if last is None or [int(p) for p in last.attrs()["perm"]] != [0, 2, 1, 3]:
        return None
    q, k, v = (_transposed_heads_source(value) for value in
               (qk.operand_source(0), qk.operand_source(1), pv.operand_source(1)))
    if q is None or k is None or v is None or not _is_float32(q, k, v):
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

    def rewrite(program):
        fused = 0
        for op in list(program.global_block().ops):
            match = _match_attention(op) if op.name() == "pd_op.softmax" else None
            if match is None:
                continue
            q, k, v, scale, last = match
            paddle.pir.set_insertion_point(last)
            packed = paddle.stack([q, k, v], axis=2)
            attended = paddle._C_ops.self_dp_attention(packed, scale, int(q.shape[2]))
            last.result(0).replace_all_uses_with(attended)
            fused += 1
        return fused

    return _rewrite_program(model_file, rewrite)


# ----------------------------------------------------------------------------------------------------------------
# Broadcasts
# ----------------------------------------------------------------------------------------------------------------


def _is_linear_bias_add(op) -> bool:
    """``add(matmul(x, W), b)`` with a 1-D ``b``: what oneDNN's fc fusion turns into one ``fc`` op."""
    return (op.name() == "pd_op.add" and len(op.operand_source(1).shape) == 1
            and _producer(op.operand_source(0), "pd_op.matmul") is not None)


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
            if _same_shape(a.shape, b.shape) or (keep_linear_bias and _is_linear_bias_add(op)):
                continue
            for index, (full, small) in enumerate(((a, b), (b, a))):
                if _same_shape(full.shape, out.shape):
                    paddle.pir.set_insertion_point(op)
                    op.operand(1 - index).set_source(paddle.expand_as(small, full))
                    expanded += 1
                    break
        return expanded

    return _rewrite_program(model_file, rewrite)


def rewrite_for_cpu(model_file: Path, fuse_norms: bool = True, fuse_attentions: bool = True,
                    expand_broadcasts: bool = True, keep_linear_bias: bool = False) -> Dict[str, int]:
    """Apply the rewrites of this module to ``model_file`` in place. Returns ``{rewrite: count}``."""
    counts = {"rms_norm": 0, "attention": 0, "expanded": 0}
    if fuse_norms:
        counts["rms_norm"] = fuse_rms_norm(model_file)
    if fuse_attentions:
        counts["attention"] = fuse_attention(model_file)
    if expand_broadcasts:
        counts["expanded"] = expand_broadcast_operands(model_file, keep_linear_bias=keep_linear_bias)
    return counts
