"""Per-group AdamW, learning-rate schedules with warm-up, global-norm clipping, and optimizer state I/O.

Each parameter group of a method (generator, discriminator, fake score) gets its own ``AdamW``
(``multi_precision=True``: fp32 master weights when the trainable weights are bf16/fp16) and its own
schedule. Optimizer state is saved by the parameters' structured names, not by Paddle's generated
variable names (``linear_12.w_0_moment1_0``), which depend on construction order and would not match
in a resumed process.
"""
import math
from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Tuple

import numpy as np
import paddle
from paddle.optimizer.lr import LRScheduler

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class OptimizerSettings:
    """One parameter group's resolved optimizer settings: the ``OptimConfig`` section (whose flags state every
    default, once) with the run's total steps and the group's overrides (``group_hyperparameters``)."""

    learning_rate: float  # peak learning rate
    beta1: float  # AdamW beta1
    beta2: float  # AdamW beta2
    weight_decay: float  # decoupled weight decay
    epsilon: float  # AdamW epsilon
    max_grad_norm: float  # global-norm clipping threshold (0 = off)
    lr_scheduler: str  # one of SCHEDULES
    lr_warmup_steps: int  # linear warm-up steps (not used by "constant")
    lr_num_cycles: int  # restarts of cosine_with_restarts
    lr_power: float  # power of the polynomial decay
    total_steps: int  # optimizer updates in the run (for decaying schedules)

    @classmethod
    def from_config(cls, optim, total_steps: int, lr_scale: float = 1.0) -> "OptimizerSettings":
        """From the ``OptimConfig`` section ``optim``; ``lr_scale`` multiplies ``--learning_rate`` (``--scale_lr``)."""
        return cls(learning_rate=optim.learning_rate * lr_scale, beta1=optim.adam_beta1, beta2=optim.adam_beta2,
                   weight_decay=optim.adam_weight_decay, epsilon=optim.adam_epsilon,
                   max_grad_norm=optim.max_grad_norm, lr_scheduler=optim.lr_scheduler,
                   lr_warmup_steps=optim.lr_warmup_steps, lr_num_cycles=optim.lr_num_cycles,
                   lr_power=optim.lr_power, total_steps=total_steps)

    def updated(self, **overrides) -> "OptimizerSettings":
        unknown = sorted(set(overrides) - set(self.__dataclass_fields__))
        if unknown:
            raise KeyError(f"unknown optimizer settings {unknown}")
        return replace(self, **overrides)


def lr_multiplier(step: int, settings: OptimizerSettings) -> float:
    """Factor on the peak learning rate at update ``step`` (0-based), diffusers' schedule shapes.

    warm-up: ``step / warmup`` for ``step < warmup`` (all but "constant"); then with
    ``p = (step - warmup) / (total - warmup)``: constant 1; linear ``1 - p``; cosine
    ``0.5 (1 + cos(pi p))``; cosine_with_restarts ``0.5 (1 + cos(pi ((cycles p) mod 1)))``;
    polynomial ``((1 - 1e-7 / lr) (1 - p)^power + 1e-7 / lr)`` (decays to 1e-7).
    """
    name = settings.lr_scheduler
    if name not in SCHEDULES:
        raise ValueError(f"--lr_scheduler must be one of {SCHEDULES}, got {name!r}")
    if name == "constant":
        return 1.0
    warmup = max(int(settings.lr_warmup_steps), 0)
    if step < warmup:
        return step / warmup
    if name == "constant_with_warmup":
        return 1.0
    span = max(settings.total_steps - warmup, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    if name == "linear":
        return 1.0 - progress
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((settings.lr_num_cycles * progress) % 1.0)))
    end = 1e-7 / settings.learning_rate
    return (1.0 - end) * (1.0 - progress) ** settings.lr_power + end


class WarmupSchedule(LRScheduler):
    """Paddle LR scheduler over :func:`lr_multiplier`; ``last_epoch`` counts optimizer updates."""

    def __init__(self, settings: OptimizerSettings):
        self.settings = settings
        super().__init__(learning_rate=settings.learning_rate)

    def get_lr(self) -> float:
        return self.base_lr * lr_multiplier(max(self.last_epoch, 0), self.settings)


@dataclass
class GroupOptimizer:
    """One parameter group with its optimizer and schedule."""

    name: str
    params: Dict[str, paddle.Tensor]  # structured name -> parameter
    optimizer: paddle.optimizer.AdamW
    scheduler: WarmupSchedule
    settings: OptimizerSettings


def build_group_optimizer(name: str, params: Dict[str, paddle.Tensor], settings: OptimizerSettings) -> GroupOptimizer:
    if not params:
        raise ValueError(f"parameter group '{name}' is empty")
    scheduler = WarmupSchedule(settings)
    optimizer = paddle.optimizer.AdamW(
        learning_rate=scheduler, parameters=list(params.values()), beta1=settings.beta1, beta2=settings.beta2,
        epsilon=settings.epsilon, weight_decay=settings.weight_decay, multi_precision=True)
    return GroupOptimizer(name, dict(params), optimizer, scheduler, settings)


def global_grad_norm(params: List[paddle.Tensor]) -> float:
    """``sqrt(sum_p ||grad_p||^2)`` in float32 over the parameters that have a gradient."""
    squares = [paddle.sum(p.grad.astype("float32") ** 2) for p in params if p.grad is not None]
    if not squares:
        return 0.0
    return math.sqrt(paddle.add_n(squares).item())


@paddle.no_grad()
def clip_grad_norm(params: List[paddle.Tensor], max_norm: float) -> float:
    """Scale gradients so their global norm is at most ``max_norm`` (0 = no clipping); return the norm before."""
    norm = global_grad_norm(params)
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.set_value(p.grad * coef)
    return norm


# ------------------------------------------------------------------ state I/O
def _accumulator_key(optimizer, param) -> str:
    master = getattr(optimizer, "_master_weights", {}).get(param.name)
    return master.name if master is not None else param.name


def _state_tensors(group: GroupOptimizer) -> Iterator[Tuple[str, paddle.Tensor]]:
    """``("<param name>::<state>", tensor)`` of every state the group's optimizer holds now (moments, beta
    powers, master weights), by structured parameter name."""
    optimizer = group.optimizer
    master_weights = getattr(optimizer, "_master_weights", {})
    for name, param in group.params.items():
        key = _accumulator_key(optimizer, param)
        for state_name, per_param in optimizer._accumulators.items():
            if key in per_param:
                yield f"{name}::{state_name}", per_param[key]
        if param.name in master_weights:
            yield f"{name}::master_weight", master_weights[param.name]


def optimizer_state_arrays(group: GroupOptimizer) -> Tuple[Dict[str, np.ndarray], dict]:
    """``({"<param name>::<state>": array}, scalars)`` for one group (moments, beta powers, master weights)."""
    arrays = {key: tensor.astype("float32").numpy() for key, tensor in _state_tensors(group)}
    scalars = {"lr_scheduler": group.scheduler.state_dict(), "learning_rate": group.scheduler.last_lr}
    return arrays, scalars


@paddle.no_grad()
def load_optimizer_state(group: GroupOptimizer, arrays: Dict[str, np.ndarray], scalars: dict) -> None:
    """Inverse of :func:`optimizer_state_arrays`; every saved state must find its parameter and vice versa."""
    optimizer = group.optimizer
    group.scheduler.set_state_dict(scalars["lr_scheduler"])
    if not arrays:
        return  # saved before the first update: nothing accumulated yet
    params = list(group.params.values())
    optimizer._create_accumulators(paddle.static.default_main_program().global_block(), params)
    expected = set()
    for key, tensor in _state_tensors(group):
        expected.add(key)
        _assign(tensor, arrays, key, group.name)
    unexpected = sorted(set(arrays) - expected)
    if unexpected:
        raise KeyError(f"optimizer state of group '{group.name}' has entries for unknown parameters: {unexpected[:5]}")


def _assign(target: paddle.Tensor, arrays: Dict[str, np.ndarray], key: str, group_name: str) -> None:
    if key not in arrays:
        raise KeyError(f"optimizer state of group '{group_name}' lacks {key}")
    value = arrays[key]
    if list(value.shape) != list(target.shape):
        raise ValueError(f"optimizer state {key} has shape {list(value.shape)}, expected {list(target.shape)}")
    target.set_value(paddle.to_tensor(value, place=target.place).astype(target.dtype))
