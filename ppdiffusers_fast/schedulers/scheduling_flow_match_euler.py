"""Flow-matching Euler scheduler with FLUX's resolution-dependent (dynamic) time shift.

Same configuration names and the same ``timesteps`` / ``sigmas`` as diffusers'
``FlowMatchEulerDiscreteScheduler``, so FLUX.1-dev's ``scheduler/scheduler_config.json`` loads as is
(ppdiffusers 0.29's class of that name has no dynamic shifting, explicit sigmas or ``mu``).

Schedule (ALGORITHMS.md "Time shift"): given unshifted levels ``t`` (by default
``linspace(1, 1/num_train_timesteps, n)``; FLUX pipelines pass ``sigmas = linspace(1, 1/n, n)``),
``sigma = shift(t; mu) = e^mu / (e^mu + (1/t - 1))`` with dynamic shifting, or the static shift
``sigma = shift * t / (1 + (shift - 1) * t)`` without it (``schedules.time_shift`` / ``static_time_shift``);
``timesteps = 1000 * sigma``; a terminal ``sigma = 0`` is appended. :meth:`step` is diffusers' stateful
interface to the one Euler update of ``schedulers.samplers`` (``euler_update``); ``FluxPipeline`` samples
with ``samplers.sample_euler`` over this scheduler's ``sigmas``.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np
import paddle

from .. import compat

compat.apply()  # before ppdiffusers is first imported
from ppdiffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from ppdiffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: E402
from ppdiffusers.utils import BaseOutput  # noqa: E402

from .. import schedules  # noqa: E402
from .samplers import euler_update  # noqa: E402

__all__ = ["FlowMatchEulerDiscreteScheduler", "FlowMatchEulerDiscreteSchedulerOutput"]

# diffusers options this scheduler accepts in a config file only at their default values.
_UNSUPPORTED_OPTIONS = {
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}


@dataclass
class FlowMatchEulerDiscreteSchedulerOutput(BaseOutput):
    """Output of :meth:`FlowMatchEulerDiscreteScheduler.step`.

    Args:
        prev_sample: ``[B, ...]`` sample at the next (lower) noise level, in the model output's dtype.
    """

    prev_sample: paddle.Tensor


class FlowMatchEulerDiscreteScheduler(SchedulerMixin, ConfigMixin):
    """Euler sampler of the rectified-flow ODE with FLUX's time shift.

    Args:
        num_train_timesteps: timesteps are ``sigma * num_train_timesteps`` (1000).
        shift: static shift, used when ``use_dynamic_shifting`` is False (SD3 uses 3.0).
        use_dynamic_shifting: shift by ``mu`` given to :meth:`set_timesteps` (FLUX).
        base_shift, max_shift, base_image_seq_len, max_image_seq_len: the line
            ``mu(seq_len)`` of :func:`ppdiffusers_fast.schedules.resolution_mu` (see :meth:`mu_for`).
        invert_sigmas, shift_terminal, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas,
        time_shift_type, stochastic_sampling: diffusers options, accepted so that configs written by
            recent diffusers load; only their defaults are supported (others raise NotImplementedError).
    """

    _compatibles = []
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: Optional[float] = 0.5,
        max_shift: Optional[float] = 1.15,
        base_image_seq_len: Optional[int] = 256,
        max_image_seq_len: Optional[int] = 4096,
        invert_sigmas: bool = False,
        shift_terminal: Optional[float] = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        given = dict(invert_sigmas=invert_sigmas, shift_terminal=shift_terminal, use_karras_sigmas=use_karras_sigmas,
                     use_exponential_sigmas=use_exponential_sigmas, use_beta_sigmas=use_beta_sigmas,
                     time_shift_type=time_shift_type, stochastic_sampling=stochastic_sampling)
        for name, default in _UNSUPPORTED_OPTIONS.items():
            if given[name] != default and not (default is False and given[name] is None):
                raise NotImplementedError(
                    f"FlowMatchEulerDiscreteScheduler: config option {name}={given[name]!r} is not supported "
                    f"(only {default!r})")
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")

        t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1] / num_train_timesteps
        if not use_dynamic_shifting:
            t = schedules.static_time_shift(t, float(shift))
        self.sigmas = paddle.to_tensor(t.astype(np.float32))
        self.timesteps = self.sigmas * num_train_timesteps
        # Unshifted range with dynamic shifting (1 and 1/num_train_timesteps), as diffusers.
        self.sigma_min = float(t[-1].astype(np.float32))
        self.sigma_max = float(t[0].astype(np.float32))
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None

    # -- state ------------------------------------------------------------------------------------
    @property
    def step_index(self):
        """Index into ``sigmas`` of the next :meth:`step` (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self):
        """First index, when set by a pipeline (image-to-image) with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = int(begin_index)

    def mu_for(self, image_seq_len: int) -> float:
        """``mu`` for ``image_seq_len`` image tokens from this config's shift line (1.15 at 4096 for FLUX)."""
        return schedules.resolution_mu(image_seq_len, self.config.base_image_seq_len, self.config.max_image_seq_len,
                                       self.config.base_shift, self.config.max_shift)

    # -- schedule ---------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: Optional[int] = None, sigmas: Optional[List[float]] = None,
                      mu: Optional[float] = None):
        """Build ``timesteps [n]`` and ``sigmas [n + 1]`` (descending, ending with 0).

        Args:
            num_inference_steps: n; may be omitted when ``sigmas`` is given (then it must equal its length).
            sigmas: unshifted levels ``t`` in (0, 1], descending, e.g. ``linspace(1, 1/n, n)`` as FLUX
                pipelines pass; the shift is applied to them (float32 arithmetic, as diffusers).
            mu: shift exponent, required with ``use_dynamic_shifting`` (see :meth:`mu_for`).
        """
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting is True "
                             "(e.g. scheduler.mu_for(image_seq_len))")
        if sigmas is None and num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps or sigmas")
        if sigmas is not None:
            t = np.asarray(sigmas.numpy() if isinstance(sigmas, paddle.Tensor) else sigmas).astype(np.float32)
            if t.ndim != 1 or t.size == 0:
                raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {t.shape}")
            if num_inference_steps is not None and num_inference_steps != t.size:
                raise ValueError(f"num_inference_steps={num_inference_steps} differs from len(sigmas)={t.size}")
            if np.any(t <= 0) or np.any(t > 1):
                raise ValueError("sigmas passed to set_timesteps must lie in (0, 1] (they are shifted here)")
        else:
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
            n_train = self.config.num_train_timesteps
            t = np.linspace(self.sigma_max * n_train, self.sigma_min * n_train, num_inference_steps) / n_train
        self.num_inference_steps = int(t.size)

        if self.config.use_dynamic_shifting:
            shifted = schedules.time_shift(t, float(mu))
        else:
            shifted = schedules.static_time_shift(t, float(self.config.shift))
        sigmas_f32 = paddle.to_tensor(np.asarray(shifted).astype(np.float32))
        self.timesteps = sigmas_f32 * self.config.num_train_timesteps
        self.sigmas = paddle.concat([sigmas_f32, paddle.zeros([1], dtype="float32")])
        self._step_index = None
        self._begin_index = None

    def set_shifted_sigmas(self, sigmas):
        """Use explicit, already shifted levels (e.g. phase-edge sigmas from ``schedules.phase_sigmas``).

        Args:
            sigmas: descending levels in [0, 1]; a terminal 0 is appended when the last one is not 0.
        """
        s = np.asarray(sigmas.numpy() if isinstance(sigmas, paddle.Tensor) else sigmas, dtype=np.float64)
        if s.ndim != 1 or s.size < 1:
            raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {s.shape}")
        if np.any(s < 0) or np.any(s > 1) or np.any(np.diff(s) >= 0):
            raise ValueError(f"sigmas must lie in [0, 1] and strictly decrease, got {s.tolist()}")
        if s[-1] != 0:
            s = np.append(s, 0.0)
        sigmas_f32 = paddle.to_tensor(s.astype(np.float32))
        self.num_inference_steps = int(s.size - 1)
        self.timesteps = sigmas_f32[:-1] * self.config.num_train_timesteps
        self.sigmas = sigmas_f32
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        """Index of ``timestep`` in the schedule (the second match when it occurs twice, as diffusers)."""
        schedule = (self.timesteps if schedule_timesteps is None else schedule_timesteps).numpy()
        value = timestep.reshape([-1])[0].item() if isinstance(timestep, paddle.Tensor) else float(timestep)
        tolerance = 1e-4 * max(1.0, abs(value))
        matches = np.nonzero(np.abs(schedule - value) <= tolerance)[0]
        if matches.size == 0:
            raise ValueError(f"timestep {value} is not in the scheduler's timesteps {schedule.tolist()}")
        return int(matches[1] if matches.size > 1 else matches[0])

    def _init_step_index(self, timestep):
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    # -- step -------------------------------------------------------------------------------------
    def step(self, model_output: paddle.Tensor, timestep: Union[float, paddle.Tensor], sample: paddle.Tensor,
             return_dict: bool = True) -> Union[FlowMatchEulerDiscreteSchedulerOutput, Tuple]:
        """One Euler step ``x_{s'} = x_s + (s' - s) * v`` from ``sigmas[i]`` to ``sigmas[i + 1]``.

        Args:
            model_output: ``[B, ...]`` predicted velocity ``v``.
            timestep: one of ``self.timesteps`` (float or tensor), not an integer index.
            sample: ``[B, ...]`` current sample (upcast to float32 for the update).
        Returns:
            :class:`FlowMatchEulerDiscreteSchedulerOutput` or ``(prev_sample,)``, in ``model_output``'s dtype.
        """
        if isinstance(timestep, int) or (isinstance(timestep, paddle.Tensor) and not timestep.is_floating_point()):
            raise ValueError("step() takes one of scheduler.timesteps as timestep, not an integer index "
                             "(e.g. from enumerate(timesteps))")
        if list(model_output.shape) != list(sample.shape):
            raise ValueError(f"model_output {list(model_output.shape)} and sample {list(sample.shape)} differ in shape")
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps (or set_shifted_sigmas) before step()")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index + 1 >= self.sigmas.shape[0]:
            raise ValueError(f"no step left: the schedule has {self.num_inference_steps} steps")
        sigma = self.sigmas[self._step_index].item()
        sigma_next = self.sigmas[self._step_index + 1].item()
        prev_sample = euler_update(sample, sigma, sigma_next, model_output, out_dtype=model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)

    def __len__(self):
        return self.config.num_train_timesteps
