"""The Euler integrator of the flow ODE (k-diffusion style), and the few-step sigmas of a student.

``sample_euler(velocity_fn, x, sigmas)`` integrates the flow ODE ``dx/ds = v(x, s)`` from ``sigmas[0]``
down to ``sigmas[-1]`` with Euler steps ``x_{s'} = x_s + (s' - s) * v`` (ALGORITHMS.md, Notation), each one
:func:`euler_update`. It is the one sampler loop of the library: ``FluxPipeline`` (over its scheduler's
sigmas), the methods' few-step ``sample`` and validation images all call it; the stateful
``FlowMatchEulerDiscreteScheduler.step`` (diffusers' interface) calls :func:`euler_update`.
A distilled K-phase student samples with the phase-edge sigmas ``1 -> ... -> 0`` (ALGORITHMS.md,
"Solver grid and phases"), computed for the requested resolution by :func:`few_step_sigmas`.

A DMD2 student may instead sample with :func:`sample_x0_renoise` (DMD2, Yin et al. 2024, section 4.5): at each
level it predicts the clean sample ``x0 = x_s - s v`` and re-noises it to the next level with fresh noise,
``x_{s'} = (1 - s') x0 + s' eps'``. Its LoRA metadata then names ``"sampler": "renoise"``; :func:`few_step_sampler`
picks the loop a student's metadata asks for.
"""
import numbers

import numpy as np
import paddle
from tqdm.auto import tqdm

from .. import schedules

__all__ = ["euler_update", "sample_euler", "renoise_update", "sample_x0_renoise", "SAMPLERS", "sampler_name",
           "few_step_sampler", "few_step_sigmas"]

SAMPLERS = ("euler", "renoise")


def _as_level_list(sigmas):
    """Levels as python floats (one grid for the batch), or float32 ``[B]`` tensors (a grid per sample).

    A 2-D tensor ``[n + 1, B]`` holds one grid per sample (column); anything else is one grid ``[n + 1]``.
    """
    per_sample = isinstance(sigmas, paddle.Tensor) and sigmas.ndim == 2
    if isinstance(sigmas, paddle.Tensor):
        values = sigmas.astype("float64").numpy()
    else:
        values = np.asarray(sigmas, dtype=np.float64)
    values = values if per_sample else values.reshape([-1, 1])
    shown = values.tolist() if per_sample else values[:, 0].tolist()
    if values.shape[0] < 2:
        raise ValueError(f"sigmas needs at least 2 levels (start and end), got {shown}")
    if not np.all((values >= 0.0) & (values <= 1.0)):  # also rejects NaN
        raise ValueError(f"sigmas must lie in [0, 1], got {shown}")
    if np.any(values[1:] >= values[:-1]):
        raise ValueError(f"sigmas must strictly decrease, got {shown}")
    if per_sample:
        levels = sigmas.astype("float32")
        return [levels[i] for i in range(levels.shape[0])]
    return values[:, 0].tolist()


def euler_update(x, sigma, sigma_next, velocity, out_dtype=None):
    """One Euler step ``x + (sigma_next - sigma) * v`` computed in float32, as diffusers' scheduler does.

    Args:
        x, velocity: ``[B, ...]`` sample at level ``sigma`` and its velocity (any float dtype).
        sigma, sigma_next: python floats or ``[B]`` tensors in [0, 1].
        out_dtype: dtype of the result (default ``x``'s).
    Returns:
        ``[B, ...]`` sample at level ``sigma_next``.
    """
    if list(velocity.shape) != list(x.shape):
        raise ValueError(f"velocity has shape {list(velocity.shape)} for a sample of shape {list(x.shape)}")
    x_next = schedules.euler_step(x.astype("float32"), sigma, sigma_next, velocity.astype("float32"))
    return x_next.astype(x.dtype if out_dtype is None else out_dtype)


def sample_euler(velocity_fn, x, sigmas, callback=None, progress=False):
    """Euler integration of the flow ODE over ``sigmas`` (k-diffusion's ``sample_euler`` for velocities).

    For each consecutive pair ``(s, s')``: ``v = velocity_fn(x, s_batch)``, ``x <- euler_update(x, s, s', v)``
    (float32 arithmetic, cast back to ``x``'s dtype).

    Args:
        velocity_fn: ``(x [B, ...], sigma [B] float32) -> v [B, ...]``.
        x: ``[B, ...]`` start sample at level ``sigmas[0]`` (pure noise when ``sigmas[0] = 1``).
        sigmas: strictly decreasing levels in [0, 1]: one grid for the batch (list, numpy array or paddle tensor
            ``[n + 1]``), or a paddle tensor ``[n + 1, B]`` with one grid per sample (a column each).
        callback: optional ``callback(info)`` after each step with ``info`` a dict of ``i``, ``sigma``,
            ``sigma_next``, ``x`` (the new sample), ``velocity`` and ``denoised`` (``x0 = x_s - s * v``).
        progress: show a tqdm bar over the steps.
    Returns:
        ``[B, ...]`` sample at level ``sigmas[-1]``.
    """
    return _integrate(velocity_fn, x, sigmas, lambda i, x, sigma, sigma_next, velocity:
                      euler_update(x, sigma, sigma_next, velocity), callback, progress)


def _integrate(velocity_fn, x, sigmas, step_rule, callback, progress):
    """The loop shared by the samplers: for each pair ``(s, s')`` of levels, ``v = velocity_fn(x, s_batch)`` and
    ``x <- step_rule(i, x, s, s', v)``; ``callback`` as :func:`sample_euler` describes."""
    levels = _as_level_list(sigmas)
    batch = x.shape[0]
    steps = list(zip(levels[:-1], levels[1:]))
    for i, (sigma, sigma_next) in enumerate(tqdm(steps, desc="sampling", disable=not progress)):
        sigma_batch = sigma if isinstance(sigma, paddle.Tensor) else paddle.full([batch], sigma, dtype="float32")
        velocity = velocity_fn(x, sigma_batch)
        x_next = step_rule(i, x, sigma, sigma_next, velocity)
        if callback is not None:
            callback({"i": i, "sigma": sigma, "sigma_next": sigma_next, "x": x_next, "velocity": velocity,
                      "denoised": schedules.x0_from_velocity(x.astype("float32"), sigma,
                                                             velocity.astype("float32"))})
        x = x_next
    return x


def renoise_update(x, sigma, sigma_next, velocity, noise, out_dtype=None):
    """One re-noising step: ``x0 = x - sigma v``, then ``(1 - sigma_next) x0 + sigma_next noise`` (float32).

    At ``sigma_next = 0`` this is the Euler step (both give ``x0``); above 0 the noise is fresh, not the one
    implied by ``x`` (which the deterministic Euler jump keeps: ``x + (sigma_next - sigma) v`` equals
    ``(1 - sigma_next) x0 + sigma_next eps_hat`` with ``eps_hat = x + (1 - sigma) v``).

    Args:
        x, velocity, noise: ``[B, ...]`` sample at ``sigma``, its velocity, standard normal noise.
        sigma, sigma_next: python floats or ``[B]`` tensors in [0, 1].
        out_dtype: dtype of the result (default ``x``'s).
    Returns:
        ``[B, ...]`` sample at level ``sigma_next``.
    """
    if list(velocity.shape) != list(x.shape) or list(noise.shape) != list(x.shape):
        raise ValueError(f"velocity {list(velocity.shape)} and noise {list(noise.shape)} must have the sample's "
                         f"shape {list(x.shape)}")
    x0 = schedules.x0_from_velocity(x.astype("float32"), sigma, velocity.astype("float32"))
    x_next = schedules.add_noise(x0, noise.astype("float32"), sigma_next)
    return x_next.astype(x.dtype if out_dtype is None else out_dtype)


def sample_x0_renoise(velocity_fn, x, sigmas, noise_fn, callback=None, progress=False):
    """DMD2's multi-step sampler: predict ``x0`` at each level, re-noise it to the next with fresh noise.

    For each consecutive pair ``(s, s')``: ``v = velocity_fn(x, s_batch)``,
    ``x <- renoise_update(x, s, s', v, noise_fn(i, shape))`` (``noise_fn`` is not called for the last step to 0).
    With one step (``sigmas = [1, 0]``) this equals :func:`sample_euler`.

    Args:
        velocity_fn: ``(x [B, ...], sigma [B] float32) -> v [B, ...]``.
        x: ``[B, ...]`` start sample at level ``sigmas[0]``.
        sigmas: strictly decreasing levels in [0, 1] (as :func:`sample_euler`).
        noise_fn: ``(i, shape) -> [B, ...]`` standard normal noise of ``shape`` for the re-noising after step ``i``
            (0-based).
        callback, progress: as :func:`sample_euler`.
    Returns:
        ``[B, ...]`` sample at level ``sigmas[-1]``.
    """
    def step_rule(i, x, sigma, sigma_next, velocity):
        if not isinstance(sigma_next, paddle.Tensor) and sigma_next == 0.0:  # the last step: no noise to add
            return euler_update(x, sigma, sigma_next, velocity)
        return renoise_update(x, sigma, sigma_next, velocity, noise_fn(i, list(x.shape)))

    return _integrate(velocity_fn, x, sigmas, step_rule, callback, progress)


def sampler_name(sampling_metadata) -> str:
    """The sampler a student's metadata names (``"euler"`` when it names none); unknown names are errors."""
    name = str((sampling_metadata or {}).get("sampler", "euler"))
    if name not in SAMPLERS:
        raise ValueError(f"sampling metadata names sampler {name!r}; known samplers: {SAMPLERS}")
    return name


def few_step_sampler(sampling_metadata, noise_fn=None):
    """``(velocity_fn, x, sigmas, callback=None, progress=False) -> x``: the loop the metadata names.

    ``noise_fn`` (``(i, shape) -> [B, ...]`` noise) is needed by the ``renoise`` sampler only.
    """
    if sampler_name(sampling_metadata) == "euler":
        return sample_euler
    if noise_fn is None:
        raise ValueError("the renoise sampler needs a noise_fn (fresh noise after each step)")

    def sample(velocity_fn, x, sigmas, callback=None, progress=False):
        return sample_x0_renoise(velocity_fn, x, sigmas, noise_fn, callback=callback, progress=progress)
    return sample


_REQUIRED_KEYS = ("num_inference_steps", "multiphase", "num_euler_timesteps")


def few_step_sigmas(sampling_metadata, height, width, vae_scale_factor=8, dtype="float32"):
    """Phase-edge sigmas of a K-phase student at the requested resolution, descending from 1 to 0.

    ``mu = resolution_mu(image_seq_len(height, width))`` and ``sigmas = phase_sigmas(K, N, mu)``: the same
    grid ``sigma_i = shift(i / N; mu)`` and edges the student was trained on, with the shift of this
    resolution (not a grid fixed at 1024x1024).

    Args:
        sampling_metadata: dict stored with the LoRA, with ``num_inference_steps`` (must equal
            ``multiphase``: one Euler jump per phase), ``multiphase`` (K) and ``num_euler_timesteps`` (N).
        height, width: image size in pixels (multiples of 16).
    Returns:
        paddle tensor ``[K + 1]``.
    """
    if not isinstance(sampling_metadata, dict):
        raise ValueError(f"sampling_metadata must be a dict, got {type(sampling_metadata).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in sampling_metadata]
    if missing:
        raise KeyError(f"sampling metadata lacks {missing} (has {sorted(sampling_metadata)})")
    values = {}
    for key in _REQUIRED_KEYS:
        value = sampling_metadata[key]
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)  # metadata read back from safetensors headers holds strings
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"sampling metadata {key} must be a positive integer, got {sampling_metadata[key]!r}")
        values[key] = int(value)
    if values["num_inference_steps"] != values["multiphase"]:
        raise ValueError(
            f"num_inference_steps ({values['num_inference_steps']}) must equal multiphase ({values['multiphase']}): "
            "a phased student takes one Euler jump per phase")
    mu = schedules.resolution_mu(schedules.image_seq_len(height, width, vae_scale_factor))
    return schedules.phase_sigmas(values["multiphase"], values["num_euler_timesteps"], mu, dtype=dtype)
