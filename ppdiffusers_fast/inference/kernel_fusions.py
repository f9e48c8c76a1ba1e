"""Rewrites of a saved PIR program that put the fused CPU kernels of ``cpu_kernels.cc`` in place of op chains.

What each rewrite replaces (per FLUX block; the unfused chain's broadcast operands would otherwise be expanded
by ``cpu_graph.expand_broadcast_operands``, one more pass each):

- :func:`fuse_layer_norm_modulate`: ``layer_norm(x) * m + s`` with ``m, s [B, 1, C]`` (adaLN modulation, 4 per
  double block, 1 per single block and the output norm) -> ``flux_layer_norm_modulate(x, m, s)``.
- :func:`fuse_gated_residual`: ``r + g * y`` with ``g [B, 1, C]`` (adaLN-Zero gates, 4 per double block, 1 per
  single block) -> ``flux_gated_residual(r, g, y)``.
- :func:`fuse_rope`: ``x * cos + (x @ R) * sin`` with ``R`` the constant pair rotation
  (``models.flux_embeddings.pair_rotation_matrix``) and ``cos, sin [1, L, 1, D]`` (q and k of every block) ->
  ``flux_rope(x, cos, sin)``: no ``[B, L, H, D] x [D, D]`` product, no expanded tables.
- :func:`fuse_rope_pack_qkv` (after the two above and ``cpu_graph.fuse_attention``):
  ``stack([flux_rope(concat(q_parts)), flux_rope(concat(k_parts)), concat(v_parts)], 2)``, the packed input of
  ``self_dp_attention`` -> ``flux_rope_pack_qkv(q_parts, k_parts, v_parts, cos, sin)``: one pass writes the packed
  tensor instead of three concats, two rotations and a stack (each concat optional: single blocks have none).

Every pattern must be float32 with the shapes above, and its intermediate values must have no other reader;
anything else is left as it is. The kernels check the run-time shapes again and fail with the shapes in the
message rather than compute on mismatched ones. :func:`fuse_with_cpu_kernels` applies them in this order when the
kernels could be built (:func:`cpu_kernels.load_cpu_kernels`), and nothing otherwise.
"""
from pathlib import Path
from typing import Dict

import numpy as np

from ..models.flux_embeddings import pair_rotation_matrix
from .cpu_kernels import load_cpu_kernels
from .pir_program import constant, has_one_user, int_list, is_float32, producer, replace_matches

__all__ = ["fuse_with_cpu_kernels", "fuse_layer_norm_modulate", "fuse_gated_residual", "fuse_rope",
           "fuse_rope_pack_qkv", "KERNEL_FUSIONS"]


def _fuse(model_file: Path, op_name: str, matcher, kernel_name: str) -> int:
    """Replace every ``op_name`` op where ``matcher(op)`` gives the kernel's arguments by the kernel
    ``kernel_name``; 0 when the kernels are unavailable."""
    kernels = load_cpu_kernels()
    if kernels is None:
        return 0

    def match(op):
        found = matcher(op) if op.name() == op_name else None
        return None if found is None else (op, found)

    return replace_matches(model_file, match, getattr(kernels, kernel_name))


def _operand_pairs(op):
    """Both orders of a binary op's operands: ``[(a, b), (b, a)]``."""
    a, b = op.operand_source(0), op.operand_source(1)
    return [(a, b), (b, a)]


def _is_sample_vector(value, channels) -> bool:
    """``value`` is ``[B, 1, C]`` (B static or not) with the given static ``C``."""
    shape = list(value.shape)
    return len(shape) == 3 and shape[1] == 1 and shape[2] == channels


# ----------------------------------------------------------------------------------------------------------------
# adaLN modulation
# ----------------------------------------------------------------------------------------------------------------


def _match_layer_norm_modulate(add):
    """``(x, scale, shift, epsilon)`` when ``add`` is ``layer_norm(x) * scale + shift`` (no affine weights, over
    the last axis of a 3-D float32 ``x``; scale, shift ``[B, 1, C]``), else None."""
    for product, shift in _operand_pairs(add):
        multiply = producer(product, "pd_op.multiply")
        if multiply is None or not has_one_user(product):
            continue
        for normed, scale in _operand_pairs(multiply):
            norm = producer(normed, "pd_op.layer_norm")
            if norm is None or not normed.is_same(norm.result(0)) or not has_one_user(normed):
                continue
            x = norm.operand_source(0)
            if len(x.shape) != 3 or x.shape[-1] <= 0 or int(norm.attrs()["begin_norm_axis"]) != 2:
                continue
            if norm.operand_source(1).initialized() or norm.operand_source(2).initialized():
                continue  # affine LayerNorm
            if not (norm.result(1).use_empty() and norm.result(2).use_empty()):
                continue
            channels = x.shape[-1]
            if _is_sample_vector(scale, channels) and _is_sample_vector(shift, channels) and \
                    is_float32(x, scale, shift):
                return x, scale, shift, float(norm.attrs()["epsilon"])
    return None


def fuse_layer_norm_modulate(model_file: Path) -> int:
    """Every ``layer_norm(x) * scale + shift`` (adaLN) -> ``flux_layer_norm_modulate``. Returns the count."""
    return _fuse(model_file, "pd_op.add", _match_layer_norm_modulate, "flux_layer_norm_modulate")


# ----------------------------------------------------------------------------------------------------------------
# adaLN-Zero gates
# ----------------------------------------------------------------------------------------------------------------


def _match_gated_residual(add):
    """``(residual, gate, y)`` when ``add`` is ``residual + gate * y`` with float32 ``residual`` and ``y`` of the
    output's 3-D shape and ``gate [B, 1, C]``, else None."""
    out_shape = list(add.result(0).shape)
    if len(out_shape) != 3 or out_shape[-1] <= 0 or out_shape[1] == 1:
        return None
    for residual, product in _operand_pairs(add):
        multiply = producer(product, "pd_op.multiply")
        if multiply is None or not has_one_user(product) or list(residual.shape) != out_shape:
            continue
        for gate, y in _operand_pairs(multiply):
            if _is_sample_vector(gate, out_shape[-1]) and list(y.shape) == out_shape and \
                    is_float32(residual, gate, y):
                return residual, gate, y
    return None


def fuse_gated_residual(model_file: Path) -> int:
    """Every ``residual + gate * y`` with a ``[B, 1, C]`` gate -> ``flux_gated_residual``. Returns the count."""
    return _fuse(model_file, "pd_op.add", _match_gated_residual, "flux_gated_residual")


# ----------------------------------------------------------------------------------------------------------------
# Rotary embedding
# ----------------------------------------------------------------------------------------------------------------


def _is_pair_rotation(value, dim: int) -> bool:
    """``value`` is a graph constant equal to ``pair_rotation_matrix(dim)``."""
    op = producer(value, "pd_op.assign_value_", "pd_op.assign_value")
    if op is None or [int(d) for d in op.attrs()["shape"]] != [dim, dim]:
        return False
    values = np.asarray(op.attrs()["values"], dtype=np.float32).reshape(dim, dim)
    return bool(np.array_equal(values, pair_rotation_matrix(dim)))


def _is_rope_table(value, dim: int) -> bool:
    shape = list(value.shape)
    return len(shape) == 4 and shape[0] == 1 and shape[2] == 1 and shape[3] == dim


def _match_rope(add):
    """``(x, cos, sin)`` when ``add`` is ``x * cos + (x @ R) * sin`` (x ``[B, L, H, D]`` float32 with static even D,
    R the pair rotation, cos / sin ``[1, L, 1, D]``), else None."""
    for plain, rotated in _operand_pairs(add):
        plain_op, rotated_op = producer(plain, "pd_op.multiply"), producer(rotated, "pd_op.multiply")
        if plain_op is None or rotated_op is None or not (has_one_user(plain) and has_one_user(rotated)):
            continue
        for turned, sin in _operand_pairs(rotated_op):
            matmul = producer(turned, "pd_op.matmul")
            if matmul is None or not has_one_user(turned) or matmul.attrs()["transpose_x"] or \
                    matmul.attrs()["transpose_y"]:
                continue
            x = matmul.operand_source(0)
            shape = list(x.shape)
            if len(shape) != 4 or shape[3] <= 0 or shape[3] % 2 or not _is_pair_rotation(matmul.operand_source(1),
                                                                                         shape[3]):
                continue
            for source, cos in _operand_pairs(plain_op):
                if source.is_same(x) and _is_rope_table(cos, shape[3]) and _is_rope_table(sin, shape[3]) and \
                        is_float32(x, cos, sin):
                    return x, cos, sin
    return None


def fuse_rope(model_file: Path) -> int:
    """Every ``x * cos + (x @ R) * sin`` (rotary embedding with the pair-rotation constant) -> ``flux_rope``.
    Returns the count."""
    return _fuse(model_file, "pd_op.add", _match_rope, "flux_rope")


# ----------------------------------------------------------------------------------------------------------------
# Packed attention input
# ----------------------------------------------------------------------------------------------------------------


def _sequence_parts(value):
    """The inputs of ``concat(parts, axis=1)`` when ``value`` is such a concat read only here, else ``[value]``."""
    concat = producer(value, "pd_op.concat")
    if concat is None or not has_one_user(value) or constant(concat.operand_source(1)) != 1:
        return [value]
    combine = producer(concat.operand_source(0), "builtin.combine")
    if combine is None:
        return [value]
    return [combine.operand_source(index) for index in range(combine.num_operands())]


def _same_table(a, b) -> bool:
    """``a`` and ``b`` are one value, or ``unsqueeze`` of one value on the same axes (each rotation unsqueezes
    the ``[L, D]`` tables itself)."""
    if a.is_same(b):
        return True
    first, second = producer(a, "pd_op.unsqueeze"), producer(b, "pd_op.unsqueeze")
    if first is None or second is None or not first.operand_source(0).is_same(second.operand_source(0)):
        return False
    axes = int_list(first.operand_source(1))
    return axes is not None and axes == int_list(second.operand_source(1))


def _match_rope_pack_qkv(stack):
    """``(q_parts, k_parts, v_parts, cos, sin)`` when ``stack`` is ``stack([flux_rope(q), flux_rope(k), v], 2)``
    with both rotations on the same tables and read only here, else None."""
    if int(stack.attrs()["axis"]) != 2:
        return None
    combine = producer(stack.operand_source(0), "builtin.combine")
    if combine is None or combine.num_operands() != 3:
        return None
    q, k, v = (combine.operand_source(index) for index in range(3))
    rope_q, rope_k = producer(q, "custom_op.flux_rope"), producer(k, "custom_op.flux_rope")
    if rope_q is None or rope_k is None or not (has_one_user(q) and has_one_user(k)):
        return None
    cos, sin = rope_q.operand_source(1), rope_q.operand_source(2)
    if not (_same_table(rope_k.operand_source(1), cos) and _same_table(rope_k.operand_source(2), sin)):
        return None
    parts = [_sequence_parts(value) for value in (rope_q.operand_source(0), rope_k.operand_source(0), v)]
    if len({len(p) for p in parts}) != 1 or not all(len(p.shape) == 4 and is_float32(p) for ps in parts for p in ps):
        return None
    return (*parts, cos, sin)


def fuse_rope_pack_qkv(model_file: Path) -> int:
    """Every packed attention input built from ``flux_rope`` outputs -> ``flux_rope_pack_qkv``. Returns the count."""
    return _fuse(model_file, "pd_op.stack", _match_rope_pack_qkv, "flux_rope_pack_qkv")


KERNEL_FUSIONS = {"layer_norm_modulate": fuse_layer_norm_modulate, "gated_residual": fuse_gated_residual,
                  "rope": fuse_rope, "rope_pack_qkv": fuse_rope_pack_qkv}


def fuse_with_cpu_kernels(model_file: Path) -> Dict[str, int]:
    """Apply every rewrite of this module to ``model_file`` in place; ``{rewrite: count}`` (all 0 when the
    kernels are unavailable)."""
    return {name: fuse(model_file) for name, fuse in KERNEL_FUSIONS.items()}
