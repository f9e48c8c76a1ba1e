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
"""
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import paddle
import paddle.nn as nn


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
