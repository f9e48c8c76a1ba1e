"""Seeding and JSON-serialisable random states (paddle CPU and device generators, numpy, python).

Paddle's ``GeneratorState`` exposes ``__getstate__``/``__setstate__`` (a tuple of seed, offset and the
Mersenne-Twister state as numbers), so the states round-trip through JSON without pickling.
"""
import random
from typing import Dict, List

import numpy as np
import paddle


def seed_everything(seed: int) -> None:
    """Seed paddle (all devices), numpy and python's ``random``."""
    paddle.seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def _generator_states(device=None) -> List[list]:
    return [list(_to_json(state.__getstate__())) for state in paddle.get_rng_state(device)]


def _to_json(value):
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _restore_generators(states: List[list], device=None) -> None:
    cls = type(paddle.get_rng_state(device)[0])
    restored = []
    for state in states:
        generator_state = cls.__new__(cls)
        generator_state.__setstate__(tuple(state))
        restored.append(generator_state)
    paddle.set_rng_state(restored, device)


def capture_rng_state() -> Dict[str, object]:
    """All random states of this process as plain JSON values."""
    state = {"paddle_cpu": _generator_states("cpu"), "numpy": _to_json(np.random.get_state()),
             "python": _to_json(random.getstate())}
    if paddle.get_device() != "cpu":
        state["paddle_device"] = _generator_states()
    return state


def restore_rng_state(state: Dict[str, object]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    _restore_generators(state["paddle_cpu"], "cpu")
    if "paddle_device" in state and paddle.get_device() != "cpu":
        _restore_generators(state["paddle_device"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
