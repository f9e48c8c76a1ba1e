"""Argument checks shared by the loss functions."""


def check_same_shape(a, b, names):
    """Raise ValueError unless ``a`` and ``b`` have the same shape (losses never broadcast silently)."""
    if list(a.shape) != list(b.shape):
        raise ValueError(f"{names[0]} {list(a.shape)} and {names[1]} {list(b.shape)} must have the same shape")


def as_head_list(logits, name):
    """A list of per-head logit maps from a tensor (one head) or a list/tuple of tensors."""
    heads = list(logits) if isinstance(logits, (list, tuple)) else [logits]
    if not heads:
        raise ValueError(f"{name} is an empty list of logit maps")
    return heads
