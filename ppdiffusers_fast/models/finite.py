"""Which named tensors hold NaN or infinity: the check before any weights are written, loaded or trained on."""
from typing import List, Mapping, Union

import numpy as np
import paddle

__all__ = ["non_finite_names", "describe_non_finite"]


def non_finite_names(tensors: Mapping[str, Union[paddle.Tensor, np.ndarray]]) -> List[str]:
    """Names (sorted) of the floating-point tensors in ``tensors`` with any NaN or +-inf value.

    Paddle tensors are reduced on their device and read back with a single host transfer.
    """
    names, flags = [], []
    for name, value in tensors.items():
        if isinstance(value, paddle.Tensor):
            if value.dtype in (paddle.float16, paddle.bfloat16, paddle.float32, paddle.float64):
                names.append(name)
                flags.append(paddle.isfinite(value.astype("float32")).all())
        elif np.issubdtype(np.asarray(value).dtype, np.floating) and not np.isfinite(value).all():
            names.append(name)
            flags.append(None)  # already known non-finite
    if not names:
        return []
    device_flags = [f for f in flags if f is not None]
    finite = iter(paddle.stack(device_flags).numpy().tolist()) if device_flags else iter(())
    bad = [name for name, flag in zip(names, flags) if flag is None or not next(finite)]
    return sorted(bad)


def describe_non_finite(names: List[str], limit: int = 3) -> str:
    """``"3 tensors (a, b, c)"`` / ``"5 tensors (a, b, c, ...)"`` for error messages."""
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({shown})"
