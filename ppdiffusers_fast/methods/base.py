"""What the trainer asks of a distillation method, and nothing more.

A method composes pure losses (``ppdiffusers_fast.losses``) around one frozen FLUX base with named
LoRA adapters. The trainer knows only this interface:

- ``parameter_groups() -> {group: [params]}``: each group gets its own AdamW, learning-rate schedule
  and gradient clipping ("generator" for the student; later methods add "discriminator" and
  "fake_score").
- ``update_schedule(step) -> [groups]``: the groups whose optimizers step at update ``step``
  (an explicit schedule, e.g. one discriminator update per generator update, never the parity of
  the global step hidden inside a loss).
- ``train_step(batch, step) -> StepResult | [StepResult]``: the named losses of one micro-batch and
  the group each result updates. The trainer back-propagates ``sum(result.losses.values())`` into that
  group only (gradients that flow into other groups' parameters are discarded).
- ``after_update(step, groups)``: bookkeeping after the optimizers stepped (EMA targets).
- ``checkpoint_tensors()`` / ``load_checkpoint_tensors()``: every adapter and trainable head, by
  stable structured names, for checkpoints (the frozen base is never saved).

Nouns every method shares live here too: the batch (:class:`LatentBatch`), the student adapter's name
(``STUDENT``) and its export (:func:`export_student`), and the few-step schedule (:class:`FewStepSchedule`:
the solver grid N, the K sampling steps and the teacher's guidance) that PCM, FLUX-Lightning and DMD2 all
train and sample on.
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import paddle
import paddle.nn as nn

from .. import schedules
from ..config_fields import flag
from ..models.lora import LoraConfig, adapter_modules, adapter_parameters, inject_lora
from ..models.lora_io import save_lora
from .denoiser import FluxCondition

STUDENT = "student"  # the adapter every method trains and exports
STUDENT_EMA = "student_ema"  # its exponential moving average (PCM's target, DMD2's export)


@dataclass
class FewStepSchedule:
    """The few-step schedule a student is trained for and sampled with (ALGORITHMS.md, "Solver grid and phases").

    The solver grid ``sigma_i = shift(i / N; mu)``, ``i = 0..N``, at the shift ``mu`` of each batch's resolution;
    K phases with edges ``e_0 = 0 < ... < e_K = N``; the student samples with K Euler jumps between the phase
    edges ``1 -> ... -> 0``. ``guidance_scale`` is the teacher's guidance everywhere a method calls the teacher
    (PCM's solver, DMD's real score) and the embedded guidance the student sees.
    """

    num_euler_timesteps: int = flag(100, "N, solver grid steps")
    multiphase: int = flag(4, "K, number of phases (= sampling steps); 1 is LCM")
    guidance_scale: float = flag(3.5, "teacher guidance (embedded scale for FLUX.1-dev, CFG weight otherwise)")

    def validate(self) -> None:
        if self.num_euler_timesteps < 1:
            raise ValueError(f"--num_euler_timesteps must be >= 1, got {self.num_euler_timesteps}")
        if not 1 <= self.multiphase <= self.num_euler_timesteps:
            raise ValueError(f"--multiphase {self.multiphase} must lie in 1..--num_euler_timesteps "
                             f"({self.num_euler_timesteps})")

    def solver_grid(self, num_image_tokens: int) -> paddle.Tensor:
        """Solver grid ``[N + 1]`` (ascending) at the shift of ``num_image_tokens``."""
        return schedules.solver_grid(self.num_euler_timesteps, schedules.resolution_mu(num_image_tokens))

    def sampling_sigmas(self, num_image_tokens: int) -> paddle.Tensor:
        """The K-step sampler's sigmas ``[K + 1]`` (1 -> 0, the phase edges) at the shift of ``num_image_tokens``."""
        mu = schedules.resolution_mu(num_image_tokens)
        return schedules.phase_sigmas(self.multiphase, self.num_euler_timesteps, mu)

    def sampling_metadata(self) -> dict:
        """Settings the inference entry point needs to sample the student (K Euler jumps between phase edges)."""
        return {"num_inference_steps": self.multiphase, "multiphase": self.multiphase,
                "num_euler_timesteps": self.num_euler_timesteps, "guidance_scale": self.guidance_scale,
                "lora_scale": 1.0}


@dataclass
class LatentBatch:
    """One training batch: clean packed latents and their text condition.

    Attributes:
        latents: ``[B, L, C]`` packed VAE latents (shifted and scaled), the data ``x0``.
        cond: :class:`FluxCondition` (guidance is set by the method).
        latent_size: ``(H, W)`` of the unpacked latent grid (for decoding previews).
    """

    latents: paddle.Tensor
    cond: FluxCondition
    latent_size: tuple = (0, 0)


def export_student(transformer, output_dir: str, file_name: str, sampling: dict, adapter: str = STUDENT) -> str:
    """Save the student (``adapter``: ``STUDENT`` or its EMA) of ``transformer`` with its ``sampling`` metadata to
    ``output_dir/file_name``; the file's keys name modules, not adapters, so either loads as the student."""
    path = os.path.join(output_dir, file_name)
    save_lora(transformer, adapter, path, sampling=sampling)
    return path


class StudentEMA:
    """A float32 adapter ``STUDENT_EMA`` holding ``ema <- decay * ema + (1 - decay) * student`` (not trained).

    Starts equal to the student; :meth:`update` after each generator update. Kept in float32 whatever the
    student's dtype (a bf16 average of small steps stalls: ``1 - decay`` is lost to rounding).
    """

    def __init__(self, transformer, lora_config: LoraConfig, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.transformer = transformer
        self.decay = decay
        inject_lora(transformer, lora_config, STUDENT_EMA)
        for adapter in adapter_modules(transformer, STUDENT_EMA).values():
            adapter.to(dtype="float32")
        with paddle.no_grad():
            for ema, student in zip(self.parameters(), adapter_parameters(transformer, STUDENT)):
                ema.set_value(student.astype("float32"))
                ema.stop_gradient = True

    def parameters(self) -> List[paddle.Tensor]:
        return adapter_parameters(self.transformer, STUDENT_EMA)

    @paddle.no_grad()
    def update(self) -> None:
        for ema, student in zip(self.parameters(), adapter_parameters(self.transformer, STUDENT)):
            ema.set_value(self.decay * ema + (1.0 - self.decay) * student.astype(ema.dtype))


@dataclass
class StepResult:
    """The losses of one micro-batch for one parameter group.

    Attributes:
        losses: name -> 0-d tensor; their sum is the objective back-propagated for ``group``.
        group: the parameter group these losses update (a key of ``parameter_groups()``).
        metrics: name -> python float, logged but not back-propagated.
    """

    losses: Dict[str, paddle.Tensor]
    group: str
    metrics: Dict[str, float] = field(default_factory=dict)

    def total(self) -> paddle.Tensor:
        if not self.losses:
            raise ValueError(f"StepResult for group '{self.group}' has no losses")
        values = list(self.losses.values())
        total = values[0]
        for value in values[1:]:
            total = total + value
        return total


class DistillationMethod(nn.Layer):
    """Base class: holds the networks as sub-layers so parameter names are stable and structured."""

    def parameter_groups(self) -> Dict[str, List[paddle.Tensor]]:
        raise NotImplementedError

    def update_schedule(self, step: int) -> List[str]:
        """Groups updated at optimizer update ``step`` (default: every group, every step)."""
        return list(self.parameter_groups())

    def group_hyperparameters(self) -> Dict[str, dict]:
        """Per-group overrides of the trainer's optimizer settings, e.g.
        ``{"discriminator": {"learning_rate": 1e-5, "beta1": 0.0}}`` (keys of ``OptimizerSettings``)."""
        return {}

    def train_step(self, batch, step: int) -> Union[StepResult, Sequence[StepResult]]:
        raise NotImplementedError

    def after_update(self, step: int, updated_groups: Sequence[str]) -> None:
        """Called once per optimizer update, after the listed groups stepped."""

    def extra_checkpoint_tensors(self) -> Dict[str, paddle.Tensor]:
        """Non-trainable state to checkpoint besides the groups' parameters (e.g. an EMA adapter)."""
        return {}

    def export(self, output_dir: str) -> Optional[str]:
        """Write the deliverable (e.g. the student LoRA) into ``output_dir``; return its path."""
        return None

    # ------------------------------------------------------------------ naming and checkpoint state
    def structured_names(self) -> Dict[int, str]:
        """``id(param) -> structured name`` for every parameter and buffer of the method."""
        names = {id(p): name for name, p in self.named_parameters(include_sublayers=True)}
        for name, buffer in self.named_buffers(include_sublayers=True):
            names.setdefault(id(buffer), name)
        return names

    def named_group_parameters(self) -> Dict[str, Dict[str, paddle.Tensor]]:
        """``{group: {structured name: param}}``; every trainable parameter in exactly one group."""
        names = self.structured_names()
        grouped: Dict[str, Dict[str, paddle.Tensor]] = {}
        owner: Dict[int, str] = {}
        for group, params in self.parameter_groups().items():
            grouped[group] = {}
            for param in params:
                if id(param) not in names:
                    raise ValueError(f"a parameter of group '{group}' is not a sub-layer parameter of the method")
                if id(param) in owner:
                    raise ValueError(f"parameter {names[id(param)]} is in groups '{owner[id(param)]}' and '{group}'")
                if param.stop_gradient:
                    raise ValueError(f"parameter {names[id(param)]} of group '{group}' has stop_gradient=True")
                owner[id(param)] = group
                grouped[group][names[id(param)]] = param
        return grouped

    def checkpoint_tensors(self) -> Dict[str, paddle.Tensor]:
        """Every trainable parameter and extra state tensor, by structured name."""
        tensors: Dict[str, paddle.Tensor] = {}
        for params in self.named_group_parameters().values():
            tensors.update(params)
        for name, tensor in self.extra_checkpoint_tensors().items():
            if name in tensors:
                raise ValueError(f"extra checkpoint tensor {name} clashes with a trainable parameter")
            tensors[name] = tensor
        return tensors

    @paddle.no_grad()
    def load_checkpoint_tensors(self, arrays: Mapping[str, object]) -> None:
        """Assign saved arrays (numpy or tensors) to ``checkpoint_tensors()``; keys and shapes must match."""
        targets = self.checkpoint_tensors()
        missing = sorted(set(targets) - set(arrays))
        unexpected = sorted(set(arrays) - set(targets))
        if missing or unexpected:
            raise KeyError(f"checkpoint does not match the method: missing {missing[:5]} ({len(missing)}), "
                           f"unexpected {unexpected[:5]} ({len(unexpected)})")
        for name, target in targets.items():
            value = arrays[name]
            value = value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)
            if list(value.shape) != list(target.shape):
                raise ValueError(f"checkpoint tensor {name} has shape {list(value.shape)}, "
                                 f"the method expects {list(target.shape)}")
            target.set_value(value.astype(target.dtype))
