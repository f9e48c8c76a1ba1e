"""Deterministic random weights for conv/BatchNorm networks, from a seed and the parameter names alone.

Pure numpy on purpose (no Paddle import): the PyTorch reference script loads this file by path, so a
Paddle network and a PyTorch network with the same parameter names get bit-identical weights without
storing ~90 MB of InceptionV3 weights as a fixture.

Each tensor draws from its own generator ``np.random.default_rng([seed, crc32(name)])`` in float64,
then casts to float32, so the values do not depend on the order in which names are visited:
* ``*.conv.weight`` / other >= 2-d weights: N(0, 2 / fan_in) (He init: activations keep their scale
  through ReLU layers);
* ``*.bn.weight`` and ``*.running_var``: U(0.8, 1.2); ``*.bn.bias`` and ``*.running_mean``: N(0, 0.1^2);
* any other 1-d tensor (biases): N(0, 0.1^2).
"""
import hashlib
import zlib

import numpy as np


def _tensor_rng(seed, name):
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def random_tensor(name, shape, seed):
    """The recipe's float32 array for parameter ``name`` with ``shape``."""
    rng = _tensor_rng(seed, name)
    shape = tuple(int(s) for s in shape)
    if name.endswith(("bn.weight", "running_var")):
        values = rng.uniform(0.8, 1.2, size=shape)
    elif len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        values = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    else:
        values = rng.standard_normal(shape) * 0.1
    return values.astype(np.float32)


def random_state_dict(shapes, seed=0):
    """``{name: float32 array}`` for ``shapes`` = ``{name: shape}``."""
    return {name: random_tensor(name, shape, seed) for name, shape in sorted(shapes.items())}


def state_dict_digest(state_dict):
    """SHA-256 over sorted names, shapes and float32 bytes: proves two frameworks got the same weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        value = np.ascontiguousarray(state_dict[name], dtype=np.float32)
        digest.update(name.encode("utf-8"))
        digest.update(str(value.shape).encode("utf-8"))
        digest.update(value.tobytes())
    return digest.hexdigest()
