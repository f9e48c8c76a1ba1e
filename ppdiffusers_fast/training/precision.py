"""Mixed precision policy: bf16 autocast on GPU, fp32 on CPU.

- ``weight_dtype``: dtype the frozen FLUX base is loaded in (bf16 on GPU halves its 24 GB).
- O1: trainable weights (LoRA, heads) stay fp32 (:func:`keep_trainable_in_float32`); matmuls run in
  bf16 under ``paddle.amp.auto_cast``.
- O2: trainable weights are bf16 too; AdamW keeps fp32 master weights (``multi_precision=True``).
- fp16 is refused: FLUX activations overflow fp16 and it would need loss scaling.
- On CPU (Paddle has no bf16 matmul or AdamW kernels there) everything is fp32 and autocast is off.
"""
import contextlib
from dataclasses import dataclass
from typing import Optional

import paddle


@dataclass
class Precision:
    amp_dtype: Optional[str]  # "bfloat16" or None (fp32)
    level: str  # "O1" | "O2"
    weight_dtype: str  # dtype of the frozen base weights
    note: str = ""  # why the request was changed, for the log


def resolve_precision(mixed_precision: Optional[str], opt_level: str = "O1", device: Optional[str] = None) -> Precision:
    device = device or paddle.get_device()
    if mixed_precision in (None, "no") or opt_level == "O0":
        return Precision(None, "O0", "float32")
    if mixed_precision == "fp16":
        raise ValueError("--mixed_precision fp16 is not supported (FLUX activations overflow fp16 without loss "
                         "scaling); use bf16")
    if mixed_precision != "bf16":
        raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {mixed_precision!r}")
    if opt_level not in ("O1", "O2"):
        raise ValueError(f"--fp16_opt_level must be O0, O1 or O2, got {opt_level!r}")
    if device == "cpu" or device.startswith("cpu"):
        return Precision(None, "O0", "float32", note="bf16 requested on CPU: training in fp32")
    return Precision("bfloat16", opt_level, "bfloat16")


def autocast(precision: Precision):
    """``paddle.amp.auto_cast`` for the policy (a no-op context in fp32)."""
    if precision.amp_dtype is None:
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(enable=True, dtype=precision.amp_dtype, level=precision.level)


def keep_trainable_in_float32(layers) -> None:
    """Cast every sub-layer whose parameters are all trainable (LoRA adapters, heads) to fp32 (O1)."""
    for layer in layers:
        params = layer.parameters(include_sublayers=True)
        if params and all(not p.stop_gradient for p in params) and any(p.dtype != paddle.float32 for p in params):
            layer.to(dtype="float32")
