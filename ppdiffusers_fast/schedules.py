"""Noise levels of the rectified flow used by FLUX: time shift, solver grid, phases, re-noising, conversions.

This is the one module that defines the noise math; trainers, samplers and pipelines call it and
never re-derive it. Notation (docs: ``shared/design/ALGORITHMS.md``):

- ``x_s = (1 - s) * x0 + s * eps``, ``s`` in [0, 1], ``s = 1`` is pure noise;
- the network predicts the velocity ``v = eps - x0``;
- ``x0 = x_s - s * v``, ``eps = x_s + (1 - s) * v``;
- Euler step from ``s`` to ``s'``: ``x_{s'} = x_s + (s' - s) * v``;
- time shift ``shift(t; mu) = e^mu / (e^mu + (1/t - 1))``, ``mu`` from the number of image tokens (FLUX), or
  the static ``shift * t / (1 + (shift - 1) t)`` (SD3-style scheduler configs);
- classifier-free guidance ``v = v_u + w (v_c - v_u)``;
- solver grid ``sigma_i = shift(i / N)``, ``i = 0..N``; ``K`` phases with edges on grid indices.

Noise levels (``s``, ``r``, ``s_next``) are a python float (one level for the whole batch) or a
paddle tensor of shape ``[B]`` (one level per sample) that is reshaped to ``[B, 1, ..., 1]`` to
broadcast over a ``[B, ...]`` sample. Level coefficients are computed in float32 and then cast to
the sample's dtype. Levels are checked to lie in [0, 1]; a tensor check reads the values back
to the host (a few scalars per call).
"""
import math
import numbers

import numpy as np
import paddle

__all__ = [
    "time_shift",
    "static_time_shift",
    "resolution_mu",
    "image_seq_len",
    "solver_grid",
    "phase_edge_indices",
    "phase_sigmas",
    "phase_of_index",
    "phase_bounds",
    "draw_grid_index",
    "add_noise",
    "renoise",
    "velocity_from_x0_eps",
    "x0_from_velocity",
    "eps_from_velocity",
    "euler_step",
    "classifier_free_guidance",
]


# ----------------------------------------------------------------------------------------------
# Time shift and resolution-dependent mu
# ----------------------------------------------------------------------------------------------
def _is_real_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_unit_interval(t, name):
    """Raise ValueError when a float, numpy array or paddle tensor has values outside [0, 1]."""
    if isinstance(t, paddle.Tensor):
        if t.size == 0:
            return
        lo, hi = paddle.min(t).item(), paddle.max(t).item()
    elif isinstance(t, np.ndarray):
        if t.size == 0:
            return
        lo, hi = float(np.min(t)), float(np.max(t))
    else:
        lo = hi = float(t)
    if not (0.0 <= lo and hi <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo}, {hi}]")


def time_shift(t, mu):
    """Resolution-dependent time shift of FLUX: ``shift(t; mu) = e^mu / (e^mu + (1/t - 1))``.

    ``shift(0) = 0`` and ``shift(1) = 1``; ``mu > 0`` moves every level towards noise.
    The arithmetic follows the formula literally, in the dtype of ``t`` (so a float32 array gives the
    same float32 values as diffusers' ``FlowMatchEulerDiscreteScheduler``).

    Args:
        t: python float, numpy array or paddle tensor (any shape) with values in [0, 1].
        mu: python float, the shift exponent (see :func:`resolution_mu`).
    Returns:
        Same type (and shape, dtype) as ``t``.
    """
    if not _is_real_number(mu) or not math.isfinite(mu):
        raise ValueError(f"mu must be a finite real number, got {mu!r}")
    _check_unit_interval(t, "t")
    e_mu = math.exp(mu)
    if isinstance(t, (paddle.Tensor, np.ndarray)):
        if isinstance(t, np.ndarray):
            with np.errstate(divide="ignore"):  # t = 0 gives 1/t = inf and shift = 0, as it should
                return e_mu / (e_mu + (1 / t - 1))
        return e_mu / (e_mu + (1 / t - 1))
    t = float(t)
    if t == 0.0:
        return 0.0
    return e_mu / (e_mu + (1.0 / t - 1.0))


def static_time_shift(t, shift):
    """Static time shift of flow-matching schedulers without dynamic shifting: ``shift * t / (1 + (shift - 1) t)``.

    ``shift = 1`` is the identity; ``shift > 1`` moves every level towards noise. As :func:`time_shift`, the
    arithmetic follows the formula literally in the dtype of ``t`` (float32 arrays give diffusers' values).

    Args:
        t: python float, numpy array or paddle tensor with values in [0, 1].
        shift: positive python float.
    Returns:
        Same type (and shape, dtype) as ``t``.
    """
    if not _is_real_number(shift) or not shift > 0:
        raise ValueError(f"shift must be a positive real number, got {shift!r}")
    _check_unit_interval(t, "t")
    return shift * t / (1 + (shift - 1) * t)


def resolution_mu(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """Shift exponent from the number of image tokens: ``mu = m * seq_len + b``.

    ``m = (max_shift - base_shift) / (max_seq_len - base_seq_len)``, ``b = base_shift - m * base_seq_len``
    (FLUX.1 constants by default: 0.5 at 256 tokens, 1.15 at 4096 tokens = 1024x1024). Outside
    [base_seq_len, max_seq_len] the line is extrapolated, as diffusers' FLUX pipeline does.

    Returns:
        python float.
    """
    for name, value in (("image_seq_len", image_seq_len), ("base_seq_len", base_seq_len),
                        ("max_seq_len", max_seq_len)):
        if not _is_real_number(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if max_seq_len == base_seq_len:
        raise ValueError(f"max_seq_len and base_seq_len must differ, both are {base_seq_len}")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return float(image_seq_len * m + b)


def image_seq_len(height, width, vae_scale_factor=8):
    """Number of FLUX image tokens for an image of ``height x width`` pixels: ``(H/16) * (W/16)``.

    The VAE downsamples by ``vae_scale_factor`` (8) and the latents are packed in 2x2 patches, so
    each side must be a multiple of ``2 * vae_scale_factor`` (16).
    """
    patch = 2 * int(vae_scale_factor)
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if value % patch != 0:
            raise ValueError(f"{name}={value} is not a multiple of {patch} (2 x vae_scale_factor {vae_scale_factor})")
    return (int(height) // patch) * (int(width) // patch)


# ----------------------------------------------------------------------------------------------
# Solver grid and phases (PCM)
# ----------------------------------------------------------------------------------------------
def _check_positive_int(value, name):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def solver_grid(num_euler_timesteps, mu, dtype="float32"):
    """The teacher's solver grid ``sigma_i = shift(i / N; mu)``, ``i = 0..N`` (ascending, 0 to 1).

    Computed in float64 and cast to ``dtype``. Index ``i`` is a grid index of ALGORITHMS.md: PCM draws
    ``i`` in 1..N and the teacher steps from ``sigma_i`` to ``sigma_{i-1}``.

    Returns:
        paddle tensor ``[N + 1]``.
    """
    n = _check_positive_int(num_euler_timesteps, "num_euler_timesteps")
    t = np.arange(n + 1, dtype=np.float64) / n
    return paddle.to_tensor(time_shift(t, mu), dtype=dtype)


def phase_edge_indices(num_euler_timesteps, multiphase):
    """Grid indices of the ``K`` phase edges: ``floor(linspace(0, N, K, endpoint=False))`` plus ``N``.

    Phase ``k`` spans grid indices ``[e_k, e_{k+1}]``. ``K = 1`` gives ``[0, N]``, latent consistency
    distillation (LCM). The floor is taken in exact integer arithmetic, ``e_k = (k * N) // K``, which
    equals numpy's ``floor(linspace)`` wherever that is not hit by rounding (for N = 100 it is equal for
    every K; numpy gives 499 instead of 500 for N = 1000, K = 38).

    Args:
        num_euler_timesteps: N, the number of solver grid steps.
        multiphase: K, the number of phases (1 <= K <= N).
    Returns:
        list of K + 1 python ints, ascending from 0 to N.
    """
    n = _check_positive_int(num_euler_timesteps, "num_euler_timesteps")
    k = _check_positive_int(multiphase, "multiphase")
    if k > n:
        raise ValueError(f"multiphase (K={k}) cannot exceed num_euler_timesteps (N={n}): a phase needs a grid step")
    return [(j * n) // k for j in range(k)] + [n]


def phase_sigmas(multiphase, num_euler_timesteps, mu, dtype="float32"):
    """Noise levels of the phase edges, descending from 1 to 0: the K-step sampler's sigmas.

    ``[sigma_{e_K}, ..., sigma_{e_0}] = [1, ..., 0]`` with ``sigma_i = shift(i / N; mu)``; sampling with K
    steps makes Euler jumps between consecutive entries.

    Returns:
        paddle tensor ``[K + 1]``.
    """
    edges = phase_edge_indices(num_euler_timesteps, multiphase)
    t = np.array(edges[::-1], dtype=np.float64) / edges[-1]
    return paddle.to_tensor(time_shift(t, mu), dtype=dtype)


def _check_edges(edges):
    edges = [int(e) for e in edges]
    if len(edges) < 2 or edges[0] != 0 or any(b <= a for a, b in zip(edges[:-1], edges[1:])):
        raise ValueError(f"edges must rise strictly from 0 (as phase_edge_indices gives), got {edges}")
    return edges


def phase_of_index(index, edges):
    """Phase ``k`` of grid index ``i``: the ``k`` with ``e_k < i <= e_{k+1}``.

    A PCM step at grid index ``i`` (1..N) steps the teacher to ``i - 1`` and jumps to the phase's lower
    edge ``e_k``; ``i - 1 = e_k`` is the boundary case where the target is the teacher's step itself.

    Args:
        index: python int or integer paddle tensor (any shape) of grid indices in 1..N.
        edges: phase edge indices (list from :func:`phase_edge_indices`).
    Returns:
        python int, or int64 tensor of the shape of ``index``.
    """
    edges = _check_edges(edges)
    n = edges[-1]
    if isinstance(index, paddle.Tensor):
        if index.dtype not in (paddle.int32, paddle.int64):
            raise ValueError(f"index must be an integer tensor, got {index.dtype}")
        if index.size > 0:
            lo, hi = paddle.min(index).item(), paddle.max(index).item()
            if lo < 1 or hi > n:
                raise ValueError(f"grid index must lie in 1..{n}, got values in [{lo}, {hi}]")
        index = index.astype("int64")
        phase = paddle.zeros_like(index)
        for inner_edge in edges[1:-1]:
            phase = phase + (index > inner_edge).astype("int64")
        return phase
    if not isinstance(index, numbers.Integral) or isinstance(index, bool):
        raise ValueError(f"index must be an int or an integer tensor, got {index!r}")
    if not 1 <= index <= n:
        raise ValueError(f"grid index must lie in 1..{n}, got {index}")
    return sum(1 for inner_edge in edges[1:-1] if index > inner_edge)


def phase_bounds(index, edges):
    """Grid indices ``(e_k, e_{k+1})`` of the phase holding grid index ``i`` (see :func:`phase_of_index`).

    Gather the solver grid at them for the levels: ``grid[lower]`` is the jump target ``e_k`` of the
    consistency function ``f(x_s, s) = x_s + (sigma_{e_k} - s) * v``.

    Returns:
        ``(lower, upper)``: python ints, or int64 tensors of the shape of ``index``.
    """
    edges = _check_edges(edges)
    phase = phase_of_index(index, edges)
    if isinstance(phase, paddle.Tensor):
        table = paddle.to_tensor(edges, dtype="int64")
        return paddle.gather(table, phase.flatten()).reshape(phase.shape), \
            paddle.gather(table, phase.flatten() + 1).reshape(phase.shape)
    return edges[phase], edges[phase + 1]


def _index_per_sample(value, batch_size, name):
    tensor = value if isinstance(value, paddle.Tensor) else paddle.full([batch_size], int(value), dtype="int64")
    tensor = tensor.astype("int64").reshape([-1])
    if tensor.shape[0] != batch_size:
        raise ValueError(f"{name} has {tensor.shape[0]} entries for a batch of {batch_size}")
    return tensor


def draw_grid_index(low, high, batch_size):
    """One grid index per sample, uniform over ``low..high`` inclusive: how every method draws a grid index.

    PCM draws ``i`` in ``1..N``, the adversarial level in ``e_k..e_{k+1} - 1``, the reflow level in
    ``e_k + 1..e_{k+1}``, the DMD level in ``1..N - 1``; gather the solver grid at the index for the level.

    Args:
        low, high: python ints or ``[B]`` integer tensors with ``low <= high`` element-wise.
        batch_size: B.
    Returns:
        int64 tensor ``[B]``.
    """
    both_ints = not isinstance(low, paddle.Tensor) and not isinstance(high, paddle.Tensor)
    if both_ints and int(high) < int(low):
        raise ValueError("draw_grid_index needs low <= high for every sample")
    low, high = _index_per_sample(low, batch_size, "low"), _index_per_sample(high, batch_size, "high")
    span = high - low + 1
    if not both_ints and paddle.min(span).item() < 1:  # tensor bounds: one read back to the host
        raise ValueError("draw_grid_index needs low <= high for every sample")
    offset = paddle.floor(paddle.rand([batch_size], dtype="float32") * span.astype("float32")).astype("int64")
    return low + paddle.minimum(offset, span - 1)


# ----------------------------------------------------------------------------------------------
# Forward process, re-noising, conversions, Euler step
# ----------------------------------------------------------------------------------------------
def _level(s, x, name):
    """Check a noise level and shape it to broadcast against the sample ``x`` ([B, ...]).

    Returns a python float, or a float32 tensor ``[B, 1, ..., 1]`` (``[1, ..., 1]`` for a 0-d tensor).
    """
    if isinstance(s, paddle.Tensor):
        if not s.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {s.dtype}")
        _check_unit_interval(s, name)
        s = s.astype("float32")
        ndim = len(x.shape)
        if s.ndim == 0:
            return s.reshape([1] * max(ndim, 1))
        if s.ndim == 1:
            if s.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"{name} has shape {s.shape}, expected [B] with B = {x.shape[0]} (sample {x.shape})")
            return s.reshape([s.shape[0]] + [1] * (ndim - 1))
        if s.ndim == ndim:
            return s
        raise ValueError(f"{name} must be a float, a [B] tensor or have the sample's rank; got shape {s.shape}")
    if _is_real_number(s):
        _check_unit_interval(s, name)
        return float(s)
    raise ValueError(f"{name} must be a python float or a paddle tensor, got {type(s).__name__}")


def _coef(value, x):
    """A level coefficient in the sample's dtype (python floats pass through)."""
    if isinstance(value, paddle.Tensor) and isinstance(x, paddle.Tensor) and value.dtype != x.dtype:
        return value.astype(x.dtype)
    return value


def _check_same_shape(a, b, names):
    if list(a.shape) != list(b.shape):
        raise ValueError(f"{names[0]} {list(a.shape)} and {names[1]} {list(b.shape)} must have the same shape")


def add_noise(x0, eps, s):
    """Forward process ``x_s = (1 - s) * x0 + s * eps``.

    Args:
        x0, eps: ``[B, ...]``. s: float or ``[B]``.
    Returns:
        ``[B, ...]``.
    """
    _check_same_shape(x0, eps, ("x0", "eps"))
    s = _level(s, x0, "s")
    return _coef(1 - s, x0) * x0 + _coef(s, x0) * eps


def renoise(x_s, s, r, noise):
    """Exact transition of the forward process from level ``s`` up to level ``r >= s``.

    ``x_r = a * x_s + sqrt(r^2 - a^2 * s^2) * eps'`` with ``a = (1 - r) / (1 - s)``: if
    ``x_s = (1 - s) x0 + s eps`` then ``x_r = (1 - r) x0 + (noise of std r)``, the correct marginal.
    ``r = s`` returns ``x_s``. ``s = 1`` is not allowed (nothing to re-noise from pure noise).

    Args:
        x_s: ``[B, ...]`` sample at level s. s, r: float or ``[B]``, ``0 <= s <= r <= 1``, ``s < 1``.
        noise: ``[B, ...]`` fresh standard normal noise ``eps'``.
    Returns:
        ``[B, ...]`` sample at level r.
    """
    _check_same_shape(x_s, noise, ("x_s", "noise"))
    s = _level(s, x_s, "s")
    r = _level(r, x_s, "r")
    if isinstance(s, paddle.Tensor) or isinstance(r, paddle.Tensor):
        s_t = s if isinstance(s, paddle.Tensor) else paddle.full([1], s, dtype="float32")
        r_t = r if isinstance(r, paddle.Tensor) else paddle.full([1], r, dtype="float32")
        if paddle.max(s_t).item() >= 1.0:
            raise ValueError("renoise needs s < 1 (a = (1 - r) / (1 - s) is undefined at s = 1)")
        if paddle.any(r_t < s_t).item():
            raise ValueError("renoise needs r >= s (it adds noise); got r < s for some samples")
        a = (1 - r_t) / (1 - s_t)
        std = paddle.sqrt(paddle.clip(r_t * r_t - a * a * s_t * s_t, min=0.0))
    else:
        if s >= 1.0:
            raise ValueError("renoise needs s < 1 (a = (1 - r) / (1 - s) is undefined at s = 1)")
        if r < s:
            raise ValueError(f"renoise needs r >= s (it adds noise); got s={s}, r={r}")
        a = (1 - r) / (1 - s)
        std = math.sqrt(max(r * r - a * a * s * s, 0.0))
    return _coef(a, x_s) * x_s + _coef(std, x_s) * noise


def velocity_from_x0_eps(x0, eps):
    """Flow-matching velocity target ``v = eps - x0`` (``[B, ...]``)."""
    _check_same_shape(x0, eps, ("x0", "eps"))
    return eps - x0


def x0_from_velocity(x_s, s, v):
    """Clean sample from a velocity: ``x0 = x_s - s * v`` (``[B, ...]``; s float or ``[B]``)."""
    _check_same_shape(x_s, v, ("x_s", "v"))
    s = _level(s, x_s, "s")
    return x_s - _coef(s, x_s) * v


def eps_from_velocity(x_s, s, v):
    """Noise from a velocity: ``eps = x_s + (1 - s) * v`` (``[B, ...]``; s float or ``[B]``)."""
    _check_same_shape(x_s, v, ("x_s", "v"))
    s = _level(s, x_s, "s")
    return x_s + _coef(1 - s, x_s) * v


def euler_step(x, s, s_next, v):
    """Euler step of the flow ODE ``dx/ds = v`` from ``s`` to ``s_next``: ``x + (s_next - s) * v``.

    With ``s_next`` a phase's lower edge this is the consistency function
    ``f(x_s, s) = x_s + (sigma_{e_k} - s) * v``.

    Args:
        x, v: ``[B, ...]``. s, s_next: float or ``[B]`` in [0, 1] (either direction).
    Returns:
        ``[B, ...]``.
    """
    _check_same_shape(x, v, ("x", "v"))
    s = _level(s, x, "s")
    s_next = _level(s_next, x, "s_next")
    return x + _coef(s_next - s, x) * v


def classifier_free_guidance(v_uncond, v_cond, scale):
    """Classifier-free guidance: ``v = v_u + w (v_c - v_u)`` (Ho & Salimans 2022, in velocity space).

    ``w = 1`` gives ``v_c``; ``w = 0`` gives ``v_u``.

    Args:
        v_uncond, v_cond: ``[B, ...]`` velocities without and with the prompt (or with the negative prompt and the
            prompt, for "true CFG").
        scale: python float ``w``.
    Returns:
        ``[B, ...]`` in the dtype of the inputs.
    """
    _check_same_shape(v_uncond, v_cond, ("v_uncond", "v_cond"))
    return v_uncond + scale * (v_cond - v_uncond)
